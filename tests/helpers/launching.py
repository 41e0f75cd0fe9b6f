"""Run a multi-process launch and an in-process reference side by side (the 2-process tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def launch_beside_reference(command: list[str], workdir: Path, env: dict, reference: Callable[[], T],
                            what: str) -> T:
    """Start ``command`` in ``workdir`` (output to ``launch.log``), compute ``reference()`` meanwhile on one torch
    thread so that both jobs share a small CPU, wait for the launch and fail the test with the log's tail unless it
    succeeded. Returns the reference.

    No timeout: under load a launch can take many times its usual half minute, and a fixed limit failed the suite
    for slowness alone. A rank that dies makes the launcher stop the others, and a hung collective ends at the
    process group's own timeout, so the wait ends either way.
    """
    log_path = workdir / "launch.log"
    with open(log_path, "w") as log:
        launch = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                result = reference()
            finally:
                torch.set_num_threads(threads)
            rc = launch.wait()
        finally:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    output = log_path.read_text(errors="replace")
    assert rc == 0, f"{what} failed (rc {rc}):\n{output[-6000:]}"
    return result

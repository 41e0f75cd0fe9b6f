"""Resumable benchmark runs shared by several processes: one result file per unit of work, claimed first.

A long benchmark is a list of units (a method and a seed, a model and a seed, ...). Each finished unit is written
at once to its own file, so a rerun skips it; a unit being worked on has a claim file holding the process id, so
several worker processes on the same results folder never do the same unit twice, and a claim whose process has
died is taken over. :func:`run_workers` starts such workers, one thread each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def claim(folder: Path, name: str) -> bool:
    """Take unit ``name`` (its result file would be ``folder/name``) for this process; False when it is done or a
    live process holds it."""
    if (folder / name).exists():
        return False
    claim_file = folder / (name + ".claim")
    for _ in range(2):  # a second try after taking over the claim of a process that has died
        # The claim appears with its process id already in it (a hard link to a finished file), so another worker
        # never reads an empty claim and mistakes it for a dead one.
        draft = folder / f"{name}.claim.{os.getpid()}"
        draft.write_text(str(os.getpid()))
        try:
            os.link(draft, claim_file)
            return True
        except FileExistsError:
            pass
        finally:
            draft.unlink()
        try:
            holder = int(claim_file.read_text())
        except FileNotFoundError:
            continue  # released meanwhile
        except ValueError:
            return False  # not a claim this runner wrote: leave it alone
        if holder == os.getpid():
            return True
        try:
            os.kill(holder, 0)
            return False
        except ProcessLookupError:
            claim_file.unlink(missing_ok=True)
        except PermissionError:
            return False  # alive, under another user
    return False


def release(folder: Path, name: str) -> None:
    (folder / (name + ".claim")).unlink(missing_ok=True)


def run_workers(script: str, argv: list[str], workers: int, prepare_flag: str = "--caches-only",
                worker_flag: str = "--worker") -> None:
    """Run ``script`` once with ``prepare_flag`` (shared caches), then ``workers`` processes with ``worker_flag``
    that share the units through claims; ``argv`` is the command line, without its ``--workers`` option.

    On a small CPU, N one-thread processes beat one N-thread process: OpenMP threads that wait on each other
    lose most of their time as soon as anything else runs on the machine.
    """
    args, skip = [], False
    for arg in argv:  # the same command line without --workers N / --workers=N
        if skip or arg.startswith("--workers"):
            skip = arg == "--workers"
            continue
        args.append(arg)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, script, *args, prepare_flag], env=env, check=True)
    processes = [subprocess.Popen([sys.executable, script, *args, worker_flag], env=env) for _ in range(workers)]
    codes = [p.wait() for p in processes]  # every worker ends before this returns, a failed one or not
    if any(codes):
        raise SystemExit("a worker failed; rerun to continue where it stopped")

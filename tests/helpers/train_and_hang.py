"""Run ``sstoken train`` as a real process that a test can SIGKILL at a known point.

Usage: python train_and_hang.py MARKER save:N -- <sstoken train arguments>

The run stops dead while checkpoint-N is half written: the adapter weights (and sstoken's own state) are
on disk, the optimizer, RNG and trainer state are not. At that point the script writes MARKER and sleeps,
so the parent decides when the SIGKILL lands instead of racing against the training loop.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

# One thread: the same float summation order as the test's in-process runs, so results can be compared
# bit for bit, and the test does not compete with itself for the machine's cores.
torch.set_num_threads(1)


def main() -> int:
    marker, hang_at = Path(sys.argv[1]), sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if not hang_at.startswith("save:"):
        raise SystemExit(f"unknown hang point {hang_at!r}; expected save:N")
    step = int(hang_at.split(":", 1)[1])

    from sstoken.cli import main
    from sstoken.training.trainer import SSTokenTrainer

    original_save = SSTokenTrainer._save_optimizer_and_scheduler

    def save_then_hang(self, output_dir):
        # transformers calls this right after writing the checkpoint's model / adapter files.
        if self.state.global_step == step:
            marker.write_text("hanging\n")
            while True:  # until the parent's SIGKILL
                time.sleep(1)
        return original_save(self, output_dir)

    SSTokenTrainer._save_optimizer_and_scheduler = save_then_hang
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())

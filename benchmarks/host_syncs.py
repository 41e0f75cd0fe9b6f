"""Where one training ``compute_loss`` waits for the device: every host-device synchronisation, in order.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/host_syncs.py

Counts, with a dispatch mode on a tiny model (the order of operations is the device's too), the ops that make
the host wait for the device: ``.item()`` / ``bool()`` of a tensor (``_local_scalar_dense``), ``nonzero`` and
boolean-mask indexing. Prints one line per synchronisation (op, sstoken source line) and a JSON summary with the
position of the non-finite-loss check among them: the check costs a wait only for the work queued since the
synchronisation before it.
"""

from __future__ import annotations

import json
import tempfile
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select"}


def _bool_mask_index(name: str, args) -> bool:
    return name.startswith("aten::index") and any(
        isinstance(arg, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in arg)
        for arg in args)


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING or _bool_mask_index(name, args):
            frames = [f for f in traceback.extract_stack() if "/sstoken/" in f.filename]
            where = f"{frames[-1].filename.split('/sstoken/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.calls.append((name, where, frames[-1].line if frames else ""))
        return func(*args, **(kwargs or {}))


def main() -> None:
    from sstoken.testing import random_rows, tiny_trainer

    rows = random_rows([6, 7, 8, 9], [8, 9, 10, 11])
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer(out, rows, history="base")
        if trainer.full_logits_reason is not None:  # decided before counting (its one-off check forward)
            raise SystemExit(f"the tiny model runs with full logits: {trainer.full_logits_reason}")
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        syncs = HostSyncs()
        with syncs:
            trainer.compute_loss(trainer.model, dict(batch))
    check = next(i for i, (_, _, line) in enumerate(syncs.calls) if "isfinite(loss)" in line)
    for i, (name, where, _) in enumerate(syncs.calls):
        print(f"{i:3d} {name:28s} {where}{'   <- the non-finite-loss check' if i == check else ''}")
    print(json.dumps({"syncs": len(syncs.calls), "finite_check_index": check,
                      "syncs_before_check": check, "first_sync": syncs.calls[0][1]}))


if __name__ == "__main__":
    main()

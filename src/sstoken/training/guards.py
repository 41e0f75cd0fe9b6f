"""Checks that run during training, on the weights themselves.

The loss guard in ``SSTokenTrainer.compute_loss`` keeps a NaN or inf *loss* from producing a gradient. A
finite loss can still give a non-finite update (an infinite or huge learning rate, an overflowing optimizer
state), and then every later step and the saved adapter are NaN while the summary looks normal. So after
each optimizer step the trainable parameters are checked, before transformers logs or saves that step.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from sstoken.errors import SSTokenError


class TrainingDiverged(SSTokenError):
    """An optimizer step made trainable parameters NaN or inf; nothing from that step is saved."""


def first_non_finite_parameter(model: torch.nn.Module) -> str | None:
    """Name of the first trainable parameter holding NaN or inf, else None (one device sync in all)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.numel() > 0]
    if not named:
        return None
    # FSDP2 shards are DTensors: each rank checks its local shard, and the ranks agree below.
    flags = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for _, p in named])
    all_finite = flags.all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank must stop together, or the others wait forever in the next collective.
        agreed = all_finite.to(torch.int32)
        if torch.distributed.get_backend() == "nccl":  # NCCL reduces GPU tensors only (CPU-offloaded weights)
            agreed = agreed.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        all_finite = agreed.bool()
    if bool(all_finite):
        return None
    bad = [name for (name, _), ok in zip(named, flags.tolist()) if not ok]
    return bad[0] if bad else "a parameter on another rank"


class FiniteWeightsGuard(TrainerCallback):
    """Stops training with :class:`TrainingDiverged` as soon as an optimizer step makes a weight non-finite.

    ``on_step_end`` runs after the optimizer step and before transformers' logging and checkpointing of that
    step, so the last checkpoint on disk is the last finite one and no final adapter is written.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        name = first_non_finite_parameter(model)
        if name is not None:
            raise TrainingDiverged(
                f"optimizer step {state.global_step} made trainable weights NaN or inf ({name}) although the loss "
                f"was finite; training stopped and nothing from this step was saved. Lower learning_rate "
                f"(now {args.learning_rate:g}) or set max_grad_norm"
            )

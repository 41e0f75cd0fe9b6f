"""Checks that run during training, on the loss and on the weights themselves.

A micro-batch whose loss is NaN or inf must contribute no gradient, yet under several processes its rank must
still take part in every collective of the backward (DDP's all-reduce, FSDP's and ZeRO's reduce-scatter), or the
other ranks wait for it forever. :func:`drop_gradients` does both: the backward runs through the model as usual,
and the gradient that reaches each leaf is replaced by zeros before it is accumulated, so the engines reduce
zeros from that rank and every rank applies the same update.

A finite loss can still give a non-finite update (an infinite or huge learning rate, an overflowing optimizer
state), and then every later step and the saved adapter are NaN while the summary looks normal. So after
each optimizer step the trainable parameters are checked, before transformers logs or saves that step.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from sstoken.errors import SSTokenError


class DroppedGradients:
    """Handle of :func:`drop_gradients`: :meth:`remove` once the backward has run."""

    def __init__(self, handles: list, nodes: list):
        self._handles = handles
        self._nodes = nodes  # keeps each leaf's gradient accumulator, and so its hook, alive until the backward

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._nodes = [], []


def _zeros(grads: tuple) -> tuple:
    return tuple(None if grad is None else torch.zeros_like(grad) for grad in grads)


def drop_gradients(loss: torch.Tensor, model: torch.nn.Module) -> DroppedGradients:
    """Make the next backward of ``loss`` add zeros to every gradient, whatever the loss's values.

    The accumulators are found twice over: in ``loss``'s graph (FSDP2 computes with unsharded copies of its
    parameters, which only the graph reaches) and from ``model``'s trainable parameters (reentrant activation
    checkpointing recomputes its part of the graph inside the backward, with the same parameters). A zero passed
    down the graph would not do: ``0 × NaN`` activations give NaN weight gradients; zeroing at the accumulator does.
    """
    nodes, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            nodes[node] = None
        stack.extend(child for child, _ in node.next_functions)
    for param in model.parameters():
        if param.requires_grad:
            nodes[param.view_as(param).grad_fn.next_functions[0][0]] = None
    return DroppedGradients([node.register_prehook(_zeros) for node in nodes], list(nodes))


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

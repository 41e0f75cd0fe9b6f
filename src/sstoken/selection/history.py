"""Where the history NLL comes from, besides a cache: the frozen base model (the adapter switched off) or an EMA of
the trainable weights (θ_his ← α·θ_his + (1−α)·θ)."""

from __future__ import annotations

import contextlib

import torch

from sstoken import distributed
from sstoken.batch import unwrap_model
from sstoken.errors import ConfigError
from sstoken.selection.lm_head import output_nll

# The EMA follows the trainable parameters by reference; sharding replaces or empties them.
EMA_SHARDED_MESSAGE = ("history 'ema' does not support sharded parameters (FSDP, DeepSpeed ZeRO-3): use DDP or ZeRO-2, "
                       "or history 'base' (online with LoRA, or history_cache)")


# ----------------------------------------------------------------------------------------------- online base
@contextlib.contextmanager
def base_weights(model: torch.nn.Module):
    """Run the frozen base model: for a PEFT model, the same weights with every adapter disabled."""
    inner = unwrap_model(model)
    if hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            yield
    else:
        raise ConfigError(
            "history 'base' computed online needs a PEFT (LoRA) model, whose base weights are the frozen history; "
            "for full fine-tuning build the base-model cache first (`sstoken cache`) and set history_cache"
        )


@torch.no_grad()
def history_forward_nll(model: torch.nn.Module, model_inputs: dict, labels: torch.Tensor, chunk_size: int = 1024,
                        ema: "EMAHistory | None" = None):
    """Per-token NLL of the history model, in eval mode (no dropout): the model as it stands (call it inside
    :func:`base_weights` for the base model), or with the EMA weights substituted when ``ema`` is given.

    ``model_inputs`` with ``sstoken_head=HeadRequest(...)`` go through sstoken's head (:mod:`sstoken.selection.lm_head`),
    which projects only the requested (response) positions and never builds the full logits."""
    was_training = model.training
    model.eval()
    try:
        outputs = ema.forward(model, model_inputs) if ema is not None else model(**model_inputs)
        return output_nll(outputs, labels, chunk_size)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- EMA history
def check_ema_decay(decay) -> None:
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {decay}")


def check_ema_interval(interval) -> None:
    if interval < 1:
        raise ConfigError(f"ema_interval must be >= 1, got {interval}")


class EMAHistory:
    """θ_his ← α·θ_his + (1−α)·θ over the trainable parameters (with LoRA: the adapter only).

    The EMA values live beside the model as plain float32 tensors (float64 weights stay float64): an adapter's worth
    of memory with LoRA, a full copy of the trained weights otherwise, 4 bytes per trainable parameter. Kept in
    the weights' own dtype, a bf16 average would round every update to 8 mantissa bits and drop any change
    smaller than ~0.4% of its value: history 'ema' would stay the base model. :meth:`forward` runs the model with
    the average, rounded to the weights' dtype, substituted for one call (a transient copy in that dtype of the
    parameters that differ from it: 2 bytes per bf16 parameter). With LoRA the average is taken over the A and B
    factors, which is an approximation of the average of the weight delta B·A; at the start both equal the base
    model.
    """

    def __init__(self, model: torch.nn.Module, decay: float, interval: int = 1):
        check_ema_decay(decay)
        check_ema_interval(interval)
        self.decay = decay
        self.interval = interval
        self.params = {name: p for name, p in _named_trainable(model)}
        if not self.params:
            raise ConfigError("EMA history: the model has no trainable parameters")
        self.shadow = {name: p.detach().to(_average_dtype(p.dtype), copy=True) for name, p in self.params.items()}
        self.updates = 0
        self._model = model  # to notice parameters replaced after construction (see _check_params)

    def _check_params(self) -> None:
        """Refuse, rather than silently use stale weights, when the parameters were sharded after construction.

        The trainer builds the EMA before accelerate prepares the model. FSDP2 (``fully_shard``) then replaces
        every parameter by a DTensor shard (the references above would never see another update, and the EMA
        forward would run on the live weights); DeepSpeed ZeRO-3 empties each parameter's data into partitions.
        """
        for name, param in _named_trainable(self._model):
            if self.params.get(name) is not param or distributed.is_zero3_partitioned(param) or \
                    distributed.is_dtensor(param.data):
                raise ConfigError(EMA_SHARDED_MESSAGE)

    @torch.no_grad()
    def update(self, global_step: int) -> bool:
        """Fold the current weights in, every ``interval`` optimizer steps. Returns whether it updated."""
        if global_step % self.interval:
            return False
        self._check_params()
        for name, param in self.params.items():
            # A bf16 parameter is promoted inside add_: no float32 copy of it is made.
            self.shadow[name].mul_(self.decay).add_(param.detach(), alpha=1.0 - self.decay)
        self.updates += 1
        return True

    @torch.no_grad()
    def forward(self, model: torch.nn.Module, model_inputs: dict):
        """Run ``model`` with the EMA values in place of the trainable weights, leaving the weights untouched.

        ``functional_call`` substitutes the tensors for this call only, so the training graph that already
        saved the live weights is not invalidated (no in-place change to a parameter).
        """
        self._check_params()
        weights = {name: average.to(self.params[name].dtype) for name, average in self.shadow.items()}
        return torch.func.functional_call(model, weights, args=(), kwargs=model_inputs, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{name}": tensor.contiguous() for name, tensor in self.shadow.items()}
        state["meta.updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.shadow if f"shadow.{name}" not in state]
        if missing:
            raise ConfigError(f"EMA checkpoint does not match the model (missing {missing[:3]}…)")
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.updates = int(state["meta.updates"].item())


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision (and float32) weights, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def _named_trainable(model: torch.nn.Module):
    inner = unwrap_model(model)
    for name, param in inner.named_parameters():
        if param.requires_grad:
            yield name, param

"""Per-token NLL without the B×T×V logits: TRL's fused LM head, with an explicit full-logits fallback.

TRL's ``SFTTrainer`` patches the model it trains (``trl.trainer.utils.add_fused_lm_head``): called with
``labels=..., fused_lm_head=True``, the forward runs the backbone and projects the hidden states through the LM
head weight in tiles, folding each tile into an online log-sum-exp, and returns the per-token ``log_probs``
(B×(T−1), 0 where the label is -100) with gradient. The full logits never exist, which at a 262k vocabulary is
most of a training step's memory. Every per-token NLL on sstoken's default path (training forward, online and
EMA history passes, ``sstoken cache``) goes through it.

Where that cannot give the right numbers, :func:`full_logits_reason` says why and the caller falls back to the
model's own full logits.
"""

from __future__ import annotations

import logging

import torch

from sstoken import scoring

logger = logging.getLogger(__name__)

# Only the label log-probabilities: TRL's SFTTrainer also asks for entropy and top-1 (for its metrics), which
# cost an extra pass over every tile.
FUSED_OUTPUTS = ("log_probs",)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def full_logits_reason(model: torch.nn.Module, label_smoothing_factor: float = 0.0) -> str | None:
    """Why per-token NLL of ``model`` needs the full logits; None when the fused head gives it exactly."""
    if label_smoothing_factor:
        return f"label smoothing ({label_smoothing_factor}) spreads the loss over the whole vocabulary"
    base = _base(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return f"{type(base).__name__} has no standard LM head (a Linear output embedding)"
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        # The fused head multiplies by ``lm_head.weight``, the frozen base weight: the adapter would be ignored.
        return "the LM head carries a PEFT adapter, which the fused head would ignore"
    if getattr(base, "base_model", base) is base:
        return f"{type(base).__name__} exposes no backbone (base_model) separate from its LM head"
    return None


def add_fused_head(model: torch.nn.Module) -> None:
    """Patch ``model`` (its base model under PEFT) with a fused LM head computing ``FUSED_OUTPUTS``, once.

    Without ``fused_lm_head=True`` the patched forward is the original one. A head already added by
    ``SFTTrainer`` stays underneath (only calls without ``fused_lm_head`` reach it): removing it could also remove
    other instance-level wrappers of ``forward``, such as accelerate's device-map hooks.
    """
    base = _base(model)
    # Ours must be the outermost patch: SFTTrainer may have wrapped its own around one added for `sstoken cache`.
    if vars(base).get("forward") is getattr(base, "_sstoken_fused_forward", None) is not None:
        return
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base, outputs=FUSED_OUTPUTS)
    base._sstoken_fused_forward = vars(base)["forward"]


def log_full_logits_fallback(reason: str, where: str) -> None:
    logger.warning("sstoken %s: per-token NLL from the full B×T×V logits, because %s", where, reason)


def output_nll(outputs, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """B×T float32 per-token NLL, aligned to the predicted token, from a causal LM's outputs.

    A forward called with ``fused_lm_head=True`` returns ``log_probs`` (gradient kept; positions whose label was
    -100 are 0); any other returns logits, whose NLL is taken in chunks without gradient.
    """
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is not None:
        return scoring.nll_from_shifted_log_probs(log_probs)
    return scoring.token_nll(outputs.logits.detach(), labels, chunk_size)

"""Pure tensor maths of token selection.

Every function takes and returns ``B×T`` tensors aligned to the *predicted* token: entry ``[b, i]`` is about
token ``i`` of row ``b`` (its NLL is that of predicting token ``i`` from the logits at position ``i-1``).
``response_mask`` marks the tokens that may carry loss; everything else (context, padding) is never selected
and never influences a normalisation.

A *sample* is a row, or, for packed rows, one segment of a row (``segment_ids``, see
:func:`sstoken.selection.attention.segment_ids_from_position_ids`). Normalisation and top-ρ are per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sstoken.batch import IGNORE_INDEX

# Largest float32 log-softmax block token_nll materialises at once (bytes).
NLL_CHUNK_BYTES = 32 * 2**20
# ceil(ρ·n) in floating point: 0.07 * 100 == 7.000000000000001, whose ceiling would keep one token too many.
_CEIL_SLACK = 1e-9
# Relative spread below which a sample's values count as equal (a few float32 ulps of NLL-sized numbers).
_FLAT_TOLERANCE = 1e-6


def response_mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss: label set, and not the first position (nothing predicts it)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


@torch.no_grad()
def token_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token negative log-likelihood, without gradient, B×T float32 aligned to the predicted token.

    ``logits`` is B×T×V as returned by a causal LM (position ``i`` predicts token ``i+1``). The log-softmax is
    taken ``chunk_size`` positions at a time, and never more than :data:`NLL_CHUNK_BYTES` of float32
    log-probabilities at once, so that no full-vocabulary float32 copy of the logits is kept.
    Entries whose label is ``-100``, and column 0, are 0.
    """
    batch, length, _ = logits.shape
    out = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    if length < 2:
        return out
    # 1024 positions of a 49k vocabulary are already 200 MB: the memory bound, not the position count, decides.
    chunk_size = max(1, min(chunk_size, NLL_CHUNK_BYTES // (4 * logits.shape[-1])))
    # One row at a time: logits[:, :-1] of a batch is not contiguous, and reshaping it to 2-D would copy it all.
    for row in range(batch):
        row_logits, row_targets = logits[row, :-1], labels[row, 1:]
        for start in range(0, length - 1, chunk_size):
            stop = start + chunk_size
            out[row, 1 + start:1 + stop] = F.cross_entropy(
                row_logits[start:stop].float(), row_targets[start:stop], ignore_index=IGNORE_INDEX, reduction="none"
            )
    return out


def retrospective_excess_loss(history_nll: torch.Tensor, current_nll: torch.Tensor) -> torch.Tensor:
    """REL = NLL under the history model − NLL under the current model (high: the model has learnt it lately)."""
    return history_nll - current_nll


def _group_index(response_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """One integer per (row, segment); positions outside ``response_mask`` get the extra group ``n_groups``."""
    batch, length = response_mask.shape
    if segment_ids is None:
        groups = torch.arange(batch, device=response_mask.device).unsqueeze(1).expand(batch, length)
        n_groups = batch
    else:
        segments = segment_ids.long()
        segments = segments - segments.min(dim=1, keepdim=True).values
        per_row = int(segments.max().item()) + 1 if segments.numel() else 1
        groups = segments + torch.arange(batch, device=response_mask.device).unsqueeze(1) * per_row
        n_groups = batch * per_row
    groups = torch.where(response_mask, groups, torch.full_like(groups, n_groups))
    return groups, n_groups


def minmax_normalize(
    values: torch.Tensor, response_mask: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Min-max normalise ``values`` to [0, 1] over each sample's response tokens.

    A sample whose values are all equal (up to float32 rounding: a spread below 1e-6 of their magnitude) or that
    has one token maps to 0; positions outside the mask are 0.
    """
    values = values.float()
    groups, n_groups = _group_index(response_mask, segment_ids)
    flat_groups = groups.reshape(-1)
    flat_values = values.reshape(-1)
    inf = torch.tensor(float("inf"), device=values.device)
    group_min = torch.full((n_groups + 1,), float("inf"), device=values.device)
    group_max = torch.full((n_groups + 1,), float("-inf"), device=values.device)
    group_min = group_min.scatter_reduce(0, flat_groups, torch.where(torch.isfinite(flat_values), flat_values, inf), "amin")
    group_max = group_max.scatter_reduce(0, flat_groups, torch.where(torch.isfinite(flat_values), flat_values, -inf), "amax")
    lo = group_min[flat_groups]
    span = group_max[flat_groups] - lo
    # A spread at the level of float32 rounding is a constant, not a ranking: stretching it to [0, 1] would
    # turn noise (e.g. history = current + 0.75, rounded) into a random selection.
    magnitude = torch.maximum(group_max[flat_groups].abs(), lo.abs()).nan_to_num(0.0, 0.0, 0.0).clamp(min=1.0)
    flat_span_ok = span > _FLAT_TOLERANCE * magnitude
    normalised = torch.where(flat_span_ok, (flat_values - lo) / span.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    normalised = torch.where(response_mask.reshape(-1) & torch.isfinite(normalised), normalised, 0.0)
    return normalised.view_as(values)


def combined_score(rel_normalized: torch.Tensor, context_share: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """ssToken's score: γ·Norm(REL) + (1−γ)·Attn (the attention share is already in [0, 1])."""
    return gamma * rel_normalized + (1.0 - gamma) * context_share.float()


def gamma_at(progress: float, gamma: float, warmup_fraction: float = 0.0) -> float:
    """ssToken's γ at ``progress`` (the fraction of optimizer steps done): 0, attention alone, while
    ``progress < warmup_fraction`` (the official release scores its first 10k of 50k samples so), then ``gamma``."""
    return 0.0 if progress < warmup_fraction else gamma


def keep_count(n_tokens: int, rho: float) -> int:
    """Tokens kept out of ``n_tokens``: ceil(ρ·n), robust to floating-point error (ρ=0.07, n=100 → 7)."""
    if n_tokens <= 0:
        return 0
    return min(n_tokens, max(0, math.ceil(rho * n_tokens - _CEIL_SLACK)))


def keep_counts(response_mask: torch.Tensor, rho: float, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample number of kept tokens, as a 1-D tensor over the samples of the batch (ceil(ρ·n) each)."""
    groups, n_groups = _group_index(response_mask, segment_ids)
    sizes = torch.bincount(groups.reshape(-1), minlength=n_groups + 1)[:n_groups]
    kept = torch.ceil(sizes.double() * rho - _CEIL_SLACK).clamp(min=0)
    return torch.minimum(kept, sizes.double()).long()


def top_rho_mask(
    scores: torch.Tensor, response_mask: torch.Tensor, rho: float, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep exactly ceil(ρ·n) response tokens of each sample, those with the highest score.

    Ties are broken by position (the earlier token wins) so the result is deterministic. Context and padding
    positions are never kept. NaN scores rank last.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    batch, length = scores.shape
    groups, n_groups = _group_index(response_mask, segment_ids)
    flat_groups = groups.reshape(-1)
    flat_scores = scores.reshape(-1).float()
    # Order: by group, then score descending, then position ascending (stable sorts applied last-key first).
    order = torch.argsort(-flat_scores, stable=True)
    order = order[torch.argsort(flat_groups[order], stable=True)]
    sorted_groups = flat_groups[order]
    sizes = torch.bincount(flat_groups, minlength=n_groups + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_group = torch.arange(order.numel(), device=scores.device) - starts[sorted_groups]
    kept_per_group = torch.ceil(sizes.double() * rho - _CEIL_SLACK).long()
    kept_per_group[n_groups] = 0  # the non-response bucket
    keep_sorted = rank_in_group < kept_per_group[sorted_groups]
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep.view(batch, length) & response_mask


def sstoken_scores(
    history_nll: torch.Tensor,
    current_nll: torch.Tensor,
    context_share: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 0.5,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """γ·Norm(REL) + (1−γ)·Attn for every response token (0 elsewhere)."""
    rel = retrospective_excess_loss(history_nll.float(), current_nll.float())
    rel_norm = minmax_normalize(rel, response_mask, segment_ids)
    score = combined_score(rel_norm, context_share, gamma)
    return torch.where(response_mask, score, 0.0)


def sstoken_mask(
    history_nll: torch.Tensor,
    current_nll: torch.Tensor,
    context_share: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 0.5,
    rho: float = 0.6,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ssToken's keep mask: the top ceil(ρ·n) response tokens of each sample by γ·Norm(REL) + (1−γ)·Attn.

    All inputs are B×T and aligned to the predicted token; returns a bool B×T mask. Usable from any loop::

        keep = sstoken_mask(base_nll, cur_nll, share, labels != -100)
        loss = (cur_nll_with_grad * keep).sum() / keep.sum()
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    scores = sstoken_scores(history_nll, current_nll, context_share, response_mask, gamma, segment_ids)
    return top_rho_mask(scores, response_mask, rho, segment_ids)


def excess_loss(current_nll: torch.Tensor, reference_nll: torch.Tensor) -> torch.Tensor:
    """Rho-1's excess loss: current − reference (high: the reference knows it, the model does not yet)."""
    return current_nll.float() - reference_nll.float()


def random_mask(
    response_mask: torch.Tensor,
    rho: float,
    generator: torch.Generator | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A uniformly random ceil(ρ·n) response tokens of each sample."""
    scores = torch.rand(response_mask.shape, generator=generator, device="cpu").to(response_mask.device)
    return top_rho_mask(scores, response_mask, rho, segment_ids)


def threshold_mask(scores: torch.Tensor, response_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep response tokens whose score is at least ``threshold`` (TokenCleaning's global rule)."""
    return (scores.float() >= threshold) & response_mask


def global_threshold(scores: torch.Tensor, rho: float) -> float:
    """The score above which the top ρ fraction of a 1-D collection of scores lies (ties kept)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    flat = scores.reshape(-1).float()
    if flat.numel() == 0:
        return float("inf")
    k = keep_count(flat.numel(), rho)
    return float(torch.topk(flat, k).values[-1].item())


# ----------------------------------------------------------------------------------------------- token weights
# The loss of an optimizer step is  Σ_{kept i} wᵢ·NLLᵢ / N,  N = the kept tokens of the whole step (every
# accumulated micro-batch, every rank): the count, not Σ wᵢ. N is known before the forward (the selector's
# expected_kept), so accumulation and ranks stay exact whatever the weights, and it is TRL's DFT denominator.


def dft_weights(token_nll: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning's per-token weight, the model's probability of the label: p = exp(−NLL).

    ``token_nll`` is the no-grad NLL the head already computed, so the weight is a constant of the backward
    (TRL detaches it the same way)."""
    return torch.exp(-token_nll.detach().float())


def combined_weights(*factors: torch.Tensor | None) -> torch.Tensor | None:
    """The product of the weight factors that are given (None: a factor of 1); None when none is given."""
    given = [f.float() for f in factors if f is not None]
    if not given:
        return None
    product = given[0]
    for factor in given[1:]:
        product = product * factor.to(product.device)
    return product


def weighted_sum(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ wᵢ·valuesᵢ; with no weights the plain sum (the same operation as before weights existed)."""
    if weights is None:
        return values.sum()
    return (values * weights.to(device=values.device, dtype=values.dtype)).sum()


def step_mean(loss_sum: torch.Tensor, step_kept: int | torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The micro-batch's share of the step's loss: ``loss_sum`` / the kept tokens of the whole step.

    ``step_kept`` is that count (the trainer's ``num_items_in_batch``); None means this micro-batch is the whole
    step, and its own kept count ``keep.sum()`` is used. A step that keeps nothing divides by 1 (a loss of 0)."""
    count = keep.sum() if step_kept is None else torch.as_tensor(step_kept, device=loss_sum.device)
    return loss_sum / count.to(loss_sum.device).clamp(min=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over ``mask`` as a Python float (0.0 for an empty mask); for logging."""
    count = int(mask.sum().item())
    if count == 0:
        return 0.0
    return float((values.float() * mask).sum().item() / count)

"""Batch → :class:`~sstoken.selection.Signals` + keep mask: the one pipeline behind training, inspect and benchmarks.

:func:`select_tokens` is used by :meth:`SSTokenTrainer.compute_loss <sstoken.training.trainer.SSTokenTrainer.compute_loss>`,
by ``sstoken inspect`` (:func:`sstoken.report.score_batch`) and, through the trainer, by the benchmarks. For one
batch it runs:

1. the history NLL, before the current model's forward so that its buffers are freed before the training
   activations exist (it does not raise the step's peak memory): a cache lookup, or a no-grad pass with the
   adapter disabled or the EMA weights swapped in (:class:`HistorySource`);
2. the current model's forward, once, with the attention share of one layer captured inside it;
3. selection *inside* that forward: sstoken's head (:mod:`sstoken.selection.lm_head`) calls back with the current NLL of
   the response tokens, the selector picks the kept tokens and the token weights are set (the data's ``weight``
   fields × the selector's own × DFT's p = exp(−NLL) of that same no-grad NLL), and the head computes the
   weighted loss of the kept tokens alone. A model whose logits that head cannot reproduce runs with full
   logits, and selection runs after the forward.

The caller gets the model's outputs (the kept tokens' weighted loss sum, or the logits) with the signals, the keep
mask and the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from sstoken.batch import TOKEN_WEIGHTS, unwrap_model
from sstoken.selection import lm_head, scoring
from sstoken.selection.selectors import Signals

PartTimer = Callable[[str], ContextManager]
"""``timer(name)`` → a context manager wrapped around one piece of selection work (see SSTokenTrainer)."""


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BatchLayout:
    """Which positions of a padded or padding-free (packed) batch are real, response and context tokens."""

    valid: torch.Tensor  # B×T: not padding
    response: torch.Tensor  # B×T: a labelled token predicted from its own sample
    context: torch.Tensor  # B×T: prompt tokens (no label), what the attention share measures attention to
    segment_ids: torch.Tensor | None  # B×T sample index within a packed row; None when rows are not packed

    @classmethod
    def of(cls, inputs: dict) -> "BatchLayout":
        from sstoken.selection.attention import segment_ids_from_position_ids

        labels = inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
        response = scoring.response_mask_from_labels(labels) & valid
        position_ids = inputs.get("position_ids")
        segment_ids = None
        if position_ids is not None:
            segment_ids = segment_ids_from_position_ids(position_ids)
            response &= position_ids != 0  # a segment's first token is not predicted from its own sample
        return cls(valid=valid, response=response, context=(labels == scoring.IGNORE_INDEX) & valid,
                   segment_ids=segment_ids)


def model_inputs_of(inputs: dict) -> dict:
    """The batch as the model's forward takes it (no labels: sstoken computes the loss itself)."""
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "seq_lengths", TOKEN_WEIGHTS)}
    model_inputs["use_cache"] = False
    return model_inputs


# ----------------------------------------------------------------------------------------------- history
class HistorySource:
    """Where the history NLL comes from; ``nll(model, model_inputs, inputs, layout)`` returns B×T float."""

    def nll(self, model, model_inputs: dict, inputs: dict, layout: BatchLayout) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class CachedHistory(HistorySource):
    """Looked up in an ``sstoken cache`` store (no forward)."""

    cache: Any  # sstoken.selection.history.NLLCache

    def nll(self, model, model_inputs, inputs, layout):
        return self.cache.lookup(inputs["input_ids"], layout.valid, layout.segment_ids)


@dataclass
class BaseModelHistory(HistorySource):
    """A no-grad pass of the model with its adapter disabled: the base model."""

    nll_chunk_size: int = 1024

    def nll(self, model, model_inputs, inputs, layout):
        from sstoken.selection.history import base_weights, history_forward_nll

        inner = unwrap_model(model)
        with base_weights(inner):
            return history_forward_nll(inner, model_inputs, inputs["labels"], self.nll_chunk_size)


@dataclass
class EMAModelHistory(HistorySource):
    """A no-grad pass of the model with the EMA weights swapped in."""

    ema: Any  # sstoken.selection.history.EMAHistory
    nll_chunk_size: int = 1024

    def nll(self, model, model_inputs, inputs, layout):
        from sstoken.selection.history import history_forward_nll

        return history_forward_nll(unwrap_model(model), model_inputs, inputs["labels"], self.nll_chunk_size,
                                   self.ema)


class CurrentModelHistory(HistorySource):
    """No separate history model (``sstoken inspect`` of a model without adapter): history = current, REL = 0."""

    def nll(self, model, model_inputs, inputs, layout):
        return None  # filled in from the current NLL by select_tokens


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class SignalSources:
    """Everything :func:`select_tokens` reads besides the model and the batch."""

    history: HistorySource | None = None  # None: the selector needs no history
    reference_cache: Any = None  # sstoken.selection.history.NLLCache of a reference model (rho1, tokencleaning)
    probe: Any = None  # sstoken.selection.attention.ContextShareProbe; None: no attention share
    sstoken_head: bool = True  # the model runs sstoken's head (lm_head.add_sstoken_head); False: full logits
    nll_chunk_size: int = 1024  # positions per chunk of per-token NLL from full logits
    head_stats: bool = False  # sstoken's head also sums entropy / argmax hits over the response (logged metrics)


@dataclass
class Selection:
    """What :func:`select_tokens` returns."""

    outputs: Any  # the model's outputs: ``kept_nll_sum`` through sstoken's head, else ``logits``
    layout: BatchLayout
    current_nll: torch.Tensor
    keep: torch.Tensor  # B×T bool
    signals: Signals | None  # None when not selecting (evaluation keeps every response token)
    weights: torch.Tensor | None = None  # B×T loss weight of each response token (used where kept); None: all 1


def select_tokens(model, inputs: dict, selector, sources: SignalSources, *, progress: float = 0.0,
                  draw_key: int | None = None, selecting: bool = True, dft: bool = False,
                  timer: PartTimer | None = None) -> Selection:
    """One forward of ``model`` over ``inputs`` (with ``labels``, and ``token_weights`` when the data has weights),
    selecting the tokens that carry the loss and their weights.

    ``dft``: each token is also weighted by its probability under the current model (Dynamic Fine-Tuning).
    With ``selecting=False`` (evaluation) no history, attention, selection or weighting is computed: every
    response token is kept with weight 1. Gradients flow as the caller's context allows (the trainer: with;
    inspect: under no_grad)."""

    def timed(name: str):
        return contextlib.nullcontext() if timer is None else timer(name)

    layout = BatchLayout.of(inputs)
    labels = inputs["labels"]
    model_inputs = model_inputs_of(inputs)
    history_nll = None
    if selecting and sources.history is not None:
        with timed("history"):
            nll_inputs = model_inputs
            if sources.sstoken_head:  # the history pass needs only the response tokens' NLL
                nll_inputs = dict(model_inputs, sstoken_head=lm_head.HeadRequest(labels=labels,
                                                                                 score_mask=layout.response))
            history_nll = sources.history.nll(model, nll_inputs, inputs, layout)
    captured = None
    chosen: dict = {}

    def select(current_nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Called inside the forward by sstoken's head, once the current NLL (and the attention share) exist.
        signals, weights = None, None
        keep = layout.response
        if selecting:
            signals = Signals(
                response_mask=layout.response,
                current_nll=current_nll,
                history_nll=current_nll.clone() if isinstance(sources.history, CurrentModelHistory) else history_nll,
                reference_nll=None if sources.reference_cache is None else sources.reference_cache.lookup(
                    inputs["input_ids"], layout.valid, layout.segment_ids),
                context_share=None if captured is None else captured.required_share(),
                segment_ids=layout.segment_ids,
                draw_key=draw_key,
                data_weights=inputs.get(TOKEN_WEIGHTS),
            )
            with timed("select"):
                keep = selector.select(signals, progress)
                weights = scoring.combined_weights(signals.data_weights, selector.weights(signals, progress),
                                                   scoring.dft_weights(current_nll) if dft else None)
            if weights is not None:
                weights = torch.where(layout.response, weights.to(current_nll.device), 0.0)
        chosen.update(signals=signals, current_nll=current_nll, keep=keep, weights=weights)
        return keep, weights

    if sources.sstoken_head:
        model_inputs["sstoken_head"] = lm_head.HeadRequest(labels=labels, score_mask=layout.response, select=select,
                                                           stats=sources.head_stats)
    with contextlib.ExitStack() as stack:
        if selecting and sources.probe is not None:
            captured = stack.enter_context(sources.probe.capture(
                layout.context, inputs.get("attention_mask"), inputs.get("position_ids"), timer=timer))
        outputs = model(**model_inputs)
    if not sources.sstoken_head:
        select(scoring.token_nll(outputs.logits.detach(), labels, sources.nll_chunk_size))
    return Selection(outputs=outputs, layout=layout, current_nll=chosen["current_nll"], keep=chosen["keep"],
                     signals=chosen["signals"], weights=chosen["weights"])

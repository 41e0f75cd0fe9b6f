"""The token selectors, chosen by name: full, random, rel, attn, sstoken, rho1, tokencleaning.

A selector turns the per-token signals of one batch into a keep mask. It declares which signals it needs
so the trainer computes only those (the attention share only if ``needs_attention``, and so on), and it
can tell how many tokens it will keep *before* the forward pass, which the trainer uses to normalise the
loss over a whole accumulated (and multi-rank) batch.

Adding a selector is one subclass of :class:`Selector` with a ``name`` (it registers itself in
:data:`SELECTORS`), a :meth:`~Selector.from_config` if it takes more than ρ, and its tests. Parameters are
checked once, here, whoever builds the selector (the trainer's config, ``sstoken inspect``, the recipes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sstoken.errors import ConfigError, did_you_mean
from sstoken.selection import scoring

logger = logging.getLogger(__name__)


@dataclass
class Signals:
    """What a selector may look at; every tensor is B×T, aligned to the predicted token."""

    response_mask: torch.Tensor
    current_nll: torch.Tensor
    history_nll: torch.Tensor | None = None
    reference_nll: torch.Tensor | None = None
    context_share: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    draw_key: int | None = None  # identifies the micro-batch (step, micro-batch, rank) for random draws
    data_weights: torch.Tensor | None = None  # the rows' token weights (the data's ``weight`` fields); None: all 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rho(rho) -> None:
    if not (_is_number(rho) and 0.0 < rho <= 1.0):
        raise ConfigError(f"rho must be in (0, 1], got {rho}")


def check_gamma(gamma) -> None:
    if not (_is_number(gamma) and 0.0 <= gamma <= 1.0):
        raise ConfigError(f"gamma must be in [0, 1], got {gamma}")


def check_attention_warmup(warmup_fraction) -> None:
    if not (_is_number(warmup_fraction) and 0.0 <= warmup_fraction < 1.0):
        raise ConfigError(f"attention_warmup must be in [0, 1), got {warmup_fraction}")


SELECTORS: dict[str, type["Selector"]] = {}
"""Selector classes by name, in definition order; every subclass with its own ``name`` is added."""


class Selector:
    name = "base"
    needs_history = False
    needs_attention = False
    needs_reference = False
    # expected_kept needs the batch's history and reference NLL before the forward pass (read from the caches)
    needs_cached_counts = False
    # why the selector cannot run on packed sequences (None: it can)
    cannot_pack_because: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SELECTORS[cls.name] = cls

    def __init__(self, rho: float = 0.6):
        check_rho(rho)
        self.rho = rho

    @classmethod
    def from_config(cls, rho: float, gamma: float, warmup_fraction: float, seed: int) -> "Selector":
        """The selector for these settings (each class takes the ones that apply to it)."""
        return cls(rho)

    def prepare(self, dataset, history_cache, reference_cache) -> None:
        """Called once by the trainer before training, with the (encoded) training set and the caches."""

    def expected_kept(self, response_mask: torch.Tensor, segment_ids: torch.Tensor | None = None,
                      signals_before_forward: Signals | None = None) -> int | None:
        """Tokens the selector will keep in this batch, known before the forward pass.

        ``None`` means the count depends on the forward's signals (a data-dependent budget): the trainer then
        divides the loss by the micro-batch's kept count, and refuses gradient accumulation or several ranks."""
        return int(scoring.keep_counts(response_mask, self.rho, segment_ids).sum().item())

    def select(self, signals: Signals, progress: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, signals: Signals, progress: float = 0.0) -> torch.Tensor | None:
        """Per-token loss weights (B×T, used on the kept tokens) besides the keep mask; None: every kept token
        weighs 1. They multiply the data's weights and DFT's. The loss still divides by the kept count (see
        :func:`sstoken.selection.scoring.step_mean`): a weight scales a kept token's gradient, and only
        :meth:`select` decides which tokens count."""
        return None


class FullSelector(Selector):
    """Plain SFT: every response token."""

    name = "full"

    def __init__(self, rho: float = 1.0):
        super().__init__(1.0)

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls()

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None) -> int:
        return int(response_mask.sum().item())

    def select(self, signals, progress=0.0):
        return signals.response_mask.clone()


class RandomSelector(Selector):
    """A uniformly random ceil(ρ·n) tokens of each sample.

    The draw depends only on ``seed`` and the micro-batch's ``draw_key`` (step, micro-batch, rank), not on how
    many draws came before, so a resumed run or another rank needs no saved generator state.
    """

    name = "random"

    def __init__(self, rho: float = 0.6, seed: int = 0):
        super().__init__(rho)
        self.seed = seed
        self._calls = 0

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(rho, seed)

    def select(self, signals, progress=0.0):
        key = signals.draw_key if signals.draw_key is not None else self._calls
        self._calls += 1
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + key) % (2**63))
        return scoring.random_mask(signals.response_mask, self.rho, generator, signals.segment_ids)


class SSTokenSelector(Selector):
    """γ·Norm(REL) + (1−γ)·Attn, top-ρ per sample; γ=0 during an optional attention-only warm-up."""

    name = "sstoken"
    needs_history = True
    needs_attention = True

    def __init__(self, rho: float = 0.6, gamma: float = 0.5, warmup_fraction: float = 0.0):
        super().__init__(rho)
        check_gamma(gamma)
        check_attention_warmup(warmup_fraction)
        self.gamma = gamma
        self.warmup_fraction = warmup_fraction
        self.needs_history = gamma > 0
        self.needs_attention = gamma < 1 or warmup_fraction > 0

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(rho, gamma, warmup_fraction)

    def gamma_at(self, progress: float) -> float:
        return scoring.gamma_at(progress, self.gamma, self.warmup_fraction)

    def select(self, signals, progress=0.0):
        gamma = self.gamma_at(progress)
        share = signals.context_share if signals.context_share is not None else torch.zeros_like(signals.current_nll)
        history = signals.history_nll if signals.history_nll is not None else signals.current_nll
        return scoring.sstoken_mask(history, signals.current_nll, share, signals.response_mask,
                                    gamma=gamma, rho=self.rho, segment_ids=signals.segment_ids)


class RELSelector(SSTokenSelector):
    """REL only (γ = 1)."""

    name = "rel"

    def __init__(self, rho: float = 0.6, warmup_fraction: float = 0.0):
        super().__init__(rho=rho, gamma=1.0, warmup_fraction=warmup_fraction)

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(rho, warmup_fraction)


class AttentionSelector(SSTokenSelector):
    """Attention share only (γ = 0)."""

    name = "attn"

    def __init__(self, rho: float = 0.6):
        super().__init__(rho=rho, gamma=0.0)

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(rho)


class Rho1Selector(Selector):
    """Rho-1: top-ρ per sample by excess loss, current NLL − reference-model NLL."""

    name = "rho1"
    needs_reference = True

    def select(self, signals, progress=0.0):
        if signals.reference_nll is None:
            raise ConfigError("rho1 needs the reference model's NLL (reference_cache)")
        scores = scoring.excess_loss(signals.current_nll, signals.reference_nll)
        return scoring.top_rho_mask(scores, signals.response_mask, self.rho, signals.segment_ids)


class TokenCleaningSelector(Selector):
    """TokenCleaning, fixed-model variant: keep tokens whose base − reference NLL clears one global threshold.

    The threshold is the global top-ρ quantile of that score over the whole training set, computed once from
    the base and reference caches (:meth:`fit`). Selection therefore does not depend on the current model.
    """

    name = "tokencleaning"
    needs_history = True
    needs_reference = True
    needs_cached_counts = True
    cannot_pack_because = "fits its threshold on whole samples before training"

    def __init__(self, rho: float = 0.6, threshold: float | None = None):
        super().__init__(rho)
        self.threshold = threshold

    def prepare(self, dataset, history_cache, reference_cache) -> None:
        """Fit the global threshold from the base (history) and reference caches of the whole training set."""
        from sstoken.selection.nll_cache import sample_key

        base, ref, masks = [], [], []
        for example in dataset:
            key = sample_key(torch.tensor(example["input_ids"]))
            base.append(history_cache.get(key))
            ref.append(reference_cache.get(key))
            masks.append(scoring.response_mask_from_labels(torch.tensor(example["labels"]).unsqueeze(0))[0])
        threshold = self.fit(base, ref, masks)
        logger.info("tokencleaning: global threshold %.4f keeps the top %.0f%% of tokens", threshold, 100 * self.rho)

    def fit(self, base_values: list[torch.Tensor], reference_values: list[torch.Tensor],
            response_masks: list[torch.Tensor]) -> float:
        scores = [(b - r)[m] for b, r, m in zip(base_values, reference_values, response_masks)]
        self.threshold = scoring.global_threshold(torch.cat(scores) if scores else torch.zeros(0), self.rho)
        return self.threshold

    def _mask(self, history_nll, reference_nll, response_mask):
        if self.threshold is None:
            raise ConfigError("tokencleaning needs its global threshold; the trainer fits it from the caches")
        scores = history_nll.float() - reference_nll.float()
        return scoring.threshold_mask(scores, response_mask, self.threshold)

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None) -> int:
        if signals_before_forward is None:
            raise ConfigError("tokencleaning counts kept tokens from the caches")
        s = signals_before_forward
        return int(self._mask(s.history_nll, s.reference_nll, response_mask).sum().item())

    def select(self, signals, progress=0.0):
        return self._mask(signals.history_nll, signals.reference_nll, signals.response_mask)


def make_selector(method: str, rho: float = 0.6, gamma: float = 0.5, warmup_fraction: float = 0.0,
                  seed: int = 0) -> Selector:
    """Build a selector by name. Every setting is checked, also those the named selector does not use, so that a
    config is valid or not whatever its method."""
    if method not in SELECTORS:
        raise ConfigError(f"selection_method {method!r} is not one of {', '.join(SELECTORS)}"
                          f"{did_you_mean(method, SELECTORS)}")
    check_rho(rho)
    check_gamma(gamma)
    check_attention_warmup(warmup_fraction)
    return SELECTORS[method].from_config(rho, gamma, warmup_fraction, seed)

"""Experimental reference-free selectors for the selection research of issue 11 (not shipped in the package).

Importing this module registers each variant with sstoken's selector registry, so the benchmarks can train them
by name (``python benchmarks/quality.py --methods x_lowrel ...``, ``benchmarks/real_data/run.py --methods
x_lowrel``). What each one did is logged in BENCHMARKS.md, "Selection research". A variant that wins on both
the synthetic-noise and the real-data benchmark moves into ``sstoken.selection`` under a real name.

All keep the top ceil(ρ·n) response tokens of each sample by their score, except ``x_batch`` (top ρ over the
micro-batch). REL = history NLL − current NLL; Norm = per-sample min-max.
"""

from __future__ import annotations

import torch

from sstoken import scoring
from sstoken.selection import Selector, Signals, SSTokenSelector


def position_baseline(response_mask: torch.Tensor) -> torch.Tensor:
    """The attention share a uniform attention would give each position: earlier context tokens / visible tokens.

    Assumes one right-padded sample per row (the benchmarks' batches)."""
    context_before = torch.cumsum((~response_mask).long(), dim=1).float()
    visible = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device).float().unsqueeze(0)
    return context_before / visible


class _ScoredVariant(SSTokenSelector):
    """A variant defined by a per-token score; uses the history and attention share only if its score does."""

    uses_history = True
    uses_attention = True

    def __init__(self, rho: float = 0.6, gamma: float = 0.5):
        super().__init__(rho=rho, gamma=gamma)
        self.needs_history = self.uses_history
        self.needs_attention = self.uses_attention

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(rho, gamma)

    def scores(self, s: Signals) -> torch.Tensor:
        raise NotImplementedError

    def select(self, signals, progress=0.0):
        scores = torch.where(signals.response_mask, self.scores(signals).float(), float("-inf"))
        return scoring.top_rho_mask(scores, signals.response_mask, self.rho, signals.segment_ids)

    @staticmethod
    def norm_rel(s: Signals) -> torch.Tensor:
        rel = scoring.retrospective_excess_loss(s.history_nll.float(), s.current_nll.float())
        return scoring.minmax_normalize(rel, s.response_mask, s.segment_ids)

    @staticmethod
    def share(s: Signals) -> torch.Tensor:
        return s.context_share.float() if s.context_share is not None else torch.zeros_like(s.current_nll)


class BatchBudgetVariant(_ScoredVariant):
    """ssToken's score, top ρ over the whole micro-batch instead of each sample."""

    name = "x_batch"

    def scores(self, s):
        return scoring.sstoken_scores(s.history_nll, s.current_nll, self.share(s), s.response_mask, self.gamma,
                                      s.segment_ids)

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None) -> int:
        return scoring.keep_count(int(response_mask.sum().item()), self.rho)

    def select(self, signals, progress=0.0):
        scores = torch.where(signals.response_mask, self.scores(signals).float(), float("-inf"))
        flat = scoring.top_rho_mask(scores.reshape(1, -1), signals.response_mask.reshape(1, -1), self.rho)
        return flat.view_as(signals.response_mask)


class DebiasedVariant(_ScoredVariant):
    """γ·Norm(REL) + (1−γ)·Norm(share / position baseline): the attention share without its position bias."""

    name = "x_debiased"

    def scores(self, s):
        ratio = self.share(s) / position_baseline(s.response_mask).clamp(min=1e-6)
        attention = scoring.minmax_normalize(ratio, s.response_mask, s.segment_ids)
        return self.gamma * self.norm_rel(s) + (1 - self.gamma) * attention


class PlausibleVariant(_ScoredVariant):
    """Keep what the frozen base model finds most plausible: −(base NLL)."""

    name = "x_plausible"
    uses_attention = False

    def scores(self, s):
        return -s.history_nll.float()


class SmallLossVariant(_ScoredVariant):
    """The noisy-label 'small loss' rule: −(current NLL)."""

    name = "x_smallloss"
    uses_history = False
    uses_attention = False

    def scores(self, s):
        return -s.current_nll.float()


class PlausibleSSTokenVariant(_ScoredVariant):
    """ssToken's signals plus base plausibility: (Norm(REL) + Attn + 1 − Norm(base NLL)) / 3."""

    name = "x_sst_plausible"

    def scores(self, s):
        plausibility = 1 - scoring.minmax_normalize(s.history_nll.float(), s.response_mask, s.segment_ids)
        return (self.norm_rel(s) + self.share(s) + plausibility) / 3


class LowRELVariant(_ScoredVariant):
    """The opposite of REL only: −Norm(REL), keep what the model has learnt least since the history."""

    name = "x_lowrel"
    uses_attention = False

    def scores(self, s):
        return -self.norm_rel(s)


# ------------------------------------------------------------------------------------------------ round 2
# Oracles (an upper bound for token selection on the synthetic benchmark, not a method): the quality benchmark
# hands them the generator's per-token noise record as their "reference NLL" (a cache whose value per token is
# its NOISE_CODES code), so they keep exactly the response tokens whose kind they do not drop. ρ is ignored.
NOISE_CODES = {"clean": 0, "boilerplate": 1, "wrong_fact": 2, "corrupt": 3}


class _OracleVariant(Selector):
    """Keeps every response token except those of the noise kinds in ``drops`` (read from the noise record)."""

    needs_reference = True
    needs_cached_counts = True  # the record is known before the forward: the kept count is exact
    cannot_pack_because = "reads the per-sample noise record"
    drops: frozenset[str] = frozenset()

    def __init__(self, rho: float = 1.0):
        super().__init__(1.0)

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls()

    def _mask(self, noise_codes: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        codes = noise_codes.round().long()
        dropped = torch.zeros_like(response_mask)
        for kind in self.drops:
            dropped |= codes == NOISE_CODES[kind]
        return response_mask & ~dropped.to(response_mask.device)

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None) -> int:
        return int(self._mask(signals_before_forward.reference_nll, response_mask).sum().item())

    def select(self, signals, progress=0.0):
        return self._mask(signals.reference_nll, signals.response_mask)


class OracleClean(_OracleVariant):
    """Exactly the clean tokens (every noise kind dropped)."""

    name = "x_oracle_clean"
    drops = frozenset({"boilerplate", "wrong_fact", "corrupt"})


class OracleKeepWrong(_OracleVariant):
    """Boilerplate and corrupt words dropped, wrong facts kept (what a selector blind to wrong facts can reach)."""

    name = "x_oracle_keep_wrong"
    drops = frozenset({"boilerplate", "corrupt"})


class OracleDropBoilerplate(_OracleVariant):
    name = "x_oracle_drop_boilerplate"
    drops = frozenset({"boilerplate"})


class OracleDropWrong(_OracleVariant):
    name = "x_oracle_drop_wrong"
    drops = frozenset({"wrong_fact"})


class OracleDropCorrupt(_OracleVariant):
    name = "x_oracle_drop_corrupt"
    drops = frozenset({"corrupt"})


ORACLES = ("x_oracle_clean", "x_oracle_keep_wrong", "x_oracle_drop_boilerplate", "x_oracle_drop_wrong",
           "x_oracle_drop_corrupt")

VARIANTS = ("x_batch", "x_debiased", "x_plausible", "x_smallloss", "x_sst_plausible", "x_lowrel")
# The quality benchmark's method table: which caches each variant reads.
QUALITY_METHODS = {name: {"selection_method": name, "base_cache": name != "x_smallloss"} for name in VARIANTS}
# (needs_cached_counts reads the history cache too, so the oracles get the base cache as well)
QUALITY_METHODS.update({name: {"selection_method": name, "noise_cache": True, "base_cache": True} for name in ORACLES})

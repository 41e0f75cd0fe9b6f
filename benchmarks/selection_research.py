"""Experimental reference-free selectors for the selection research (BENCHMARKS.md, "Selection research"; not shipped in the package).

Importing this module registers each variant with sstoken's selector registry, so the benchmarks can train them
by name (``python benchmarks/quality.py --methods x_lowrel ...``, ``benchmarks/real_data/run.py --methods
x_lowrel``). What each one did is logged in BENCHMARKS.md, "Selection research". A variant that wins on both
the synthetic-noise and the real-data benchmark moves into ``sstoken.selection`` under a real name.

Round 1 variants keep the top ceil(ρ·n) response tokens of each sample by their score, except ``x_batch`` (top ρ
over the micro-batch). REL = history NLL − current NLL; Norm = per-sample min-max.

Round 2 adds: oracles that read the synthetic benchmark's noise record (``x_oracle_*``: the ceiling of token
selection there, not methods), data-dependent budgets (``x_adapt_outlier``, ``x_adapt_rho``, ``x_stuck``: their
``expected_kept`` is None and the trainer divides by the micro-batch's kept count), ``x_midrel``, prompt
grounding (``x_grounded`` from a no-prompt base-NLL cache, ``x_grounded_cur`` from the current model through
:class:`NoPromptCurrentHistory`), global budgets on the best-separating signals (``x_plausible_global``,
``x_lowrel_batch``), and ``x_full_probe`` (full SFT that records every signal for the separation analysis).
ssToken's EMA-history and attention-layer settings are plain entries of :data:`QUALITY_METHODS`.
"""

from __future__ import annotations

import torch

from sstoken.selection import scoring
from sstoken.selection.selectors import FullSelector, Selector, Signals, SSTokenSelector


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
NOISE_CODES = {"clean": 0, "boilerplate": 1, "wrong_fact": 2, "corrupt": 3, "answer": 0}  # an answer is clean


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


class OracleCleanSamples(_OracleVariant):
    """Sample-level oracle: every token of the samples that carry no noise at all, nothing of the others."""

    name = "x_oracle_clean_samples"

    def _mask(self, noise_codes, response_mask):
        noisy = ((noise_codes.round().long() != 0) & response_mask.to(noise_codes.device)).any(dim=1, keepdim=True)
        return response_mask & ~noisy.to(response_mask.device)


# Data-dependent budgets (their kept count is known only after the forward: expected_kept is None, and the
# trainer divides by the micro-batch's kept count). One sample per row (no packing).
OUTLIER_K = 2.0  # robust z (median / 1.4826·MAD) above which a token is an outlier of its sample
OUTLIER_FLOOR = 0.25  # nats: the smallest spread used, so a sample of equal losses drops nothing
ADAPT_QUANTILE = 0.8  # x_adapt_rho: the batch quantile of the current NLL
ADAPT_MIN_RHO = 0.2
STUCK_MIN_LEARNT = 0.1  # nats: x_stuck drops nothing from a sample whose median REL is below this


def robust_outliers(values: torch.Tensor, response_mask: torch.Tensor, k: float = OUTLIER_K,
                    floor: float = OUTLIER_FLOOR) -> torch.Tensor:
    """B×T: response tokens whose value exceeds their sample's median by more than k·max(1.4826·MAD, floor)."""
    out = torch.zeros_like(response_mask)
    for b in range(values.shape[0]):
        sel = response_mask[b]
        if not sel.any():
            continue
        v = values[b][sel].float()
        median = v.median()
        spread = max(1.4826 * float((v - median).abs().median()), floor)
        out[b] = sel & (values[b].float() > median + k * spread)
    return out


class _AdaptiveVariant(_ScoredVariant):
    cannot_pack_because = "sets a budget per padded row (one sample per row)"

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None):
        return None


class AdaptiveOutlierVariant(_AdaptiveVariant):
    """Keep every token of a sample except the outliers of its current NLL (robust z > OUTLIER_K)."""

    name = "x_adapt_outlier"
    uses_history = False
    uses_attention = False

    def select(self, signals, progress=0.0):
        return signals.response_mask & ~robust_outliers(signals.current_nll, signals.response_mask)


class AdaptiveRhoVariant(_AdaptiveVariant):
    """ssToken's score, but ρ_s per sample = its share of tokens whose current NLL is below the batch's
    ADAPT_QUANTILE quantile (at least ADAPT_MIN_RHO): a sample that looks clean keeps more."""

    name = "x_adapt_rho"

    def select(self, signals, progress=0.0):
        response = signals.response_mask
        current = signals.current_nll.float()
        tau = torch.quantile(current[response], ADAPT_QUANTILE) if response.any() else current.new_tensor(0.0)
        scores = scoring.sstoken_scores(signals.history_nll, signals.current_nll, self.share(signals), response,
                                        self.gamma, signals.segment_ids).float()
        keep = torch.zeros_like(response)
        for b in range(response.shape[0]):
            n = int(response[b].sum())
            if n == 0:
                continue
            rho_s = max(ADAPT_MIN_RHO, float(((current[b] <= tau) & response[b]).sum()) / n)
            keep[b] = scoring.top_rho_mask(torch.where(response[b], scores[b], float("-inf")).unsqueeze(0),
                                           response[b].unsqueeze(0), min(1.0, rho_s))[0]
        return keep


class StuckVariant(_AdaptiveVariant):
    """Own idea (novel-and-wrong vs novel-and-right by training dynamics): drop the tokens that stay hard while
    the rest of their sample is learnt: REL below half the sample's median REL *and* current NLL above the
    sample's median; keep everything else (and all of a sample whose median REL is below STUCK_MIN_LEARNT)."""

    name = "x_stuck"
    uses_attention = False

    def select(self, signals, progress=0.0):
        response = signals.response_mask
        current = signals.current_nll.float()
        rel = scoring.retrospective_excess_loss(signals.history_nll.float(), current)
        keep = response.clone()
        for b in range(response.shape[0]):
            sel = response[b]
            if not sel.any():
                continue
            learnt = float(rel[b][sel].median())
            if learnt < STUCK_MIN_LEARNT:
                continue
            stuck = sel & (rel[b] < 0.5 * learnt) & (current[b] > current[b][sel].median())
            keep[b] = sel & ~stuck
        return keep


class MidRELVariant(_ScoredVariant):
    """Own idea 2: drop both ends of REL (the most-learnt, e.g. memorised filler, and the least-learnt, e.g.
    unlearnable noise): score −|Norm(REL) − 0.5|, top ρ."""

    name = "x_midrel"
    uses_attention = False

    def scores(self, s):
        return -(self.norm_rel(s) - 0.5).abs()


class GroundedVariant(_ScoredVariant):
    """Own idea 3 (novel-and-right is supported by the prompt, novel-and-wrong is not): keep the tokens the prompt
    helps the frozen base model predict most, score = base NLL without the prompt − base NLL with it (the
    pointwise mutual information with the prompt). The no-prompt NLL arrives as the reference NLL (a cache built
    by the benchmark from the base model; no reference model is trained)."""

    name = "x_grounded"
    uses_attention = False
    needs_reference = True

    def scores(self, s):
        return s.reference_nll.float() - s.history_nll.float()


class _ImperfectOracle(Selector):
    """An oracle with errors: drops each noise token with probability ``recall`` and each clean token with
    probability ``false_drop``, fresh draws every micro-batch (seeded by the run's seed and the micro-batch's
    draw key). The grid over (recall, false_drop) maps how good a detector must be to reach the issue's bar."""

    needs_reference = True
    cannot_pack_because = "reads the per-sample noise record"
    recall = 1.0
    false_drop = 0.0

    def __init__(self, rho: float = 1.0, seed: int = 0):
        super().__init__(1.0)
        self.seed = seed
        self._calls = 0

    @classmethod
    def from_config(cls, rho, gamma, warmup_fraction, seed):
        return cls(seed=seed)

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None):
        return None

    def select(self, signals, progress=0.0):
        key = signals.draw_key if signals.draw_key is not None else self._calls
        self._calls += 1
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + key + 7) % (2**63))
        u = torch.rand(signals.response_mask.shape, generator=generator).to(signals.response_mask.device)
        noisy = signals.reference_nll.round().long() != 0
        drop = torch.where(noisy, u < self.recall, u < self.false_drop)
        return signals.response_mask & ~drop


IMPERFECT_ORACLES = []
for _recall in (0.5, 0.8, 1.0):
    for _false in (0.0, 0.2, 0.4):
        if (_recall, _false) == (1.0, 0.0):
            continue  # that is x_oracle_clean
        _name = f"x_oracle_r{_recall}_f{_false}"
        type(f"ImperfectOracle_{len(IMPERFECT_ORACLES)}", (_ImperfectOracle,),
             {"name": _name, "recall": _recall, "false_drop": _false})
        IMPERFECT_ORACLES.append(_name)


class NoPromptCurrentHistory:
    """A history source (sstoken.selection.signals.HistorySource protocol) for ``x_grounded_cur``: the *current* model's
    per-token NLL of the response with the system and user turns cut off (each row from its last
    ``<|im_start|>`` before the response), at the response positions of the full row; no gradient, eval mode.

    The quality benchmark swaps it in for that method (``"history_source": "noprompt_current"``); ssToken's own
    history sources are untouched."""

    def __init__(self, start_token_id: int, pad_id: int = 0):
        self.start_token_id = start_token_id
        self.pad_id = pad_id

    def nll(self, model, model_inputs, inputs, layout):
        from sstoken.batch import unwrap_model

        ids, labels = inputs["input_ids"], inputs["labels"]
        batch, length = ids.shape
        cuts, rows = [], []
        for b in range(batch):
            valid = int(layout.valid[b].sum())
            resp = layout.response[b].nonzero().flatten()
            first = int(resp[0]) if len(resp) else valid
            cut = last_turn_start(ids[b, :first].tolist(), self.start_token_id)
            cuts.append(cut)
            rows.append((ids[b, cut:valid], labels[b, cut:valid]))
        width = max(len(r[0]) for r in rows)
        cut_ids = ids.new_full((batch, width), self.pad_id)
        cut_labels = labels.new_full((batch, width), scoring.IGNORE_INDEX)
        mask = ids.new_zeros((batch, width))
        for b, (row_ids, row_labels) in enumerate(rows):
            cut_ids[b, :len(row_ids)], cut_labels[b, :len(row_ids)], mask[b, :len(row_ids)] = row_ids, row_labels, 1
        inner = unwrap_model(model)
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                logits = inner(input_ids=cut_ids, attention_mask=mask, use_cache=False).logits
        finally:
            inner.train(was_training)
        cut_nll = scoring.token_nll(logits.detach(), cut_labels)
        out = torch.zeros(batch, length, dtype=torch.float32, device=ids.device)
        for b, (row_ids, _) in enumerate(rows):
            out[b, cuts[b]:cuts[b] + len(row_ids)] = cut_nll[b, :len(row_ids)]
        return out


class CurrentGroundedVariant(_ScoredVariant):
    """Own idea 3b: x_grounded with the current model instead of the frozen base: score = current NLL without the
    prompt − current NLL with it (the history slot carries the no-prompt NLL, see NoPromptCurrentHistory). A
    token the model has learnt to emit whatever the prompt (filler) or cannot predict either way (corruption)
    scores ~0; one the prompt makes likely (a copied or computed answer) scores high."""

    name = "x_grounded_cur"
    uses_attention = False

    def scores(self, s):
        return s.history_nll.float() - s.current_nll.float()


class FullProbe(FullSelector):
    """Full SFT (every response token, the same loss as ``full``) that still asks for every reference-free signal
    (base NLL, attention share, and, as its reference NLL, the base NLL without the prompt), so the quality
    benchmark can measure how well each signal separates noise from clean tokens along a full-SFT run."""

    name = "x_full_probe"
    needs_history = True
    needs_attention = True
    needs_reference = True


def last_turn_start(prompt_ids: list[int], start_token_id: int) -> int:
    """Where the last ``<|im_start|>`` of a prompt is (the response's own turn header): the row without its
    prompt starts there. A prompt without one keeps only its last token."""
    starts = [t for t, token in enumerate(prompt_ids) if token == start_token_id]
    return starts[-1] if starts else max(len(prompt_ids) - 1, 0)


def auc(noise_scores: torch.Tensor, clean_scores: torch.Tensor) -> float:
    """P(score of a noise token > score of a clean token), ties counted half (the ROC area)."""
    scores = torch.cat([noise_scores, clean_scores]).double()
    ranks = torch.empty_like(scores)
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks of ties
    unique, inverse = torch.unique(sorted_scores, return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order]) / \
        torch.bincount(inverse).double()
    ranks[order] = mean_rank[inverse]
    n_noise, n_clean = len(noise_scores), len(clean_scores)
    return float((ranks[:n_noise].sum() - n_noise * (n_noise + 1) / 2) / (n_noise * n_clean))


def false_drop_at_recall(noise_scores: torch.Tensor, clean_scores: torch.Tensor, recall: float = 0.9) -> float:
    """Share of clean tokens a global threshold drops when it drops ``recall`` of the noise (higher = noisier)."""
    threshold = torch.quantile(noise_scores.double(), 1 - recall)
    return float((clean_scores.double() >= threshold).double().mean())


# Signals whose "higher = more noise-like" orientation is tried both ways; see quality.SignalRecorder.
PROBE_SIGNALS = ("base_nll", "current_nll", "rel", "context_share", "grounding")
PROBE_SIGNALS = PROBE_SIGNALS + tuple(f"{name}_in_sample" for name in PROBE_SIGNALS)


class PlausibleGlobalVariant(Selector):
    """x_plausible with one global threshold instead of a per-sample budget (the signal with the best ROC area in
    the probe): keep a token iff its base NLL is within the lowest ρ of all training response tokens (the
    threshold is fitted once from the base cache, as TokenCleaning fits its own; no reference model)."""

    name = "x_plausible_global"
    needs_history = True
    cannot_pack_because = "fits its threshold on whole samples before training"

    def __init__(self, rho: float = 0.6, threshold: float | None = None):
        super().__init__(rho)
        self.threshold = threshold

    def prepare(self, dataset, history_cache, reference_cache) -> None:
        from sstoken.selection.nll_cache import sample_key

        scores = []
        for example in dataset:
            base = history_cache.get(sample_key(torch.tensor(example["input_ids"])))
            mask = scoring.response_mask_from_labels(torch.tensor(example["labels"]).unsqueeze(0))[0]
            scores.append(-base[mask])
        self.threshold = scoring.global_threshold(torch.cat(scores), self.rho)

    def expected_kept(self, response_mask, segment_ids=None, signals_before_forward=None):
        return None  # exact after the forward (the mask depends on the cached base NLL only)

    def select(self, signals, progress=0.0):
        return scoring.threshold_mask(-signals.history_nll.float(), signals.response_mask, self.threshold)


class LowRELBatchVariant(BatchBudgetVariant):
    """x_lowrel with the budget over the micro-batch: keep the ρ of the batch's tokens with the lowest REL
    (no per-sample min-max), the probe's second-best signal used globally."""

    name = "x_lowrel_batch"
    uses_attention = False

    def scores(self, s):
        return -scoring.retrospective_excess_loss(s.history_nll.float(), s.current_nll.float())


ORACLES = ("x_oracle_clean", "x_oracle_keep_wrong", "x_oracle_drop_boilerplate", "x_oracle_drop_wrong",
           "x_oracle_drop_corrupt", "x_oracle_clean_samples")

VARIANTS = ("x_batch", "x_debiased", "x_plausible", "x_smallloss", "x_sst_plausible", "x_lowrel", "x_adapt_outlier",
            "x_adapt_rho", "x_stuck", "x_midrel", "x_lowrel_batch")
# The quality benchmark's method table: which caches each variant reads.
QUALITY_METHODS = {name: {"selection_method": name, "base_cache": name not in ("x_smallloss", "x_adapt_outlier")}
                   for name in VARIANTS}
# ssToken exactly as the paper defines it, with other settings of its existing options (history, attention layer).
for _decay in (0.9, 0.99, 0.999):
    for _interval in (1, 10):
        QUALITY_METHODS[f"x_sst_ema{_decay}_i{_interval}"] = {"selection_method": "sstoken", "history": "ema",
                                                             "ema_decay": _decay, "ema_interval": _interval}
QUALITY_METHODS["x_plausible_global"] = {"selection_method": "x_plausible_global", "base_cache": True}
QUALITY_METHODS["x_grounded"] = {"selection_method": "x_grounded", "base_cache": True, "noprompt_cache": True}
QUALITY_METHODS["x_grounded_cur"] = {"selection_method": "x_grounded_cur", "history_source": "noprompt_current"}
QUALITY_METHODS["x_full_probe"] = {"selection_method": "x_full_probe", "base_cache": True, "noprompt_cache": True,
                                    "record_signals": True}
QUALITY_METHODS["x_sst_layer0"] = {"selection_method": "sstoken", "base_cache": True, "attention_layer": 0}
QUALITY_METHODS["x_attn_layer0"] = {"selection_method": "attn", "attention_layer": 0}
# (needs_cached_counts reads the history cache too, so the oracles get the base cache as well)
QUALITY_METHODS.update({name: {"selection_method": name, "noise_cache": True, "base_cache": True} for name in ORACLES})
QUALITY_METHODS.update({name: {"selection_method": name, "noise_cache": True} for name in IMPERFECT_ORACLES})

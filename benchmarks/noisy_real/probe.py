"""``python benchmarks/noisy_real/probe.py``: do ssToken's signals pick out noise on a real pretrained model?

For each model (Gemma-3-270M base, SmolLM2-135M-Instruct) and seed, a short LoRA full-SFT run on the noisy
ShareGPT mix (``data.py``, noise from the catalogue) is stopped twice, early (after a quarter of its steps) and
late (at the end), to score a separate set of noisy probe rows through sstoken's own pipeline
(:func:`sstoken.selection.signals.select_tokens`): one no-grad forward of the current model with the attention
share captured at the first, a middle and the last layer (each head and their mean), the EMA history's NLL from the
trainer's EMA (decay :data:`EMA_DECAY`), and the base model's NLL from a cache built once. Per response token:

    base_nll, ema_nll, current_nll, rel_base (= base − current), rel_ema (= EMA − current),
    share_first / share_middle / share_last (heads averaged), share_<layer>_h<i> (one head),
    position (place in the response, 0 → 1), uniform_share (the share a uniform attention would give),
    sstoken_score (γ = 0.5: ½·Norm(rel_base) + ½·share_last, what ssToken ranks), sstoken_ema_score,

and each signal min-max normalised within its sample (``*_in_sample``), as a top-ρ-per-sample selector ranks it.
For each noise kind against the clean tokens: the ROC area P(noise scores higher than clean) and the share of clean
tokens a threshold drops when it catches 90% of that noise (the better orientation), as in the synthetic probe
(``benchmarks/quality.py``, ``x_full_probe``). ssToken keeps high scores, so it drops a kind only where that
kind's area is below 0.5.

    python benchmarks/noisy_real/probe.py --workers 2          # resumable: one file per (model, seed)
    python benchmarks/noisy_real/probe.py --report-only        # tables and chart from the saved runs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402  (puts benchmarks/ and benchmarks/real_data/ on the path)
import noise  # noqa: E402
import run as real_run  # noqa: E402  (benchmarks/real_data/run.py)
import selection_research  # noqa: E402
from runner import claim, release, run_workers  # noqa: E402

from sstoken.selection.selectors import FullSelector  # noqa: E402

EMA_DECAY = 0.9  # a history that lags ~10 steps: in a 16-step run the default 0.99 would stay near the base model
EARLY = 0.25  # the early probe: after this fraction of the steps (at step 0 REL is 0 everywhere: LoRA's B = 0)
GAMMA = 0.5
BASE_SIGNALS = ("base_nll", "ema_nll", "current_nll", "rel_base", "rel_ema", "share_first", "share_middle",
                "share_last", "position", "uniform_share", "sstoken_score", "sstoken_ema_score")
SIGNALS = BASE_SIGNALS + tuple(f"{s}_in_sample" for s in BASE_SIGNALS if s != "position")


class EMAFullSelector(FullSelector):
    """Full SFT (every response token) that asks for a history, so the trainer keeps and updates the EMA history
    the probe reads; the per-step EMA pass is the only change to a full-SFT run."""

    name = "x_full_ema"
    needs_history = True


class LayerShares:
    """The attention-probe interface of :class:`~sstoken.selection.signals.SignalSources` over several layers: in
    the one forward, each library :class:`~sstoken.selection.attention.ContextShareProbe` captures its layer's
    per-head shares; ``last`` holds them (layer name -> B×H×T) after the forward."""

    def __init__(self, model, layers: dict[str, int], main: str, chunk_size: int = 256):
        from sstoken.selection.attention import ContextShareProbe

        self.probes = {name: ContextShareProbe(model, layer=index, chunk_size=chunk_size)
                       for name, index in layers.items()}
        self.layers = {name: probe.layer_index for name, probe in self.probes.items()}
        if len(set(self.layers.values())) != len(self.layers):
            raise ValueError(f"layers must differ, got {self.layers}")
        self.main = main
        self.last: dict = {}

    @contextlib.contextmanager
    def capture(self, context_mask, attention_mask=None, position_ids=None, timer=None):
        with contextlib.ExitStack() as stack:
            caps = {name: stack.enter_context(probe.capture(context_mask, attention_mask, position_ids, timer=timer,
                                                            per_head=True))
                    for name, probe in self.probes.items()}
            yield caps[self.main]
            self.last = {name: cap.head_shares for name, cap in caps.items()}


def probe_layers(model) -> dict[str, int]:
    n = model.config.get_text_config().num_hidden_layers
    return {"first": 0, "middle": n // 2, "last": n - 1}


# ------------------------------------------------------------------------------------------------ recording
class TokenTable:
    """Every probed response token: its noise kind, each signal, and each head's share, per phase."""

    def __init__(self):
        self.phases: dict[str, dict[str, list]] = {}

    def add(self, phase: str, rows: list[dict], signals, heads: dict):
        import torch

        from sstoken.selection import scoring

        s = signals
        response = s.response_mask.cpu()
        base, ema, current = (t.float().cpu() for t in (s.reference_nll, s.history_nll, s.current_nll))
        shares = {name: h.float().cpu() for name, h in heads.items()}
        values = {"base_nll": base, "ema_nll": ema, "current_nll": current, "rel_base": base - current,
                  "rel_ema": ema - current, **{f"share_{n}": h.mean(1) for n, h in shares.items()},
                  "uniform_share": selection_research.position_baseline(response)}
        in_response = response.long().cumsum(1).float()
        values["position"] = in_response / response.sum(1, keepdim=True).clamp(min=1).float()
        norm = {name: scoring.minmax_normalize(v, response) for name, v in values.items()}
        # What ssToken ranks by, computed by the library's own function (0 outside the response, never read here).
        values["sstoken_score"] = scoring.sstoken_scores(base, current, values["share_last"], response, GAMMA)
        values["sstoken_ema_score"] = scoring.sstoken_scores(ema, current, values["share_last"], response, GAMMA)
        for name in ("sstoken_score", "sstoken_ema_score"):
            norm[name] = scoring.minmax_normalize(values[name], response)
        table = self.phases.setdefault(phase, {"kind": []})
        for b, row in enumerate(rows):
            positions = torch.nonzero(response[b, :len(row["input_ids"])]).flatten()
            table["kind"] += [row["kinds"][t] or "clean" for t in positions.tolist()]
            for name in BASE_SIGNALS:
                table.setdefault(name, []).append(values[name][b, positions])
                if name != "position":
                    table.setdefault(f"{name}_in_sample", []).append(norm[name][b, positions])
            for layer, h in shares.items():
                for head in range(h.shape[1]):
                    table.setdefault(f"share_{layer}_h{head}", []).append(h[b, head, positions])

    def statistics(self, targets: dict[str, tuple[str, ...]]) -> dict:
        """Per phase: token counts; per signal and target, the ROC area P(noise > clean), the better orientation,
        and the clean tokens dropped at 90% noise recall; per head, the area alone."""
        import torch

        out = {}
        for phase, table in self.phases.items():
            kinds = table["kind"]
            clean = torch.tensor([k == "clean" for k in kinds])
            masks = {t: torch.tensor([k in members for k in kinds]) for t, members in targets.items()}
            entry = {"tokens": {k: kinds.count(k) for k in sorted(set(kinds))}, "signals": {}, "heads": {}}
            for name, parts in table.items():
                if name == "kind":
                    continue
                values = torch.cat(parts)
                for target, is_noise in masks.items():
                    if not is_noise.any() or not clean.any():
                        continue
                    area = selection_research.auc(values[is_noise], values[clean])
                    if name in SIGNALS:
                        sign = 1.0 if area >= 0.5 else -1.0
                        entry["signals"].setdefault(name, {})[target] = {
                            "auc_noise_high": area, "auc": max(area, 1 - area),
                            "noise_is": "high" if sign > 0 else "low",
                            "clean_dropped_at_90pct_noise_recall": selection_research.false_drop_at_recall(
                                sign * values[is_noise], sign * values[clean], 0.9)}
                    else:
                        entry["heads"].setdefault(name, {})[target] = area
            out[phase] = entry
        return out


def targets_of(catalogue: noise.Catalogue) -> dict[str, tuple[str, ...]]:
    kinds = tuple(k for k, spec in catalogue.kinds.items() if spec.rate > 0)
    return {"noise": kinds, **{k: (k,) for k in kinds}}


def measure(trainer, rows: list[dict], base_cache, shares: LayerShares, table: TokenTable, phase: str,
            batch_size: int = 8) -> None:
    """Score ``rows`` with the model as it stands, through the training pipeline's signal sources."""
    import torch

    from sstoken.batch import pad_rows
    from sstoken.selection.signals import EMAModelHistory, SignalSources, select_tokens

    model = trainer.model
    sources = SignalSources(history=EMAModelHistory(trainer.ema, trainer.args.nll_chunk_size),
                            reference_cache=base_cache, probe=shares,
                            sstoken_head=trainer.full_logits_reason is None)
    pad = trainer.processing_class.pad_token_id or 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                ids, labels, mask = pad_rows(batch, pad)
                inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask}
                selection = select_tokens(model, inputs, trainer.selector, sources)
                table.add(phase, batch, selection.signals, shares.last)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ one unit
def unit_name(model: str, seed: int) -> str:
    return f"probe-{model}-seed{seed}.json"


def prepare_caches(size: str, models: list[str], home: Path, catalogue: noise.Catalogue) -> None:
    """The base model's NLL over the probe rows, once per model (what every seed's REL starts from)."""
    from sstoken.selection.nll_cache import build_nll_cache

    texts = data.build_texts(data.read_pool(home), data.SHAPES[size], catalogue)
    train_size = data.TRAIN_SIZES[size]
    for model_name in models:
        path = data.cache_dir(home, size, model_name, catalogue) / "probe-base"
        if (path / "index.json").exists():
            continue
        started = time.time()
        model, tokenizer = data.load(model_name, home)
        rows, _ = data.encode_rows(tokenizer, texts.probe, train_size.max_length, both_fit=False)
        build_nll_cache(model, tokenizer, real_run.plain_rows(rows), str(path), train_size.max_length,
                        progress=False)
        print(f"{model_name}: base NLL of {len(rows)} probe rows cached in {time.time() - started:.0f}s", flush=True)


def run_unit(size: str, model_name: str, seed: int, home: Path, catalogue: noise.Catalogue) -> dict:
    from transformers import TrainerCallback

    from sstoken.selection.nll_cache import NLLCache

    started = time.time()
    texts = data.build_texts(data.read_pool(home), data.SHAPES[size], catalogue)
    train_size = data.TRAIN_SIZES[size]
    model, tokenizer = data.load(model_name, home)
    train_rows, _ = data.encode_rows(tokenizer, texts.train, train_size.max_length)
    probe_rows, _ = data.encode_rows(tokenizer, texts.probe, train_size.max_length, both_fit=False)
    base_cache = NLLCache.open(str(data.cache_dir(home, size, model_name, catalogue) / "probe-base"),
                               role="reference cache")
    layers = probe_layers(model)
    table = TokenTable()
    steps = -(-len(train_rows) // train_size.batch_size) * train_size.epochs
    early_step = max(1, round(EARLY * steps))
    timings = {}

    class Probe(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer
            self.shares = LayerShares(trainer.model, layers, main="last")

        def _measure(self, phase, step):
            t0 = time.time()
            measure(self.trainer, probe_rows, base_cache, self.shares, table, phase)
            timings[phase] = {"step": step, "seconds": round(time.time() - t0, 1)}
            print(f"    {model_name} seed {seed}: {phase} probe at step {step} ({timings[phase]['seconds']:.0f}s)",
                  flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == early_step:
                self._measure("early", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self._measure("late", state.global_step)

    with tempfile.TemporaryDirectory() as tmp:
        _, summary = real_run.train_lora(model, tokenizer, train_rows, seed, train_size, Path(tmp),
                                         setup=lambda trainer: trainer.add_callback(Probe(trainer)),
                                         selection_method=EMAFullSelector.name, history="ema", ema_decay=EMA_DECAY)
    return {"model": model_name, "model_name": data.MODEL_NAMES[model_name], "seed": seed, "size": size,
            "layers": layers, "heads": model.config.get_text_config().num_attention_heads,
            "rows": {"train": len(train_rows), "probe": len(probe_rows)}, "steps": steps, "train": summary,
            "probes": timings, "phases": table.statistics(targets_of(catalogue)),
            "wall_s": round(time.time() - started, 1), "device": real_run.device_name(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------------------ report
def _mean_sd(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict]) -> dict:
    """Per model, phase, signal and target: mean ± sd over seeds of the area P(noise > clean), of the better
    orientation's area and of the clean tokens dropped at 90% recall; per model, phase and target, the single head
    with the best seed-mean area (either orientation; chosen after the fact, so optimistic)."""
    out = {}
    for model in sorted({r["model"] for r in results}):
        runs = sorted((r for r in results if r["model"] == model), key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in runs], "layers": runs[0]["layers"], "phases": {}}
        for phase in ("early", "late"):
            stats = [r["phases"][phase] for r in runs if phase in r["phases"]]
            if not stats:
                continue
            signals = {}
            for signal, by_target in stats[0]["signals"].items():
                for target in by_target:
                    areas = [s["signals"][signal][target]["auc_noise_high"] for s in stats]
                    drops = [s["signals"][signal][target]["clean_dropped_at_90pct_noise_recall"] for s in stats]
                    mean, sd = _mean_sd(areas)
                    signals.setdefault(signal, {})[target] = {
                        "auc_noise_high": mean, "auc_noise_high_sd": sd, "auc": max(mean, 1 - mean),
                        "noise_is": "high" if mean >= 0.5 else "low",
                        "clean_dropped_at_90pct_noise_recall": _mean_sd(drops)[0],
                        "clean_dropped_sd": _mean_sd(drops)[1]}
            best = {}
            for target in stats[0]["signals"]["share_last"]:
                means = {head: _mean_sd([s["heads"][head][target] for s in stats])
                         for head in stats[0]["heads"] if target in stats[0]["heads"][head]}
                head = max(means, key=lambda h: abs(means[h][0] - 0.5))
                best[target] = {"head": head, "auc_noise_high": means[head][0], "sd": means[head][1]}
            tokens = {k: sum(s["tokens"].get(k, 0) for s in stats) for k in stats[0]["tokens"]}
            entry["phases"][phase] = {"signals": signals, "best_head": best, "tokens_over_seeds": tokens}
        out[model] = entry
    return out


TABLE_SIGNALS = ("base_nll", "current_nll", "rel_base", "rel_ema", "share_first", "share_middle", "share_last",
                 "position", "uniform_share", "rel_base_in_sample", "rel_ema_in_sample", "share_last_in_sample",
                 "sstoken_score", "sstoken_ema_score")


# The signals ssToken ranks by (REL as normalised in its sample, the last layer's share, their γ = 0.5 mix) and the
# plain NLLs: the compact table of the write-up.
KEY_SIGNALS = ("rel_base_in_sample", "share_last", "sstoken_score", "base_nll", "share_middle")


def key_table(summary: dict, targets: list[str]) -> str:
    """One row per model, phase and key signal: per target, the ROC area P(noise > clean) (mean over seeds) and
    the clean tokens dropped at 90% noise recall (better orientation)."""
    lines = ["| model | phase | seeds | signal | " + " | ".join(targets) + " |", "|---" * (4 + len(targets)) + "|"]
    for model, entry in summary.items():
        for phase, stats in entry["phases"].items():
            for signal in KEY_SIGNALS:
                row = stats["signals"].get(signal, {})
                cells = [f"{row[t]['auc_noise_high']:.2f} / {row[t]['clean_dropped_at_90pct_noise_recall']:.2f}"
                         if t in row else "-" for t in targets]
                lines.append(f"| {model} | {phase} | {len(entry['seeds'])} | {signal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict, targets: list[str]) -> str:
    lines = ["ROC area P(noise > clean) / clean tokens dropped at 90% noise recall, mean over seeds:", "",
             key_table(summary, targets)]
    for model, entry in summary.items():
        for phase, stats in entry["phases"].items():
            lines += ["", f"**{model}, {phase}** (seeds {entry['seeds']}; ROC area P(noise > clean), mean ± sd over "
                          f"seeds; below 0.5 = the kind scores lower than clean text, which ssToken drops)", "",
                      "| signal | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
            for signal in TABLE_SIGNALS:
                row = stats["signals"].get(signal, {})
                cells = [f"{row[t]['auc_noise_high']:.2f} ± {row[t]['auc_noise_high_sd']:.2f}" if t in row else "-"
                         for t in targets]
                lines.append(f"| {signal} | " + " | ".join(cells) + " |")
            best = stats["best_head"]
            lines.append("| best single head | " + " | ".join(
                f"{best[t]['auc_noise_high']:.2f} ({best[t]['head'].removeprefix('share_')})" if t in best else "-"
                for t in targets) + " |")
            lines += ["", "Clean tokens dropped at 90% noise recall (better orientation), same runs:", "",
                      "| signal | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
            for signal in TABLE_SIGNALS:
                row = stats["signals"].get(signal, {})
                cells = [f"{row[t]['clean_dropped_at_90pct_noise_recall']:.2f}" if t in row else "-" for t in targets]
                lines.append(f"| {signal} | " + " | ".join(cells) + " |")
            tokens = stats["tokens_over_seeds"]
            lines += ["", "Tokens scored (all seeds): " + ", ".join(f"{k} {v}" for k, v in tokens.items())]
    return "\n".join(lines).strip()


def plot(summary: dict, targets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(m, p) for m, e in summary.items() for p in e["phases"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.2), squeeze=False)
    for ax, (model, phase) in zip(axes[0], panels):
        stats = summary[model]["phases"][phase]
        grid = np.array([[stats["signals"][s][t]["auc_noise_high"] if t in stats["signals"].get(s, {}) else np.nan
                          for t in targets] for s in TABLE_SIGNALS])
        image = ax.imshow(grid, cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels(targets, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(TABLE_SIGNALS)))
        ax.set_yticklabels(TABLE_SIGNALS if ax is axes[0][0] else [], fontsize=7)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5.5)
        ax.set_title(f"{model}, {phase}", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.6, label="ROC area P(noise > clean); < 0.5: ssToken drops it")
    fig.suptitle("What ssToken's signals see on real models (noisy ShareGPT probe rows)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(out: Path, catalogue: noise.Catalogue) -> dict:
    import json

    from sstoken.io import atomic_write_json, atomic_write_text

    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("probe-*.json"))]
    if not results:
        raise SystemExit(f"no probe results in {out / 'runs'}")
    summary = aggregate(results)
    targets = list(targets_of(catalogue))
    document = {"catalogue": catalogue.as_dict(), "ema_decay": EMA_DECAY, "early_fraction": EARLY,
                "summary": summary, "wall_time_s": sum(r["wall_s"] for r in results),
                "runs": [{k: r[k] for k in ("model", "seed", "rows", "steps", "train", "probes", "wall_s", "device",
                                           "finished")} for r in results]}
    atomic_write_json(out / "probe.json", document)
    table = markdown(summary, targets)
    atomic_write_text(out / "probe.md", table + "\n")
    plot(summary, targets, out / "probe.png")
    print(table)
    return document


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=data.MODELS, default=list(data.MODELS))
    data.add_run_arguments(parser)
    ns = parser.parse_args(argv)
    from sstoken.io import atomic_write_json

    catalogue, home, out = data.resolve_run(ns, "probe")
    if not ns.report_only and ns.workers > 1:
        run_workers(__file__, argv if argv is not None else sys.argv[1:], ns.workers)
    elif not ns.report_only:
        prepare_caches(ns.size, ns.models, home, catalogue)
        if not ns.caches_only:
            for seed in ns.seeds:
                for model_name in ns.models:
                    name = unit_name(model_name, seed)
                    if not claim(out / "runs", name):
                        continue
                    print(f"--- probe {model_name} seed {seed}", flush=True)
                    result = run_unit(ns.size, model_name, seed, home, catalogue)
                    atomic_write_json(out / "runs" / name, result)
                    release(out / "runs", name)
    if not (ns.caches_only or ns.worker):
        report(out, catalogue)
    return 0


if __name__ == "__main__":
    sys.exit(main())

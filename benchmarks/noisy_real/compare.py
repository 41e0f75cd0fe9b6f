"""``python benchmarks/noisy_real/compare.py``: token selectors against full SFT on noisy real data with a known noise
record, scored by the NLL of clean held-out answers.

Gemma-3-270M (base) gets the same LoRA fine-tune (r=16 on all linear layers, lr 3e-4 cosine, 15 steps of 4 rows: the
60 of 64 rows that fit 256 tokens with their clean twins) with every method, on the noisy ShareGPT mix of
``data.py`` (clean top-quality rows, about 60% of them spoilt by the catalogue's noise, 10% per kind rounded, one
kind each). ``full_clean`` trains on the clean twins of the same rows (the ceiling); Rho-1 and TokenCleaning read a
reference model trained the same way on other clean rows; REL, ssToken and TokenCleaning read the base model's NLL
from a cache built once. While each method trains, every keep mask is compared with the noise record (kept fraction
of each noise kind and of clean tokens; ``quality.KeepRecorder``).

Each (method, seed) result is written to ``runs/compare-<method>-seed<k>.json`` at once (rerun to continue;
``--workers 2`` shares the runs between two one-thread processes). The report pairs every method with
``full_noisy`` seed by seed (same data order and LoRA initialisation) and item by item (held-out answers): the mean
difference with a 95% bootstrap interval over seeds and items (:func:`sstoken.evaluation.stats.compare_runs`).

    python benchmarks/noisy_real/compare.py --workers 2
    python benchmarks/noisy_real/compare.py --report-only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402  (puts benchmarks/ and benchmarks/real_data/ on the path)
import noise  # noqa: E402
import run as real_run  # noqa: E402  (benchmarks/real_data/run.py)
from quality import KeepRecorder  # noqa: E402
from runner import claim, release, run_workers  # noqa: E402

from sstoken.training.config import method_settings  # noqa: E402

MODEL = "gemma"
# name -> SSTokenConfig selection fields, plus: clean (train on the clean twins), base (history_cache = the base
# model's NLL), reference (reference_cache = the clean-trained reference's NLL)
METHODS: dict[str, dict] = {
    "full_clean": {"selection_method": "full", "clean": True},
    "full_noisy": {"selection_method": "full"},
    "random": {"selection_method": "random"},
    "rho1": {"selection_method": "rho1", "reference": True},
    "tokencleaning": {"selection_method": "tokencleaning", "reference": True, "base": True},
    "rel": {"selection_method": "rel", "base": True},
    "attn": {"selection_method": "attn"},
    "sstoken": {"selection_method": "sstoken", "base": True},
    "sstoken_warmup": {"selection_method": "sstoken", "base": True, "attention_warmup": 0.2},
    "dft": method_settings("dft"),  # TRL's DFT loss: each token's NLL weighted by its detached p(y)
    "sstoken+dft": {**method_settings("sstoken+dft"), "base": True},
}
# Research selectors (benchmarks/selection_research.py) that the signal probe justifies, run on request: the probe
# finds the NLL of corrupted, cut-off and wrong-fact tokens far above their clean neighbours' (ROC area 0.77-1.00),
# so x_adapt_outlier drops the tokens whose current NLL is an outlier of their sample (no fixed budget).
RESEARCH_METHODS: dict[str, dict] = {"x_adapt_outlier": {"selection_method": "x_adapt_outlier"}}
ALL_METHODS = {**METHODS, **RESEARCH_METHODS}
BASELINE = "full_noisy"
# What the comparison recommends, written into summary.json with its reason (None: nothing beat full SFT).
RECOMMENDED: str | None = "rho1"
RECOMMENDED_REASON = ("the only method better than full SFT on the noisy mix beyond the 95% interval (held-out NLL "
                      "-0.017 [-0.033, -0.002], 69% of the noisy-to-clean gap, 3 seeds), and it needs a reference model "
                      "trained on clean data; no reference-free selector did: ssToken +0.180 [+0.108, +0.256], with the "
                      "official attention warm-up +0.093, attention only +0.008 [-0.005, +0.021] (BENCHMARKS.md, "
                      "'Noisy real data')")


def unit_name(method: str, seed: int) -> str:
    return f"compare-{method}-seed{seed}.json"


# ------------------------------------------------------------------------------------------------ set-up
class Setup:
    """The rows (encoded for the model) and the caches of one size and catalogue."""

    def __init__(self, size: str, home: Path, catalogue: noise.Catalogue, tokenizer):
        self.size = size
        self.train_size = data.TRAIN_SIZES[size]
        texts = data.build_texts(data.read_pool(home), data.SHAPES[size], catalogue)
        length = self.train_size.max_length
        self.noisy, rows = data.encode_rows(tokenizer, texts.train, length)
        self.clean, _ = data.encode_rows(tokenizer, rows, length, noisy=False)
        self.held_out, _ = data.encode_rows(tokenizer, texts.held_out, length, noisy=False)
        self.reference, _ = data.encode_rows(tokenizer, texts.reference, length, noisy=False)
        self.texts = texts
        self.caches = data.cache_dir(home, size, MODEL, catalogue)

    @property
    def base_cache(self) -> Path:
        return self.caches / "train-base"

    @property
    def reference_cache(self) -> Path:
        return self.caches / "train-reference"

    def describe(self) -> dict:
        from collections import Counter

        tokens = Counter(k or "clean" for row in self.noisy for k, label in zip(row["kinds"], row["labels"])
                         if label != -100)
        return {**self.texts.summary(), "encoded_rows": {"train": len(self.noisy), "held_out": len(self.held_out),
                                                         "reference": len(self.reference)},
                "train_response_tokens_by_kind": dict(tokens)}


def prepare_caches(setup: Setup, home: Path) -> None:
    """The base model's NLL over the noisy training rows, and the reference model (full SFT on clean reference rows)
    with its NLL over them: built once, read by every seed."""
    from sstoken.selection.nll_cache import build_nll_cache

    length = setup.train_size.max_length
    if not (setup.base_cache / "index.json").exists():
        started = time.time()
        model, tokenizer = data.load(MODEL, home)
        build_nll_cache(model, tokenizer, real_run.plain_rows(setup.noisy), str(setup.base_cache), length,
                        progress=False)
        print(f"base NLL cache built in {time.time() - started:.0f}s", flush=True)
    if not (setup.reference_cache / "index.json").exists():
        started = time.time()
        model, tokenizer = data.load(MODEL, home)
        with tempfile.TemporaryDirectory() as tmp:
            reference, _ = real_run.train_lora(model, tokenizer, setup.reference, 0, setup.train_size, Path(tmp),
                                               selection_method="full")
        build_nll_cache(reference, tokenizer, real_run.plain_rows(setup.noisy), str(setup.reference_cache), length,
                        progress=False)
        print(f"reference model trained and cached in {time.time() - started:.0f}s", flush=True)


class WeightRecorder(KeepRecorder):
    """Mean p(y) = exp(−current NLL) of each noise kind's tokens while training: the weight DFT gives a token."""

    def values(self, event):
        from sstoken.selection.scoring import dft_weights

        return dft_weights(event.signals.current_nll)

    def means(self) -> dict:
        return {key: total / n for key, (total, n) in self.counts.get("all", {}).items() if n}


def base_held_out(setup: Setup, home: Path, runs: Path) -> None:
    """The clean held-out NLL of the model before any fine-tuning (``runs/base.json``, once): the level every method
    starts from, which tells a method that fits its own objective at the cost of likelihood (DFT) from one that
    does not learn."""
    from sstoken.evaluation.held_out import held_out_nll
    from sstoken.io import atomic_write_json

    if (runs / "base.json").exists():
        return
    model, _ = data.load(MODEL, home)
    atomic_write_json(runs / "base.json", {"held_out_nll": held_out_nll(model, real_run.plain_rows(setup.held_out),
                                                                        batch_size=8)}, indent=None)


def run_unit(setup: Setup, method: str, seed: int, home: Path) -> dict:
    from sstoken.evaluation.held_out import held_out_nll
    from sstoken.selection.nll_cache import sample_key

    spec = dict(ALL_METHODS[method])
    clean = spec.pop("clean", False)
    selection = {"history_cache": str(setup.base_cache) if spec.pop("base", False) else None,
                 "reference_cache": str(setup.reference_cache) if spec.pop("reference", False) else None, **spec}
    rows = setup.clean if clean else setup.noisy
    flags = {sample_key(r["input_ids"]): r["kinds"] for r in setup.noisy}
    keeps, weights = KeepRecorder(flags), WeightRecorder(flags)

    def listen(trainer):
        trainer.add_selection_listener(keeps)
        trainer.add_selection_listener(weights)

    started = time.time()
    model, tokenizer = data.load(MODEL, home)
    with tempfile.TemporaryDirectory() as tmp:
        model, summary = real_run.train_lora(model, tokenizer, rows, seed, setup.train_size, Path(tmp),
                                             setup=listen, **selection)
    trained_s = time.time() - started
    nll = held_out_nll(model, real_run.plain_rows(setup.held_out), batch_size=8)
    del model
    gc.collect()
    return {"method": method, "seed": seed, "size": setup.size, "selection": {k: v for k, v in selection.items()
                                                                             if v is not None},
            "clean_data": clean, "train": summary, "held_out_nll": nll,
            "kept": None if clean else keeps.rates(), "mean_p": None if clean else weights.means(),
            "train_s": round(trained_s, 1), "wall_s": round(time.time() - started, 1),
            "device": real_run.device_name(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------------------ report
def aggregate(results: list[dict], kinds: list[str]) -> dict:
    """Per method: clean held-out NLL over seeds and the paired difference from ``full_noisy`` and from
    ``full_clean`` (95% bootstrap over seeds and items; :func:`sstoken.evaluation.stats.compare_runs`, the statistics
    ``sstoken compare`` reports); the share of the noisy → clean gap it recovers; kept fractions and mean p(y) per
    noise kind, averaged over seeds."""
    import statistics

    from sstoken.evaluation.stats import compare_runs

    runs = [{"method": r["method"], "seed": r["seed"], "eval": {"held_out_nll": r["held_out_nll"]}} for r in results]
    order = [m for m in ALL_METHODS if any(r["method"] == m for r in results)]
    vs_noisy = compare_runs(runs, BASELINE, order=order)
    vs_clean = compare_runs(runs, "full_clean", order=order)
    summary = {}
    for method in order:
        entry = {"seeds": vs_noisy[method]["seeds"], "held_out_nll": vs_noisy[method]["held_out_nll"],
                 "delta_vs_full_noisy": vs_noisy[method].get("delta", {}).get("held_out_nll"),
                 "delta_vs_full_clean": vs_clean[method].get("delta", {}).get("held_out_nll")}
        own = [r for r in results if r["method"] == method]
        entry["wall_s_per_run"] = statistics.fmean(r["wall_s"] for r in own)
        kept = [r["kept"]["all"] for r in own if r.get("kept")]
        if kept:
            entry["kept"] = {k: statistics.fmean(x[k] for x in kept if x.get(k) is not None)
                             for k in ("noise", "clean", *kinds) if any(x.get(k) is not None for x in kept)}
        mean_p = [r["mean_p"] for r in own if r.get("mean_p")]
        if mean_p:
            entry["mean_p"] = {k: statistics.fmean(x[k] for x in mean_p if k in x)
                               for k in ("noise", "clean", *kinds) if any(k in x for x in mean_p)}
        summary[method] = entry
    gap = None
    if BASELINE in summary and "full_clean" in summary:
        gap = summary[BASELINE]["held_out_nll"]["mean"] - summary["full_clean"]["held_out_nll"]["mean"]
        for entry in summary.values():
            d = entry["delta_vs_full_noisy"]
            entry["gap_recovered"] = (-d["mean"] / gap) if d and gap else None
    return {"methods": summary, "noisy_to_clean_gap": gap}


def markdown(agg: dict, kinds: list[str]) -> str:
    head = ("| method | seeds | clean held-out NLL (mean ± std over seeds) | Δ vs full_noisy [95% CI] | gap recovered | kept noise | kept clean | "
            + " | ".join(f"kept {k}" for k in kinds) + " |")
    lines = [head, "|" + "---|" * (7 + len(kinds))]
    for method, e in agg["methods"].items():
        d = e["delta_vs_full_noisy"]
        delta = f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "-"
        gap = f"{e['gap_recovered']:+.0%}" if e.get("gap_recovered") is not None else "-"
        kept = e.get("kept", {})
        cells = [f"{kept[k]:.2f}" if k in kept else "-" for k in ("noise", "clean", *kinds)]
        lines.append(f"| {method} | {len(e['seeds'])} | {e['held_out_nll']['mean']:.4f} ± {e['held_out_nll']['std']:.4f}"
                     f" | {delta} | {gap} | " + " | ".join(cells) + " |")
    lines += ["", "Mean p(y) of the training tokens while training (the weight DFT gives a token):", "",
              "| method | noise | clean | " + " | ".join(kinds) + " |", "|" + "---|" * (3 + len(kinds))]
    for method, e in agg["methods"].items():
        p = e.get("mean_p")
        if p:
            lines.append(f"| {method} | " + " | ".join(f"{p[k]:.3f}" if k in p else "-"
                                                        for k in ("noise", "clean", *kinds)) + " |")
    return "\n".join(lines)


def plot(agg: dict, kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, e in agg["methods"].items() if e["delta_vs_full_noisy"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(methods) + 1.8))
    means = [agg["methods"][m]["delta_vs_full_noisy"]["mean"] for m in methods]
    lows = [agg["methods"][m]["delta_vs_full_noisy"]["ci95"][0] for m in methods]
    highs = [agg["methods"][m]["delta_vs_full_noisy"]["ci95"][1] for m in methods]
    axes[0].barh(methods, means, xerr=[[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]],
                 color=["#55a868" if m == "full_clean" else "#4c72b0" for m in methods], capsize=3)
    axes[0].axvline(0, color="black", lw=0.8)
    axes[0].invert_yaxis()
    # Linear near zero, where the methods that matter differ by hundredths; logarithmic beyond, so that one method
    # far off (DFT's NLL) does not flatten the others.
    axes[0].set_xscale("symlog", linthresh=0.1)
    axes[0].set_xlabel("Δ clean held-out NLL vs full SFT on the noisy mix (nats/token; lower is better; 95% CI;\n"
                       "linear within ±0.1, logarithmic beyond)", fontsize=8)
    kept_methods = [m for m in agg["methods"] if agg["methods"][m].get("kept")]
    columns = ["clean", *kinds]
    for i, column in enumerate(columns):
        values = [agg["methods"][m]["kept"].get(column, float("nan")) for m in kept_methods]
        axes[1].barh([y + i * 0.8 / len(columns) for y in range(len(kept_methods))], values,
                     height=0.8 / len(columns), label=column)
    axes[1].set_yticks([y + 0.4 - 0.4 / len(columns) for y in range(len(kept_methods))])
    axes[1].set_yticklabels(kept_methods)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("fraction of the training tokens kept, by noise kind", fontsize=8)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Gemma-3-270M base + LoRA on noisy ShareGPT: selectors vs full SFT", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, catalogue: noise.Catalogue, setup_info: dict | None) -> dict:
    from sstoken.io import atomic_write_json, atomic_write_text

    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("compare-*.json"))]
    if not results:
        raise SystemExit(f"no comparison results in {out / 'runs'}")
    kinds = [k for k, spec in catalogue.kinds.items() if spec.rate > 0]
    agg = aggregate(results, kinds)
    base_path = out / "runs" / "base.json"
    if base_path.exists():
        nll = json.loads(base_path.read_text())["held_out_nll"]
        agg["base_held_out_nll"] = sum(nll) / len(nll)
    setup_path = out / "compare-setup.json"
    if setup_info is None and setup_path.exists():
        setup_info = json.loads(setup_path.read_text())
    document = {"recommended": RECOMMENDED, "recommended_reason": RECOMMENDED_REASON,
                "catalogue": catalogue.as_dict(), "model": data.MODEL_NAMES[MODEL], "setup": setup_info,
                "methods": {m: ALL_METHODS[m] for m in agg["methods"]}, **agg,
                "wall_time_s": sum(r["wall_s"] for r in results)}
    atomic_write_json(out / "compare.json", document)
    table = markdown(agg, kinds)
    if "base_held_out_nll" in agg:
        table = f"Clean held-out NLL of the base model before fine-tuning: {agg['base_held_out_nll']:.4f}\n\n" + table
    atomic_write_text(out / "compare.md", table + "\n")
    plot(agg, kinds, out / "compare.png")
    print(table)
    return document


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS), default=list(METHODS),
                        help="default: all but the research variants")
    data.add_run_arguments(parser)
    ns = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from sstoken.io import atomic_write_json

    catalogue, home, out = data.resolve_run(ns, "compare")
    setup_info = None
    if not ns.report_only and ns.workers > 1:
        run_workers(__file__, argv if argv is not None else sys.argv[1:], ns.workers)
    elif not ns.report_only:
        setup = Setup(ns.size, home, catalogue, AutoTokenizer.from_pretrained(home / data.MODEL_DIR))
        setup_info = {"size": ns.size, "shape": data.SHAPES[ns.size].__dict__,
                      "train_size": data.TRAIN_SIZES[ns.size].__dict__, **setup.describe()}
        if not ns.worker:
            atomic_write_json(out / "compare-setup.json", setup_info)
        prepare_caches(setup, home)
        if not ns.worker:
            base_held_out(setup, home, out / "runs")
        if not ns.caches_only:
            todo = [(m, s) for s in ns.seeds for m in ns.methods]
            for method, seed in todo:
                name = unit_name(method, seed)
                if not claim(out / "runs", name):
                    continue
                print(f"--- {method} seed {seed}", flush=True)
                result = run_unit(setup, method, seed, home)
                atomic_write_json(out / "runs" / name, result, indent=None)
                release(out / "runs", name)
                d = result["held_out_nll"]
                print(f"    held-out NLL {sum(d) / len(d):.4f} ({result['train_s']:.0f}s training, "
                      f"{result['wall_s']:.0f}s in all)", flush=True)
    if not (ns.caches_only or ns.worker):
        report(out, catalogue, setup_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())

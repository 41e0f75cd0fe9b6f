"""``sstoken compare``: does token selection help on *my* data? One recipe, trained once per method, scored
on the same held-out conversations (response NLL, and lm-eval tasks if asked), as a table and a chart."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sstoken.cli.recipe import data_flag
from sstoken.data.spec import check_data_spec
from sstoken.errors import ConfigError
from sstoken.io import atomic_write_json, atomic_write_text

EXAMPLES = """\
examples:
  sstoken compare --config recipe.yaml --methods full sstoken --eval_data held_out.jsonl
  sstoken compare --config recipe.yaml --methods full random sstoken --tasks arc_easy,boolq --limit 200
  sstoken compare --config recipe.yaml --methods full dft sstoken sstoken+dft --eval_data held_out.jsonl
  sstoken compare --config recipe.yaml --methods full sstoken --max_steps 50   # recipe overrides as in train
"""


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="train one recipe once per selection method and score all on the same held-out data",
        description="Train the same recipe once per selection method (same data, steps, seed and LoRA) and "
                    "score every run on the same held-out conversations. Other --key value flags override "
                    "the recipe, as in `sstoken train`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    parser.add_argument("--methods", nargs="+", required=True,
                        help="selection methods, e.g. full sstoken; dft is full SFT with DFT's loss "
                             "(loss_type dft), <method>+dft a selector with it (sstoken+dft)")
    parser.add_argument("--eval_data", "--eval-data", dest="held_out",
                        help="held-out data, like eval_data: a file, folder or Hub dataset id, or YAML such as "
                             "'{path: org/ds, split: test}' (default: the recipe's eval_data)")
    parser.add_argument("--tasks", help="also score these lm-eval tasks (see `sstoken eval --help`)")
    parser.add_argument("--limit", type=int, help="items per lm-eval task")
    parser.add_argument("--tasks-dir", help="prepared lm-eval task folder")
    parser.add_argument("--out", help="folder of the runs and the comparison (default: <output_dir>/compare)")
    parser.set_defaults(handler=cmd_compare, takes_overrides=True)


def _method_overrides(overrides: list[str], method: str, output_dir: Path) -> list[str]:
    from sstoken.training.config import method_settings

    settings = [token for key, value in method_settings(method).items() for token in (f"--{key}", value)]
    return [*overrides, *settings, "--output_dir", str(output_dir)]


def cmd_compare(ns, overrides: list[str]) -> int:
    from sstoken.cli.common import prepare_run
    from sstoken.cli.train import cmd_train
    from sstoken.training.config import method_settings

    methods = list(dict.fromkeys(ns.methods))
    for method in methods:
        method_settings(method)  # an unknown name is refused before anything trains
    if len(methods) < 2:
        raise ConfigError("compare needs at least two methods, e.g. --methods full sstoken")
    if ns.limit is not None and ns.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {ns.limit}")
    run, config = prepare_run(ns.config, overrides)
    held_out = data_flag(ns.held_out) if ns.held_out else run["eval_data"]
    if not held_out:
        raise ConfigError("compare needs held-out data: pass --eval_data held_out.jsonl or set eval_data in the recipe")
    check_data_spec(held_out, "eval_data", "held-out data")
    out = Path(ns.out).expanduser() if ns.out else Path(config.output_dir) / "compare"
    # Every method's configuration is checked before the first one trains (e.g. rho1 without reference_cache).
    for method in methods:
        prepare_run(ns.config, _method_overrides(overrides, method, out / method))
    tasks = None
    if ns.tasks:
        from sstoken.evaluation.tasks import (
            default_tasks_dir,
            prepare_eval_tasks,
            resolve_tasks,
        )

        tasks_dir = Path(ns.tasks_dir).expanduser() if ns.tasks_dir else default_tasks_dir()
        tasks = resolve_tasks(ns.tasks, tasks_dir)
        prepare_eval_tasks(tasks_dir, tasks=tasks)

    results = {}
    for method in methods:
        run_dir = out / method
        scored = run_dir / "compare_eval.json"
        if scored.is_file():
            print(f"sstoken compare: {method}: already trained and scored ({scored})")
            results[method] = json.loads(scored.read_text(encoding="utf-8"))
            continue
        print(f"sstoken compare: training {method} -> {run_dir}", flush=True)
        cmd_train(argparse.Namespace(config=ns.config), _method_overrides(overrides, method, run_dir))
        results[method] = _score(run_dir, held_out, run["max_seq_length"], tasks, ns, config)
        atomic_write_json(scored, results[method], indent=None)
    document = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", document)
    table = format_comparison(document)
    atomic_write_text(out / "compare.md", table + "\n")
    plot_comparison(document, out / "compare.png")
    print(table)
    print(f"sstoken compare: {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def _score(run_dir: Path, held_out, max_seq_length: int, tasks, ns, config) -> dict:
    from sstoken.cli.common import load_run_rows
    from sstoken.evaluation.harness import run_lm_eval
    from sstoken.evaluation.held_out import held_out_nll
    from sstoken.evaluation.targets import load_for_eval, resolve_target

    started = time.time()
    model, tokenizer = load_for_eval(resolve_target(str(run_dir)))
    rows, _ = load_run_rows(held_out, tokenizer, max_seq_length, config, "eval_data")
    rows = rows.to_list()
    result = {"held_out_nll": held_out_nll(model, rows), "tasks": {}}
    if tasks:
        from sstoken.evaluation.tasks import default_tasks_dir

        tasks_dir = Path(ns.tasks_dir).expanduser() if ns.tasks_dir else default_tasks_dir()
        for task, scored in run_lm_eval(model, tokenizer, tasks_dir, tasks, limit=ns.limit).items():
            result["tasks"][task] = {"metric": scored.metric, "score": scored.score, "items": scored.item_scores}
    result["eval_s"] = round(time.time() - started, 1)
    return result


def summarize(results: dict[str, dict]) -> dict:
    """Mean held-out NLL and task scores per method; paired differences from the baseline with 95% CIs.

    The baseline is ``full`` when it was run, else the first method. Intervals come from a bootstrap over
    held-out rows (and task items): one seed, so they cover data sampling, not training noise.
    """
    from sstoken.evaluation.stats import paired_bootstrap

    methods = list(results)
    baseline = "full" if "full" in results else methods[0]
    summary = {"baseline": baseline, "methods": {}}
    for method, r in results.items():
        nll = r["held_out_nll"]
        entry = {"held_out_nll": sum(nll) / len(nll), "tasks": {t: v["score"] for t, v in r["tasks"].items()}}
        if method != baseline:
            d = paired_bootstrap([nll], [results[baseline]["held_out_nll"]])
            entry["delta_held_out_nll"] = {"mean": d[0], "ci95": [d[1], d[2]]}
            for task, v in r["tasks"].items():
                d = paired_bootstrap([v["items"]], [results[baseline]["tasks"][task]["items"]])
                entry.setdefault("delta_tasks", {})[task] = {"mean": d[0], "ci95": [d[1], d[2]]}
        summary["methods"][method] = entry
    return summary


def format_comparison(document: dict) -> str:
    baseline = document["baseline"]
    tasks = sorted({t for e in document["methods"].values() for t in e["tasks"]})
    lines = ["| method | held-out NLL | Δ vs " + baseline + " (95% CI) | " + " | ".join(tasks) + (" |" if tasks else ""),
             "|---|---|---|" + "---|" * len(tasks)]
    for method, e in document["methods"].items():
        delta = e.get("delta_held_out_nll")
        delta_text = (f"{delta['mean']:+.4f} [{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]"
                      if delta else "baseline")
        cells = " | ".join(f"{e['tasks'][t]:.3f}" for t in tasks)
        lines.append(f"| {method} | {e['held_out_nll']:.4f} | {delta_text} | {cells}" + (" |" if tasks else ""))
    return "\n".join(lines)


def plot_comparison(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(document["methods"])
    values = [document["methods"][m]["held_out_nll"] for m in methods]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(methods) + 2), 3.2))
    bars = ax.bar(methods, values, color=["#999999" if m == document["baseline"] else "#4c72b0" for m in methods])
    for bar, method in zip(bars, methods):
        delta = document["methods"][method].get("delta_held_out_nll")
        label = "baseline" if delta is None else f"{delta['mean']:+.3f}\n[{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    ax.set_ylabel("held-out response NLL (nats/token)")
    ax.set_title("sstoken compare: lower is better", fontsize=9)
    ax.set_ylim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

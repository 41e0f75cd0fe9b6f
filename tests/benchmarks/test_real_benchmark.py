"""The real-data benchmark's pure parts: ShareGPT decoding, the quality rule, row selection and statistics."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "real_data"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        prepare = importlib.import_module("prepare")
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))
    return prepare, run


def test_truncated_sharegpt_file_yields_every_complete_record(tmp_path, bench):
    prepare, _ = bench
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                   {"from": "gpt", "value": f"answer {i}"}]} for i in range(3)]
    text = json.dumps(records, indent=2)
    cut = text[:text.rindex('"answer 2"') + 5]  # the file ends inside the last record, as the package's does
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    assert [r["id"] for r in prepare.iter_sharegpt_records(path)] == ["r0", "r1"]


def test_first_turn_pairs_keep_english_first_turns_once(bench):
    prepare, _ = bench
    good = "Explain how photosynthesis works in plants, in simple words."
    answer = "Plants use sunlight, water and carbon dioxide to make sugar and oxygen. " * 2
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": good}, {"from": "gpt", "value": answer}]},
        {"id": "b", "conversations": [{"from": "human", "value": good}, {"from": "gpt", "value": answer}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": answer}, {"from": "human", "value": good}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Объясни фотосинтез простыми словами"},
                                      {"from": "gpt", "value": "Растения используют свет, воду и углекислый газ."}]},
    ]
    pairs = prepare.first_turn_pairs(records)
    assert [p["id"] for p in pairs] == ["a"]
    assert pairs[0]["messages"][1] == {"role": "assistant", "content": answer.strip()}


def test_quality_score_ranks_refusals_and_cut_off_answers_below_complete_ones(bench):
    prepare, _ = bench
    prompt = "Write a short note about the history of the bicycle for a school newsletter."
    complete = ("The bicycle was invented in the nineteenth century. Early designs had no pedals, and riders "
                "pushed with their feet. Pedals, chains and air-filled tyres came later and made it popular.")
    refusal = "As an AI language model, I cannot write notes about history for a newsletter, I am sorry about it."
    cut_off = complete[:-40]
    assert prepare.quality_score(prompt, complete) > prepare.quality_score(prompt, cut_off)
    assert prepare.quality_score(prompt, complete) > prepare.quality_score(prompt, refusal)


def test_markdown_table_of_the_shared_paired_statistics(bench):
    _, run = bench
    from sstoken.evaluation.stats import compare_runs

    results = [
        {"method": m, "seed": s, "eval": {"held_out_nll": nll, "tasks": {
            t: {"metric": "acc", "score": sum(v) / len(v), "items": v} for t, v in items.items()}}}
        for m, s, items, nll in [("full", 0, {"a": [1, 0], "b": [0, 0]}, [2.0, 2.0]),
                                 ("full", 1, {"a": [1, 1], "b": [0, 0]}, [2.0, 4.0]),
                                 ("sstoken", 0, {"a": [1, 1], "b": [1, 0]}, [1.0, 1.0]),
                                 ("sstoken", 1, {"a": [1, 1], "b": [1, 0]}, [3.0, 3.0])]]
    summary = compare_runs(results, "full", ["a", "b"], order=run.METHODS, seedless=("base",))
    table = run.markdown_table(summary, ["a", "b"])
    assert "| sstoken | 2 |" in table and "+37.5" in table and "| full | 2 |" in table


def test_report_says_which_selector_is_recommended(tmp_path, bench):
    _, run = bench
    (tmp_path / "runs").mkdir()
    for method, items, nll in (("full", [1, 0], [2.0, 2.0]), ("sstoken", [1, 1], [1.0, 1.0])):
        result = {"method": method, "seed": 0, "wall_s": 1,
                  "eval": {"held_out_nll": nll, "tasks": {"a": {"metric": "acc", "score": sum(items) / 2,
                                                                 "items": items}}}}
        (tmp_path / "runs" / f"{method}-seed0.json").write_text(json.dumps(result))
    run.report(tmp_path, "cpu", ["a"])
    document = json.loads((tmp_path / "summary.json").read_text())
    assert document["recommended"] == run.RECOMMENDED and document["recommended_reason"] == run.RECOMMENDED_REASON
    assert run.RECOMMENDED is None or run.RECOMMENDED in run.METHODS
    assert "BENCHMARKS.md" in run.RECOMMENDED_REASON, "the reason points at the write-up"


def test_select_rows_skips_rows_that_would_be_truncated(tmp_path, bench):
    _, run = bench
    from sstoken.testing import tiny_tokenizer

    pool = tmp_path / "pool.jsonl"
    lines = []
    for i in range(40):
        answer = "Alice was born in Paris in 1984 and works as an engineer. " * (1 if i % 5 else 12)
        lines.append(json.dumps({"id": f"p{i:02d}", "meta": {"quality": i % 7},
                                 "messages": [{"role": "user", "content": f"Where was Alice born? ({i})"},
                                              {"role": "assistant", "content": answer.strip()}]}))
    pool.write_text("\n".join(lines) + "\n")
    size = run.SIZES["tiny"]
    rows = run.select_rows(pool, tiny_tokenizer(), size)
    assert len(rows["held_out"]) == size.held_out and len(rows["train"]) == size.n_train
    used = [r["id"] for part in rows.values() for r in part]
    assert len(used) == len(set(used)), "held-out, training and reference rows are disjoint"
    assert all(len(r["input_ids"]) <= size.max_length for part in rows.values() for r in part)
    assert not any(int(r["id"][1:]) % 5 == 0 for part in rows.values() for r in part), "long rows are skipped"
    qualities = [r["quality"] for r in rows["reference"]]
    assert qualities == sorted(qualities, reverse=True)

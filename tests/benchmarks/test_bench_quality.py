"""`python benchmarks/quality.py --tiny`: the pipeline's mechanics (not its numbers) and the task generators."""

from __future__ import annotations

import json

import pytest
from quality import METHODS, encode_examples, main
from tasks import (
    NoiseLevels,
    answer_correct,
    exact_match,
    generate,
    make_splits,
    normalise,
)


def test_generators_are_deterministic_and_record_noise():
    levels = NoiseLevels(boilerplate=0.5, wrong_fact=0.5, corrupt=0.5)
    a = generate("rc", 40, seed=3, levels=levels)
    b = generate("rc", 40, seed=3, levels=levels)
    assert [(e.prompt, e.response, e.noise_spans) for e in a] == [(e.prompt, e.response, e.noise_spans) for e in b]
    kinds = {kind for e in a for _, _, kind in e.noise_spans}
    assert kinds == {"boilerplate", "wrong_fact", "corrupt"}
    for e in a:
        # the clean answer is in the passage; a wrong fact is not
        assert e.answer in e.prompt and e.answer in e.clean_response
        for start, end, kind in e.noise_spans:
            if kind == "wrong_fact":
                assert e.response[start:end] != e.answer and e.response[start:end] not in e.prompt
        if not e.noise_spans:
            assert e.response == e.clean_response


def test_arithmetic_answers_are_computed():
    for e in generate("arith", 30, seed=1):
        a, b = [int(w) for w in e.prompt.replace(".", " ").split() if w.isdigit()]
        assert int(e.answer) in (a + b, a - b)
        assert e.answer in e.clean_response


def test_test_set_is_clean_and_disjoint():
    splits = make_splits(40, 20, seed=0, levels=NoiseLevels())
    assert all(not e.noise_spans and e.response == e.clean_response for e in splits["test"])
    assert not {e.prompt for e in splits["test"]} & {e.prompt for e in splits["train"]}


def test_scoring_normalises_format():
    e = generate("rc", 1, seed=0)[0]
    assert exact_match(e.clean_response.upper().replace(".", " ! "), e)
    assert answer_correct("Sure. " + e.clean_response, e) and not exact_match("Sure. " + e.clean_response, e)
    assert normalise("  A,  b. ") == "a b"


def test_noise_flags_align_with_tokens():
    from sstoken.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    examples = generate("rc", 10, seed=0, levels=NoiseLevels(boilerplate=1.0, wrong_fact=0.0, corrupt=0.0))
    rows, flags = encode_examples(examples, tok, 512)
    for row, f, ex in zip(rows, flags, examples):
        noisy = [t for t, kind in enumerate(f) if kind == "boilerplate"]
        assert noisy and all(row["labels"][t] != -100 for t in noisy)  # noise is only in the response
        text = tok.decode([row["input_ids"][t] for t in noisy])
        filler = ex.response[ex.noise_spans[0][0]:ex.noise_spans[0][1]]
        assert filler.strip() in text


@pytest.mark.slow
def test_tiny_run_writes_one_record_per_method_and_seed(tmp_path):
    out = tmp_path / "quality.json"
    assert main(["--tiny", "--seeds", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["partial"] is False
    pairs = [(r["method"], r["seed"]) for r in data["records"]]
    assert sorted(pairs) == sorted((m, 0) for m in METHODS)
    for r in data["records"]:
        for key in ("accuracy", "answer_accuracy", "nll", "wall_s"):
            assert isinstance(r[key], float)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and r["wall_s"] > 0
        if r["method"] != "full_clean":
            assert r["kept"]["all"]["clean"] is not None and r["unmatched_batches_rows"] == 0
    kept = {r["method"]: r["kept"]["all"] for r in data["records"] if r["kept"]}
    assert kept["full_noisy"]["noise"] == 1.0  # full SFT keeps everything
    assert 0.0 < kept["random"]["noise"] < 1.0
    assert {row["method"] for row in data["summary"]} == set(METHODS)


def test_quality_json_says_which_selector_is_recommended(tmp_path):
    import argparse
    import time

    import quality

    out = tmp_path / "q.json"
    args = argparse.Namespace(tiny=True, seeds=[0], model="small")
    quality._write(out, args, "cpu", quality.SIZES["tiny"], "tiny", {}, [], time.time(), partial=False)
    data = json.loads(out.read_text())
    # No reference-free selector met the issue-11 bar (BENCHMARKS.md, "Selection research", round 2).
    assert "recommended" in data and data["recommended"] is None
    assert isinstance(data["recommended_reason"], str) and len(data["recommended_reason"]) > 20


def test_answer_tokens_are_flagged_and_counted_as_clean():
    from quality import KeepRecorder

    from sstoken.selection.nll_cache import sample_key
    from sstoken.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    examples = generate("rc", 8, seed=1, levels=NoiseLevels(boilerplate=0.0, wrong_fact=0.0, corrupt=0.0))
    rows, flags = encode_examples(examples, tok, 512)
    for row, f, ex in zip(rows, flags, examples):
        assert ex.response[ex.answer_span[0]:ex.answer_span[1]] == ex.answer
        answer = [t for t, kind in enumerate(f) if kind == "answer"]
        assert answer and ex.answer in tok.decode([row["input_ids"][t] for t in answer])
    wrong = generate("rc", 4, seed=1, levels=NoiseLevels(boilerplate=0.0, wrong_fact=1.0, corrupt=0.0))
    assert all(ex.answer_span is None for ex in wrong)

    import torch

    recorder = KeepRecorder({sample_key(rows[0]["input_ids"]): flags[0]})
    ids = torch.tensor([rows[0]["input_ids"]])
    response = torch.tensor([[label != -100 for label in rows[0]["labels"]]])
    recorder.add(ids, torch.ones_like(response), response, response.clone(), 0.0)
    counts = recorder.counts["all"]
    n_answer = sum(kind == "answer" for kind in flags[0])
    assert counts["answer"] == [n_answer, n_answer]
    assert counts["clean"] == [int(response.sum()), int(response.sum())] and "noise" not in counts
    assert counts["first"] == [1, 1]  # the clean response's first token

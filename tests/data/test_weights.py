"""Loss weights in the data: a row's ``weight`` and an assistant message's, through encoding, the cached loader and
its ``token_weights`` column."""

from __future__ import annotations

import json

import datasets
import pytest
from test_encoding import A, U, context_text, trained_runs
from test_templates import GENERATION_CHATML, with_template

from sstoken.batch import IGNORE_INDEX, TOKEN_WEIGHTS
from sstoken.data import sources
from sstoken.data.encoding import encode_row, to_hf_dataset
from sstoken.data.sources import load_data
from sstoken.errors import DataError


def weighted(content, weight):
    return {**A(content), "weight": weight}


def trained_weights(enc) -> list[float]:
    """The weight of each run of trained tokens (checking that a run weighs the same throughout)."""
    weights = enc.weights or [1.0] * len(enc.input_ids)
    runs, current = [], set()
    for label, weight in zip(enc.labels, weights):
        if label != IGNORE_INDEX:
            current.add(weight)
        elif current:
            runs.append(current)
            current = set()
    if current:
        runs.append(current)
    assert all(len(run) == 1 for run in runs), runs
    return [run.pop() for run in runs]


def test_a_turns_weight_times_the_rows_scales_its_tokens(tok):
    row = {"messages": [U("q1"), weighted("first answer", 0.5), U("q2"), A("second answer")], "weight": 2}
    enc = encode_row(row, tok, 512)
    assert trained_runs(tok, enc) == ["first answer<|im_end|>", "second answer<|im_end|>"]
    assert trained_weights(enc) == [1.0, 2.0]  # 2 × 0.5, 2 × 1 (the default)
    assert len(enc.weights) == len(enc.input_ids)
    # The same row without weights trains the same tokens, and has none.
    plain = encode_row({"messages": [U("q1"), A("first answer"), U("q2"), A("second answer")]}, tok, 512)
    assert plain.labels == enc.labels and plain.weights is None
    assert TOKEN_WEIGHTS not in plain.as_dict() and enc.as_dict()[TOKEN_WEIGHTS] == enc.weights


def test_weights_of_1_are_no_weights(tok):
    row = {"messages": [U("q"), weighted("a", 1)], "weight": 1.0}
    assert encode_row(row, tok, 512).weights is None


def test_a_turn_of_weight_0_is_context(tok):
    row = {"messages": [U("q1"), weighted("first answer", 0), U("q2"), weighted("second answer", 3)]}
    enc = encode_row(row, tok, 512)
    assert trained_runs(tok, enc) == ["second answer<|im_end|>"]
    assert "first answer<|im_end|>" in context_text(tok, enc)
    assert trained_weights(enc) == [3.0]
    # Nothing left to train: the row is skipped (None), as one truncated to nothing.
    assert encode_row({"messages": [U("q"), weighted("a", 0)]}, tok, 512) is None
    assert encode_row({"prompt": "q", "completion": "a", "weight": 0}, tok, 512) is None


@pytest.mark.parametrize("row", [
    {"prompt": "q", "completion": "a", "weight": 2.5},
    {"instruction": "q", "output": "a", "weight": 2.5},
    {"text": "a b c", "weight": 2.5},
    {"conversations": [{"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a", "weight": 2.5}]},
    {"prompt": [U("q")], "completion": [weighted("a", 2.5)]},
], ids=["prompt_completion", "alpaca", "text", "sharegpt", "conversational"])
def test_every_format_takes_a_weight(tok, row):
    enc = encode_row(row, tok, 512)
    assert trained_weights(enc) == [2.5]


def test_a_generation_template_attributes_each_turn_its_weight(tok):
    """A template with {% generation %} blocks marks the turns itself; turns of different weights are told apart
    by where each turn's prompt ends, and get the weights the prefix method gives."""
    row = {"messages": [U("q1"), weighted("first", 0.25), U("q2"), A("second"), U("q3"), weighted("third", 4)]}
    generation = encode_row(row, with_template(GENERATION_CHATML), 512)
    prefix = encode_row(row, tok, 512)
    assert generation.as_dict() == prefix.as_dict()
    assert trained_weights(generation) == [0.25, 1.0, 4.0]


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "q", "completion": "a", "weight": -0.5}, "weight", "must be a number from 0 to 10"),
    ({"prompt": "q", "completion": "a", "weight": 10.5}, "weight", "got 10.5; rescale"),
    ({"prompt": "q", "completion": "a", "weight": float("inf")}, "weight", "got inf"),
    ({"prompt": "q", "completion": "a", "weight": True}, "weight", "got boolean"),
    ({"prompt": "q", "completion": "a", "weight": [1]}, "weight", "got array"),
    ({"messages": [U("q"), weighted("a", "high")]}, "messages[1].weight", "got string"),
    ({"messages": [{**U("q"), "weight": 0.5}, A("a")]}, "messages[0].weight", "on a user message"),
    ({"prompt": [U("q"), weighted("earlier", 1), U("q2")], "completion": [A("a")]}, "prompt[1].weight",
     "an assistant message of the prompt"),
])
def test_bad_weights_are_one_line_errors_naming_the_field(tok, row, field, message):
    with pytest.raises(DataError) as info:
        encode_row(row, tok, 512, where="f.jsonl:7")
    text = str(info.value)
    assert text.startswith(f"f.jsonl:7: {field}: ") and message in text and "\n" not in text, text


def test_context_messages_accept_a_weight_of_0(tok):
    """axolotl writes a weight on every turn, 0 on the ones it does not train."""
    row = {"messages": [{**U("q"), "weight": 0}, weighted("a", 1)]}
    assert encode_row(row, tok, 512).as_dict() == encode_row({"messages": [U("q"), A("a")]}, tok, 512).as_dict()


# ------------------------------------------------------------------------------------------ the loader
@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(sources, "encoding_cache_dir", lambda: tmp_path / "hf-datasets" / "sstoken")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_loaded_data_has_a_weight_column_only_when_weighted(tok, tmp_path, own_cache):
    plain = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    rows, stats = load_data(write_jsonl(tmp_path / "plain.jsonl", plain), tok, 64)
    assert rows.column_names == ["input_ids", "labels"] and stats.weighted == 0
    mixed = [*plain[:2], {**plain[2], "weight": 3}, {**plain[3], "weight": 0}]
    rows, stats = load_data(write_jsonl(tmp_path / "mixed.jsonl", mixed), tok, 64)
    assert rows.column_names == ["input_ids", "labels", TOKEN_WEIGHTS]
    assert (stats.used, stats.weighted, stats.skipped_no_trainable_token) == (3, 1, 1)
    # Unweighted rows store no weights (they weigh 1); the weighted row stores one per token.
    assert [len(w) for w in rows[TOKEN_WEIGHTS]] == [0, 0, len(rows[2]["input_ids"])]
    assert set(rows[2][TOKEN_WEIGHTS]) == {3.0}
    # A selection of the rows (compare's held-out split) counts its own used and weighted rows.
    unweighted = sources.stats_of_selection(stats, rows.select([0, 1]))
    assert (unweighted.used, unweighted.weighted, unweighted.rows_read) == (2, 0, 4)
    assert sources.stats_of_selection(stats, rows.select([1, 2])).weighted == 1


def test_a_changed_weight_is_encoded_again(tok, tmp_path, own_cache):
    """The encoding cache is keyed by the file's bytes: a new weight is never served from an old encoding."""
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"prompt": "q", "completion": "a", "weight": 2}])
    first, _ = load_data(str(path), tok, 64)
    write_jsonl(path, [{"prompt": "q", "completion": "a", "weight": 0.5}])
    second, _ = load_data(str(path), tok, 64)
    assert set(first[0][TOKEN_WEIGHTS]) == {2.0} and set(second[0][TOKEN_WEIGHTS]) == {0.5}


def test_a_weight_column_renamed_from_another_name_and_arrow_nulls(tok, tmp_path, own_cache):
    """``columns:`` maps a score column onto ``weight``; rows of a Parquet file whose weight is null weigh 1."""
    table = datasets.Dataset.from_dict({"prompt": ["q1", "q2"], "completion": ["a1", "a2"], "quality": [0.5, None]})
    table.to_parquet(str(tmp_path / "rows.parquet"))
    rows, stats = load_data({"path": str(tmp_path / "rows.parquet"), "columns": {"quality": "weight"}}, tok, 64)
    assert stats.weighted == 1
    assert set(rows[0][TOKEN_WEIGHTS]) == {0.5} and rows[1][TOKEN_WEIGHTS] == []


def test_to_hf_dataset_carries_weights(tok):
    rows = [encode_row({"prompt": "q", "completion": "a", "weight": 2}, tok, 64).as_dict(),
            encode_row({"prompt": "q", "completion": "b"}, tok, 64).as_dict()]
    dataset = to_hf_dataset(rows)
    assert dataset.column_names == ["input_ids", "labels", TOKEN_WEIGHTS]
    assert dataset[0][TOKEN_WEIGHTS] == rows[0][TOKEN_WEIGHTS] and dataset[1][TOKEN_WEIGHTS] == []
    assert to_hf_dataset(rows[1:]).column_names == ["input_ids", "labels"]

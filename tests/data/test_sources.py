"""Data sources (sstoken.data.sources): file formats, folders, saved datasets, Hub ids, splits, column mapping,
mixtures, ignored columns, the cached Dataset.map encoding, and the recipe / CLI wiring."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

import sstoken.models
from sstoken.cli import main
from sstoken.cli.recipe import load_recipe, split_recipe
from sstoken.data import sources
from sstoken.data.sources import encoding_fingerprint, load_data, load_training_rows
from sstoken.data.spec import check_data_spec, parse_data_spec
from sstoken.errors import ConfigError, DataError
from sstoken.testing import tiny_tokenizer, write_tiny_recipe

MAX_LEN = 96


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache, and no Hub access (conftest moves sstoken's encodings out of the
    user's cache too)."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    # Cache keys are content hashes, so another test's encoding of the same rows would be found in a shared folder.
    monkeypatch.setattr(sources, "encoding_cache_dir", lambda: tmp_path / "hf-datasets" / "sstoken")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def own_tokenizer():
    """A tiny tokenizer this test may change (tiny_tokenizer() is one shared, cached instance)."""
    return copy.deepcopy(tiny_tokenizer())


def chat(i: int, prefix: str = "row") -> dict:
    return {"messages": [{"role": "user", "content": f"{prefix} question {i}?"},
                         {"role": "assistant", "content": f"{prefix} answer {i}."}]}


def pc(i: int, prefix: str = "row") -> dict:
    return {"prompt": f"{prefix} question {i}? ", "completion": f"{prefix} answer {i}."}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def table(rows: list[dict]) -> datasets.Dataset:
    """The rows as one Arrow table: every row gets every column (null where it has none), as in a Parquet file."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})


def ids_of(dataset) -> list[list[int]]:
    return [list(x) for x in dataset["input_ids"]]


# ------------------------------------------------------------------------------------------ file formats
def test_parquet_csv_json_and_arrow_files_encode_like_jsonl(tok, tmp_path):
    rows = [pc(i) for i in range(5)]
    expected, stats = load_data(write_jsonl(tmp_path / "a.jsonl", rows), tok, MAX_LEN)
    arrow = table(rows)
    arrow.to_parquet(tmp_path / "a.parquet")
    arrow.to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "array.json").write_text(json.dumps(rows), encoding="utf-8")  # one JSON array, not JSON Lines
    arrow.save_to_disk(tmp_path / "saved")
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("a.parquet", "a.csv", "array.json", str(arrow_file)):
        encoded, other = load_data(str(tmp_path / name), tok, MAX_LEN)
        assert ids_of(encoded) == ids_of(expected), name
        assert other.used == stats.used == 5 and other.formats == {"prompt_completion": 5}
        assert encoded.column_names == ["input_ids", "labels"]


def test_messages_from_parquet_keep_their_structure(tok, tmp_path):
    """Arrow gives every message every key any message has (null elsewhere): null means absent."""
    rows = [chat(0), {"messages": [{"role": "system", "content": "Be brief."}, *chat(1)["messages"]]},
            {"instruction": "Say hi", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]
    expected, _ = load_data(write_jsonl(tmp_path / "a.jsonl", rows), tok, MAX_LEN)
    table(rows).to_parquet(tmp_path / "a.parquet")  # alpaca rows get messages: null, ...
    encoded, stats = load_data(str(tmp_path / "a.parquet"), tok, MAX_LEN)
    assert ids_of(encoded) == ids_of(expected)
    assert stats.formats == {"messages": 2, "alpaca": 2}


def test_tool_calls_from_parquet_do_not_render_keys_of_other_rows(tmp_path):
    """Arrow merges the tool-call argument structs of all rows: {"city"} and {"query"} both become
    {"city", "query"}, null where a row had nothing. Those nulls must not reach the rendered text."""
    from test_templates import TOOL_CHATML, WEATHER_TOOL

    tok = own_tokenizer()
    tok.chat_template = TOOL_CHATML

    def call(**arguments):
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": arguments}}]}

    rows = [{"messages": [{"role": "user", "content": "Weather in Oslo?"}, call(city="Oslo")], "tools": [WEATHER_TOOL]},
            {"messages": [{"role": "user", "content": "Find cats."}, call(query="cats")], "tools": [WEATHER_TOOL]}]
    expected, _ = load_data(write_jsonl(tmp_path / "a.jsonl", rows), tok, 4096)
    table(rows).to_parquet(tmp_path / "a.parquet")
    encoded, _ = load_data(str(tmp_path / "a.parquet"), tok, 4096)
    assert ids_of(encoded) == ids_of(expected)
    assert "null" not in tok.decode(encoded[0]["input_ids"]) and "Oslo" in tok.decode(encoded[0]["input_ids"])


def test_sharegpt_rows_from_arrow_mix_turn_shapes_and_lose_merged_nulls(tmp_path):
    """ShareGPT turns written from/value in one row and role/content in another (both accepted) get all four keys
    from Arrow, and tool-call arguments under `conversations` gain the other rows' keys: neither may change what
    is trained."""
    from test_templates import TOOL_CHATML

    tok = own_tokenizer()
    tok.chat_template = TOOL_CHATML

    def call(**arguments):
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}]}

    rows = [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"role": "user", "content": "Paris?"}, call(city="Paris")]},
            {"conversations": [{"role": "user", "content": "Zip?"}, call(zip="75001")]}]
    expected, _ = load_data(write_jsonl(tmp_path / "a.jsonl", rows), tok, 4096)
    table(rows).to_parquet(tmp_path / "a.parquet")
    encoded, stats = load_data(str(tmp_path / "a.parquet"), tok, 4096)
    assert ids_of(encoded) == ids_of(expected) and stats.used == 3
    assert "null" not in tok.decode(encoded[1]["input_ids"])


def test_folder_of_jsonl_files_with_split_names(tok, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", [pc(i, "train") for i in range(3)])
    write_jsonl(folder / "test.jsonl", [pc(i, "test") for i in range(2)])
    (folder / "README.md").write_text("not data")
    train, _ = load_data(str(folder), tok, MAX_LEN)
    test, _ = load_data({"path": str(folder), "split": "test"}, tok, MAX_LEN)
    assert len(train) == 3 and len(test) == 2
    assert ids_of(test) == ids_of(load_data(str(folder / "test.jsonl"), tok, MAX_LEN)[0])
    with pytest.raises(ConfigError, match=r"no split 'tst' \(did you mean 'test'\?\); it has test, train"):
        load_data({"path": str(folder), "split": "tst"}, tok, MAX_LEN)


def test_folder_without_split_names_is_all_train_and_errors_name_the_file(tok, tmp_path):
    folder = tmp_path / "shards"
    write_jsonl(folder / "part-a.jsonl", [pc(i) for i in range(2)])
    write_jsonl(folder / "part-b.jsonl", [pc(2), {"prompt": "q", "completion": 7}])
    with pytest.raises(DataError, match=rf"^{folder / 'part-b.jsonl'}:2: completion: "):
        load_data(str(folder), tok, MAX_LEN)
    write_jsonl(folder / "part-b.jsonl", [pc(2)])
    encoded, stats = load_data(str(folder), tok, MAX_LEN)
    assert stats.rows_read == 3 and len(encoded) == 3


def test_saved_dataset_dict_and_builder_with_data_files(tok, tmp_path):
    train, test = table([pc(i) for i in range(4)]), table([pc(9)])
    datasets.DatasetDict({"train": train, "validation": test}).save_to_disk(tmp_path / "dd")
    assert len(load_data({"path": str(tmp_path / "dd"), "split": "validation"}, tok, MAX_LEN)[0]) == 1
    assert len(load_data(str(tmp_path / "dd"), tok, MAX_LEN)[0]) == 4
    train.to_parquet(tmp_path / "tr.parquet")
    test.to_parquet(tmp_path / "te.parquet")
    spec = {"path": "parquet", "data_files": {"train": str(tmp_path / "tr.parquet"),
                                              "test": str(tmp_path / "te.parquet")}, "split": "test"}
    assert len(load_data(spec, tok, MAX_LEN)[0]) == 1


# ------------------------------------------------------------------------------------------ errors
def test_bad_row_in_parquet_names_file_and_row(tok, tmp_path):
    rows = [pc(0), pc(1), {"prompt": "q", "completion": ""}]
    table(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'bad.parquet'}, row 2: completion: is empty"):
        load_data(str(tmp_path / "bad.parquet"), tok, MAX_LEN)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as parquet"):
        load_data(str(tmp_path / "broken.parquet"), tok, MAX_LEN)


def test_hub_id_that_cannot_be_reached_is_one_config_error(tok):
    with pytest.raises(ConfigError) as info:
        load_data({"path": "someorg/some-sft-set", "config": "en"}, tok, MAX_LEN)
    message = str(info.value)
    assert message.startswith("data: cannot load the Hub dataset 'someorg/some-sft-set' (config 'en'), split 'train' "
                              "(and no local file or folder has that name): ConnectionError: ")
    assert "\n" not in message


def test_missing_local_paths_are_reported_as_missing(tmp_path):
    with pytest.raises(ConfigError, match="^training data ./absent.jsonl does not exist"):
        check_data_spec("./absent.jsonl", "data", "training data")
    with pytest.raises(ConfigError, match="does not exist"):
        check_data_spec([{"path": str(tmp_path / "a.parquet")}], "data")
    assert check_data_spec("HuggingFaceH4/no_robots")[0].path == "HuggingFaceH4/no_robots"  # a Hub id


@pytest.mark.parametrize("value, message", [
    ({"path": "a.jsonl", "splt": "test"}, "unknown data key 'splt' (did you mean 'split'?)"),
    ({"path": "org/x", "name": "en"}, "unknown data key 'name' (write 'config')"),
    ([{"path": "a", "proportion": 0.5}], "unknown data[0] key 'proportion' (write 'fraction')"),
    ({"path": "org/x", "fraction": 0.5}, "fraction is for the sources of a mixture"),
    ([{"path": "a", "fraction": 0.5}, {"path": "b"}], "set fraction on every source of the mixture or on none"),
    ([{"path": "a", "fraction": 0}], "fraction must be a number > 0, got 0"),
    ({"path": "a", "columns": {"q": 1}}, "columns must map column names to sstoken's"),
    ({"path": "a", "columns": {"q": "prompt", "x": "prompt"}}, "columns renames two columns to 'prompt'"),
    ({"split": "train"}, "path must be a file, a folder or a Hub dataset id"),
    ({"path": "json"}, "names a datasets builder; add data_files"),
    ([], "data is an empty list"),
    (42, "data must be a path, a Hub dataset id, a mapping with path: or a list of them, got 42"),
])
def test_data_spec_shape_errors(value, message):
    with pytest.raises(ConfigError) as info:
        parse_data_spec(value, "data")
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------ columns
def test_columns_rename_before_format_detection_and_list_keeps_columns(tok, tmp_path):
    rows = [{"question": f"q{i}? ", "answer": f"a{i}.", "category": "math"} for i in range(3)]
    table(rows).to_parquet(tmp_path / "qa.parquet")
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    expected, _ = load_data(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]}
                                                                for r in rows]), tok, MAX_LEN)
    for source in (str(tmp_path / "qa.parquet"), path):
        encoded, stats = load_data({"path": source, "columns": {"question": "prompt", "answer": "completion"}},
                                   tok, MAX_LEN)
        assert ids_of(encoded) == ids_of(expected) and stats.ignored_columns == ["category"]
    # as in TRL, a list keeps only those columns: here it drops the alpaca `system` column
    alpaca = [{"instruction": "Say hi", "output": "hi", "system": "Be brief."}]
    table(alpaca).to_parquet(tmp_path / "al.parquet")
    kept, _ = load_data({"path": str(tmp_path / "al.parquet"), "columns": ["instruction", "output"]}, tok, MAX_LEN)
    plain, _ = load_data(write_jsonl(tmp_path / "al.jsonl", [{"instruction": "Say hi", "output": "hi"}]), tok, MAX_LEN)
    assert ids_of(kept) == ids_of(plain)
    with pytest.raises(ConfigError, match=r"columns: 'questoin' is not a column \(did you mean 'question'\?\)"):
        load_data({"path": str(tmp_path / "qa.parquet"), "columns": {"questoin": "prompt"}}, tok, MAX_LEN)


def sharegpt(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"row question {i}?"},
                              {"from": "gpt", "value": f"row answer {i}."}], "system": "", "tools": ""}


def test_sharegpt_conversations_load_from_parquet_and_through_a_column_mapping(tok, tmp_path):
    expected, _ = load_data(write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(4)]), tok, MAX_LEN)
    # LLaMA-Factory's Parquet layout: from/value turns, blank system and tools columns
    table([sharegpt(i) for i in range(4)]).to_parquet(tmp_path / "sg.parquet")
    encoded, stats = load_data(str(tmp_path / "sg.parquet"), tok, MAX_LEN)
    assert ids_of(encoded) == ids_of(expected) and stats.formats == {"sharegpt": 4} and not stats.ignored_columns
    # role/content turns under `conversations`: read as is, or renamed to messages as before
    role_content = [{"conversations": chat(i)["messages"]} for i in range(4)]
    path = write_jsonl(tmp_path / "rc.jsonl", role_content)
    as_is, stats = load_data(path, tok, MAX_LEN)
    assert ids_of(as_is) == ids_of(expected) and stats.formats == {"sharegpt": 4}
    renamed, stats = load_data({"path": path, "columns": {"conversations": "messages"}}, tok, MAX_LEN)
    assert ids_of(renamed) == ids_of(expected) and stats.formats == {"messages": 4}
    # from/value turns renamed to messages: pointed back to `conversations`
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": sharegpt(i)["conversations"]} for i in range(4)])
    with pytest.raises(DataError, match=r"sg\.jsonl:1: messages\[0\]: is a ShareGPT turn"):
        load_data({"path": path, "columns": {"conversations": "messages"}}, tok, MAX_LEN)


def test_extra_columns_are_ignored_and_reported_once(tok, tmp_path, caplog):
    plain = [chat(i) for i in range(3)]
    extra = [{**row, "prompt_id": f"p{i}", "category": "chat", "id\x1b[2J": i} for i, row in enumerate(plain)]
    expected, _ = load_data(write_jsonl(tmp_path / "plain.jsonl", plain), tok, MAX_LEN)
    with caplog.at_level(logging.INFO, logger="sstoken"):
        encoded, stats = load_data(write_jsonl(tmp_path / "extra.jsonl", extra), tok, MAX_LEN)
    assert ids_of(encoded) == ids_of(expected)
    assert stats.ignored_columns == ["category", "id\x1b[2J", "prompt_id"]
    notes = [r.getMessage() for r in caplog.records if "ignored columns" in r.getMessage()]
    assert len(notes) == 1 and "\x1b" not in notes[0] and "prompt_id" in notes[0]
    table(extra).to_parquet(tmp_path / "extra.parquet")
    assert ids_of(load_data(str(tmp_path / "extra.parquet"), tok, MAX_LEN)[0]) == ids_of(expected)


def test_a_typo_of_a_format_key_is_still_an_error(tok, tmp_path):
    rows = [{"mesages": chat(0)["messages"]}]
    with pytest.raises(DataError, match=r"a.jsonl:1: mesages: unknown field \(did you mean 'messages'\?\)"):
        load_data(write_jsonl(tmp_path / "a.jsonl", rows), tok, MAX_LEN)
    table(rows).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet, row 0: mesages: unknown field \(did you mean 'messages'\?\)"):
        load_data(str(tmp_path / "a.parquet"), tok, MAX_LEN)


# ------------------------------------------------------------------------------------------ mixtures
def test_mixture_takes_rows_as_trl_does_and_shuffles_deterministically(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [pc(i, "alpha") for i in range(10)])
    table([pc(i, "beta") for i in range(4)]).to_parquet(tmp_path / "b.parquet")
    b = str(tmp_path / "b.parquet")
    all_a, all_b = ids_of(load_data(a, tok, MAX_LEN)[0]), ids_of(load_data(b, tok, MAX_LEN)[0])
    spec = [{"path": a, "fraction": 0.5}, {"path": b, "fraction": 0.5}]
    # shares 1/2 and 1/2; the largest mixture without repeating a row has 8 rows: the first 4 of each
    mixed, stats = load_data(spec, tok, MAX_LEN, seed=1)
    assert sorted(ids_of(mixed)) == sorted(all_a[:4] + all_b[:4]) and stats.used == 8
    assert ids_of(load_data(spec, tok, MAX_LEN, seed=1)[0]) == ids_of(mixed)  # the same seed, the same order
    assert ids_of(load_data(spec, tok, MAX_LEN, seed=2)[0]) != ids_of(mixed)
    uneven, _ = load_data([{"path": a, "fraction": 3}, {"path": b, "fraction": 1}], tok, MAX_LEN)
    assert sorted(ids_of(uneven)) == sorted(all_a[:10] + all_b[:3])  # 3:1 -> total min(10/.75, 4/.25) = 13.3
    concatenated, stats = load_data([a, {"path": b}], tok, MAX_LEN)
    assert sorted(ids_of(concatenated)) == sorted(all_a + all_b) and stats.rows_read == 14


# ------------------------------------------------------------------------------------------ encoding cache
def test_encoding_is_cached_and_reencoded_when_template_or_length_changes(tok, tmp_path, monkeypatch):
    calls = []
    real = sources.encode_row
    monkeypatch.setattr(sources, "encode_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    table([chat(i) for i in range(4)]).to_parquet(tmp_path / "c.parquet")
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(4)])
    for source in (str(tmp_path / "c.parquet"), path):
        calls.clear()
        first, _ = load_data(source, tok, MAX_LEN)
        assert len(calls) == 4
        second, stats = load_data(source, tok, MAX_LEN)
        assert len(calls) == 4 and ids_of(second) == ids_of(first) and stats.used == 4  # from the cache
        load_data(source, tok, MAX_LEN - 1)
        assert len(calls) == 8
    other = own_tokenizer()
    other.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    calls.clear()
    changed, _ = load_data(path, other, MAX_LEN)
    assert len(calls) == 4 and ids_of(changed) != ids_of(first)
    path_again = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(3)])  # the file changed
    assert len(load_data(path_again, tok, MAX_LEN)[0]) == 3


def test_encoding_fingerprint_tracks_template_vocabulary_and_length(tok, tmp_path):
    from transformers import AutoTokenizer

    base = encoding_fingerprint(tok, 64)
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert encoding_fingerprint(reloaded, 64) == base  # the same tokenizer, saved and loaded: the same key
    assert encoding_fingerprint(tok, 65) != base
    templated = own_tokenizer()
    templated.chat_template = templated.chat_template + " "
    assert encoding_fingerprint(templated, 64) != base
    grown = own_tokenizer()
    grown.add_tokens(["<tool_call>"])
    assert encoding_fingerprint(grown, 64) != base


def test_stats_count_skipped_truncated_and_tokens_of_the_used_rows(tok, tmp_path):
    long_prompt = {"prompt": "word " * 200, "completion": "end."}  # the prompt fills the window: skipped
    long_answer = {"prompt": "q? ", "completion": "word " * 200}  # cut short: truncated, kept
    table([pc(0), long_prompt, long_answer, pc(1)]).to_parquet(tmp_path / "s.parquet")
    encoded, stats = load_data(str(tmp_path / "s.parquet"), tok, MAX_LEN)
    assert (stats.rows_read, stats.used, stats.skipped_no_trainable_token, stats.truncated) == (4, 3, 1, 1)
    assert len(encoded) == 3 and stats.tokens == sum(len(ids) for ids in ids_of(encoded))
    assert max(len(ids) for ids in ids_of(encoded)) == MAX_LEN
    labels = [list(x) for x in encoded["labels"]]
    assert stats.trained_tokens == sum(sum(1 for lbl in row[1:] if lbl != -100) for row in labels)


def test_a_failed_encoding_leaves_no_cache_behind(tok, tmp_path):
    path = tmp_path / "f.jsonl"
    write_jsonl(path, [chat(0), {"messages": "nope"}])
    sources.encoding_cache_dir().mkdir(parents=True, exist_ok=True)
    before = set(sources.encoding_cache_dir().iterdir())
    with pytest.raises(DataError, match=r"f.jsonl:2: messages: must be a list"):
        load_data(str(path), tok, MAX_LEN)
    assert set(sources.encoding_cache_dir().iterdir()) == before


# ------------------------------------------------------------------------------------------ Python trainer path
def test_trainer_encoding_uses_the_same_path(tok):
    from sstoken.training.trainer import _encode_dataset

    args = SimpleNamespace(max_length=MAX_LEN, dataset_num_proc=None)
    raw = table([{**chat(i), "prompt_id": f"p{i}", "category": "x"} for i in range(3)])
    encoded, stats = _encode_dataset(raw, tok, args, "train_dataset")
    assert encoded.column_names == ["input_ids", "labels"] and len(encoded) == 3 and stats.formats == {"messages": 3}
    bad = table([chat(0), {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"^eval_dataset, row 1: messages: has no assistant turn"):
        _encode_dataset(bad, tok, args, "eval_dataset")


def test_load_training_rows_still_returns_lists(tok, tmp_path):
    table([pc(i) for i in range(2)]).to_parquet(tmp_path / "p.parquet")
    rows, stats = load_training_rows(tmp_path / "p.parquet", tok, MAX_LEN)
    assert isinstance(rows, list) and set(rows[0]) == {"input_ids", "labels"} and stats.used == 2


# ------------------------------------------------------------------------------------------ recipe and CLI
def test_recipe_paths_in_mappings_and_lists_are_relative_to_the_recipe(tmp_path):
    folder = tmp_path / "recipes"
    write_jsonl(folder / "data" / "a.jsonl", [pc(0)])
    table([pc(1)]).to_parquet(folder / "b.parquet")
    recipe = write_tiny_recipe(folder / "r.yaml", data=[{"path": "data/a.jsonl", "fraction": 1},
                                                        {"path": "parquet", "data_files": ["b.parquet"], "fraction": 1}],
                               eval_data={"path": "data/a.jsonl"})
    loaded = load_recipe(recipe)
    assert loaded["data"][0]["path"] == str(folder / "data" / "a.jsonl")
    assert loaded["data"][1] == {"path": "parquet", "data_files": [str(folder / "b.parquet")], "fraction": 1}
    assert loaded["eval_data"] == {"path": str(folder / "data" / "a.jsonl")}
    split_recipe(loaded)  # valid


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the data spec is bad")

    monkeypatch.setattr(sstoken.models, "load_model", refuse)


@pytest.mark.parametrize("data, message", [
    ({"path": "x.jsonl", "colums": {}}, "unknown data key 'colums' (did you mean 'columns'?)"),
    ([{"path": "org/a", "fraction": 1}, {"path": "./missing.parquet", "fraction": 1}],
     "training data missing.parquet does not exist"),
])
def test_a_bad_data_spec_fails_before_the_model_loads(tmp_path, tiny_model_dir, no_model_loads, capsys, data,
                                                      message):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=data, output_dir=str(tmp_path / "o"))
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_text_data_is_refused_before_the_model_loads_for_attention_selectors(tmp_path, tiny_model_dir,
                                                                              no_model_loads, capsys):
    texts = [{"text": f"Person {i} was born in Paris."} for i in range(3)]
    data = write_jsonl(tmp_path / "lm.jsonl", [chat(0), *texts])
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=data, output_dir=str(tmp_path / "o"))
    assert main(["train", "--config", str(recipe)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the encoding's progress bar
    assert last.startswith("sstoken: error: data: 3 of 4 rows are plain text") and "selection_method rel or rho1" in last


def test_an_unreachable_hub_dataset_fails_before_the_model_loads(tmp_path, tiny_model_dir, no_model_loads, capsys):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data="someorg/sft-data",
                               output_dir=str(tmp_path / "o"))
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the Hub dataset 'someorg/sft-data'" in err and err.count("\n") == 1


def test_cache_then_train_on_a_parquet_and_jsonl_mixture(tmp_path, tiny_model_dir):
    """End to end: `sstoken cache` covers exactly the rows `sstoken train` uses (the mixture and its order)."""
    rows = [{**chat(i, "alpha"), "category": "chat"} for i in range(12)]
    table(rows).to_parquet(tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", [pc(i, "beta") for i in range(6)])
    recipe = write_tiny_recipe(
        tmp_path / "r.yaml", model=tiny_model_dir, output_dir=str(tmp_path / "out"), history_cache=str(tmp_path / "nll"),
        data=[{"path": "a.parquet", "fraction": 2}, {"path": "b.jsonl", "fraction": 1}], data_seed=3,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        max_steps=2, per_device_train_batch_size=4, save_strategy="no", logging_steps=1)
    assert main(["cache", "--config", str(recipe)]) == 0
    assert main(["train", "--config", str(recipe)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_used"] == 18 and summary["steps"] == 2  # 2:1 -> 12 + 6 rows
    assert summary["data"][0]["path"] == str(tmp_path / "a.parquet")


# ------------------------------------------------------------------------------------------ review fixes
def test_jsonl_cache_key_is_the_content_not_size_and_mtime(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [pc(1, "aaa")])
    first, _ = load_data(str(path), tok, MAX_LEN)
    stat = path.stat()
    write_jsonl(path, [pc(2, "bbb")])  # the same size, other bytes
    assert path.stat().st_size == stat.st_size
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -t leave it
    second, _ = load_data(str(path), tok, MAX_LEN)
    expected, _ = load_data(write_jsonl(tmp_path / "fresh.jsonl", [pc(2, "bbb")]), tok, MAX_LEN)
    assert ids_of(second) == ids_of(expected) != ids_of(first)


def test_a_saved_single_dataset_refuses_other_splits_and_files(tok, tmp_path):
    table([pc(i) for i in range(3)]).save_to_disk(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    assert len(load_data({"path": saved, "split": "train"}, tok, MAX_LEN)[0]) == 3
    with pytest.raises(ConfigError, match="is one saved Dataset, which is the train split"):
        load_data({"path": saved, "split": "test"}, tok, MAX_LEN)
    for key, value in (("data_files", "x.jsonl"), ("data_dir", "sub"), ("config", "en")):
        with pytest.raises(ConfigError, match=f"is a saved dataset .*; {key} does not apply"):
            load_data({"path": saved, key: value}, tok, MAX_LEN)
    datasets.DatasetDict({"train": table([pc(0)]), "dev": table([pc(1)])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ConfigError, match="no split 'test'; it has train, dev"):
        load_data({"path": str(tmp_path / "dd"), "split": "test"}, tok, MAX_LEN)


def _gzip(path: Path, rows: list[dict]) -> str:
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compressed_files_are_read_directly_and_in_folders(tok, tmp_path, caplog):
    folder = tmp_path / "shards"
    write_jsonl(folder / "train-0.jsonl", [pc(i) for i in range(2)])
    _gzip(folder / "train-1.jsonl.gz", [pc(i) for i in range(2, 5)])
    (folder / "train-notes.txt").write_text("not data")
    expected, _ = load_data(write_jsonl(tmp_path / "all.jsonl", [pc(i) for i in range(5)]), tok, MAX_LEN)
    with caplog.at_level(logging.WARNING, logger="sstoken"):
        encoded, stats = load_data(str(folder), tok, MAX_LEN)
    assert stats.rows_read == 5 and ids_of(encoded) == ids_of(expected)
    assert "train-notes.txt" in caplog.text and "train-1.jsonl.gz" not in caplog.text
    direct, _ = load_data(str(folder / "train-1.jsonl.gz"), tok, MAX_LEN)
    assert ids_of(direct) == ids_of(expected)[2:]
    table([pc(0)]).to_parquet(tmp_path / "p.parquet")
    import gzip

    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress((tmp_path / "p.parquet").read_bytes()))
    with pytest.raises(ConfigError, match="compressed parquet file cannot be read; decompress it"):
        load_data(str(tmp_path / "p.parquet.gz"), tok, MAX_LEN)


def test_compressed_json_lines_are_read_strictly_like_their_plain_twin(tok, tmp_path):
    """A .jsonl.gz/.bz2/.xz goes through the strict reader: the same rows (a null stays a written null), and a bad
    line or a cut archive is named by path:line."""
    import bz2
    import gzip
    import lzma

    rows = [pc(i) for i in range(3)]
    plain = "".join(json.dumps(r) + "\n" for r in rows).encode()
    expected, _ = load_data(write_jsonl(tmp_path / "p.jsonl", rows), tok, MAX_LEN)
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        path = tmp_path / f"p.jsonl{suffix}"
        path.write_bytes(compress(plain))
        encoded, stats = load_data(str(path), tok, MAX_LEN)
        assert ids_of(encoded) == ids_of(expected) and stats.used == 3, suffix
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(plain + b'{"prompt": "a", "prompt": "b", "completion": "c"}\n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz:4: .*duplicate key"):
        load_data(str(bad), tok, MAX_LEN)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(plain * 50)[:-30])
    with pytest.raises(DataError, match=r"cut.jsonl.gz:\d+: cannot read the file"):
        load_data(str(cut), tok, MAX_LEN)


def test_builder_data_file_globs_are_relative_to_the_recipe(tok, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    write_jsonl(folder / "data" / "a.jsonl", [pc(0)])
    write_jsonl(folder / "data" / "b.jsonl", [pc(1)])
    recipe = write_tiny_recipe(folder / "r.yaml", data={"path": "json", "data_files": "data/*.jsonl"},
                               eval_data={"path": "json", "data_files": {"train": ["data/a.jsonl", "hf://x/y.jsonl"]}})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe(recipe)
    assert loaded["data"]["data_files"] == str(folder / "data" / "*.jsonl")
    assert loaded["eval_data"]["data_files"] == {"train": [str(folder / "data" / "a.jsonl"), "hf://x/y.jsonl"]}
    assert len(load_data(loaded["data"], tok, MAX_LEN)[0]) == 2


def test_an_iterable_dataset_is_encoded_lazily(tok):
    raw = datasets.Dataset.from_list([chat(i) for i in range(3)])
    expected, _ = sources.encode_dataset(raw, tok, MAX_LEN)
    encoded, stats = sources.encode_dataset(raw.to_iterable_dataset(), tok, MAX_LEN)
    assert isinstance(encoded, datasets.IterableDataset) and stats.rows_read == 0
    assert [list(r["input_ids"]) for r in encoded] == ids_of(expected)
    assert [list(r["labels"]) for r in encoded] == [list(x) for x in expected["labels"]]
    # rows without a trained token are filtered as they stream; a bad row fails with its index
    short, _ = sources.encode_dataset(raw.to_iterable_dataset(), tok, 2)
    assert list(short) == []
    bad = datasets.Dataset.from_list([pc(0), {"prompt": "q", "completion": ""}]).to_iterable_dataset()
    with pytest.raises(DataError, match=r"^dataset, row 1: "):
        list(sources.encode_dataset(bad, tok, MAX_LEN, label="dataset")[0])


def test_sstoken_trainer_trains_on_an_iterable_dataset(tmp_path):
    from sstoken.testing import tiny_lora, tiny_model, tiny_training_args
    from sstoken.training.trainer import SSTokenTrainer

    raw = datasets.Dataset.from_list([chat(i) for i in range(8)]).to_iterable_dataset()
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=tiny_training_args(
        tmp_path / "out", max_steps=2, per_device_train_batch_size=2, activation_checkpointing=False),
        train_dataset=raw, processing_class=tiny_tokenizer(), peft_config=tiny_lora())
    assert -100 in next(iter(trainer.train_dataset))["labels"]
    assert trainer.train().global_step == 2


def test_a_stream_with_unknown_features_is_encoded_by_sstoken_and_text_streams_are_judged(tmp_path):
    """A generator stream has no column names until read: sstoken must still encode it (not hand it to TRL raw),
    and a stream of plain text rows is refused for a selector that needs the context, as a Dataset is."""
    from sstoken.testing import tiny_lora, tiny_model, tiny_training_args
    from sstoken.training.trainer import SSTokenTrainer

    def rows():
        yield from (chat(i) for i in range(8))

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.column_names is None
    args = tiny_training_args(tmp_path / "out", max_steps=1, per_device_train_batch_size=2,
                              activation_checkpointing=False)
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=args, train_dataset=stream,
                             processing_class=tiny_tokenizer(), peft_config=tiny_lora())
    assert -100 in next(iter(trainer.train_dataset))["labels"]

    def text():
        yield from ({"text": f"plain text number {i}."} for i in range(8))

    with pytest.raises(ConfigError, match="the streamed rows are plain text"):
        SSTokenTrainer(model=tiny_model("llama"), args=args, train_dataset=datasets.IterableDataset.from_generator(text),
                       processing_class=tiny_tokenizer(), peft_config=tiny_lora())


def test_a_stream_mixing_chat_and_text_rows_is_refused_when_the_text_row_arrives(tmp_path):
    from sstoken.testing import tiny_lora, tiny_model, tiny_training_args
    from sstoken.training.trainer import SSTokenTrainer

    rows = [chat(0), {"text": "plain text row."}, chat(1)]

    def stream():
        return table(rows).to_iterable_dataset()

    def trainer(method, **datasets_):
        args = tiny_training_args(tmp_path / method, max_steps=1, per_device_train_batch_size=1,
                                  activation_checkpointing=False, selection_method=method)
        return SSTokenTrainer(model=tiny_model("llama"), args=args, processing_class=tiny_tokenizer(),
                              peft_config=tiny_lora(), **datasets_)

    encoded = trainer("sstoken", train_dataset=stream()).train_dataset  # its columns include messages: accepted
    with pytest.raises(ConfigError, match=r"train_dataset, row 1: a plain text row \('text': every token is "
                                          r"trained.*selection_method 'sstoken'"):
        list(encoded)
    assert len(list(trainer("rel", train_dataset=stream()).train_dataset)) == 3
    assert len(list(trainer("rel", train_dataset=stream(), eval_dataset=stream()).eval_dataset)) == 3


def test_jsonl_columns_must_name_a_column_of_some_row(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a."}, {"question": "r?", "answer": "b"}])
    with pytest.raises(ConfigError, match=r"qa.jsonl: columns: 'questoin' is not a column \(did you mean "
                                          r"'question'\?\); it has question, answer"):
        load_data({"path": path, "columns": {"questoin": "prompt", "answer": "completion"}}, tok, MAX_LEN)
    with pytest.raises(ConfigError, match="'output' is not a column"):
        load_data({"path": path, "columns": ["question", "output"]}, tok, MAX_LEN)
    assert len(load_data({"path": path, "columns": {"question": "prompt", "answer": "completion"}}, tok, MAX_LEN)[0]) == 2


def test_inspect_reads_a_mixture_in_the_order_train_does(tok, tmp_path, monkeypatch):
    from sstoken.cli.inspect import _load_for_inspect

    a = write_jsonl(tmp_path / "a.jsonl", [pc(i, "alpha") for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [pc(i, "beta") for i in range(6)])
    monkeypatch.setattr(sstoken.models, "load_tokenizer", lambda *a, **k: tok)
    monkeypatch.setattr(sstoken.models, "load_model", lambda *a, **k: "model")
    spec = f"[{{path: {a}, fraction: 1}}, {{path: {b}, fraction: 1}}]"
    ns = SimpleNamespace(data=spec, samples=4, rho=0.6, gamma=0.5, adapter=None, model=None, dtype=None,
                         max_seq_length=MAX_LEN, data_seed=7)
    _, _, rows = _load_for_inspect(ns)
    train, _ = load_data([{"path": a, "fraction": 1}, {"path": b, "fraction": 1}], tok, MAX_LEN, seed=7)
    assert [r["input_ids"] for r in rows] == ids_of(train)[:4]


def test_cli_encodes_on_the_main_process_first(tok, tmp_path, monkeypatch):
    import contextlib

    from sstoken.cli.common import load_run_rows
    from sstoken.cli.recipe import build_config

    recipe = write_tiny_recipe(tmp_path / "r.yaml", data=write_jsonl(tmp_path / "d.jsonl", [pc(0)]),
                               output_dir=str(tmp_path / "o"))
    run, config = split_recipe(load_recipe(recipe))
    config = build_config(config)
    events = []

    @contextlib.contextmanager
    def recording(self, local=True, desc="work"):
        events.append("enter")
        yield
        events.append("exit")

    real_load = sources.load_data
    monkeypatch.setattr(sources, "load_data", lambda *a, **k: events.append("load") or real_load(*a, **k))
    rows, _ = load_run_rows(run["data"], tok, MAX_LEN, config)  # one process: the real one is a no-op
    assert len(rows) == 1 and events == ["load"]
    monkeypatch.setattr(type(config), "main_process_first", recording)
    events.clear()
    load_run_rows(run["data"], tok, MAX_LEN, config)
    assert events == ["enter", "load", "exit"]


def test_a_parquet_file_edited_with_its_mtime_restored_is_read_again(tok, tmp_path):
    import os

    path = tmp_path / "p.parquet"
    table([pc(1, "aaa")]).to_parquet(path)
    first, _ = load_data(str(path), tok, MAX_LEN)
    stat = path.stat()
    table([pc(2, "bbb")]).to_parquet(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second, _ = load_data(str(path), tok, MAX_LEN)
    expected, _ = load_data(write_jsonl(tmp_path / "fresh.jsonl", [pc(2, "bbb")]), tok, MAX_LEN)
    assert ids_of(second) == ids_of(expected) != ids_of(first)


def test_a_zst_file_without_zstandard_is_one_config_error(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_has_module", lambda name: False)
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ConfigError, match=r"a.jsonl.zst: reading .zst files needs the zstandard package"):
        load_data(str(tmp_path / "a.jsonl.zst"), tok, MAX_LEN)

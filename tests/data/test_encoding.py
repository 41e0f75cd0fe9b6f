"""Tests for sstoken.data: formats, label masks, truncation, and the bad-input corpus in tests/data/bad."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest

from sstoken.batch import IGNORE_INDEX
from sstoken.data.encoding import EncodedRow, encode_row, to_hf_dataset
from sstoken.data.formats import format_of
from sstoken.data.reading import MAX_LINE_BYTES, read_jsonl
from sstoken.data.sources import LoadStats, load_training_rows
from sstoken.data.templates import FALLBACK_CHAT_TEMPLATE
from sstoken.errors import ConfigError, DataError
from sstoken.testing import CHATML_TEMPLATE

DATA = Path(__file__).parent
BAD = DATA / "bad"
GOOD = DATA / "good"
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "src" / "sstoken" / "demo" / "demo.jsonl"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The tiny tokenizer without a chat template (uses FALLBACK_CHAT_TEMPLATE)."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


def trained_runs(tok, enc: EncodedRow) -> list[str]:
    """Decoded maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for label in enc.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def context_text(tok, enc: EncodedRow) -> str:
    return tok.decode([i for i, lbl in zip(enc.input_ids, enc.labels) if lbl == IGNORE_INDEX])


def check_invariants(enc: EncodedRow):
    assert len(enc.input_ids) == len(enc.labels)
    for i, lbl in zip(enc.input_ids, enc.labels):
        assert lbl in (IGNORE_INDEX, i)


# --------------------------------------------------------------------------------------------------
# Label masks, hand-checked
# --------------------------------------------------------------------------------------------------


def test_messages_trained_tokens_are_assistant_content_plus_end_token(tok):
    row = {"messages": [S("You are a helpful assistant."), U("What is the capital of France?"), A("Paris.")]}
    enc = encode_row(row, tok, 512)
    check_invariants(enc)
    assert enc.format == "messages" and not enc.truncated
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(row["messages"], tokenize=False)
    assert trained_runs(tok, enc) == ["Paris.<|im_end|>"]
    # the system prompt, the user turn and the trailing newline are context
    assert context_text(tok, enc) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    assert enc.labels[-1] == IGNORE_INDEX  # "\n" after <|im_end|>


def test_multi_turn_trains_every_assistant_turn_and_not_the_user_turn_between(tok):
    row = {"messages": [U("What is 2 plus 2?"), A("4"), U("And 3 times 3?"), A("9 equals 3 times 3.")]}
    enc = encode_row(row, tok, 512)
    check_invariants(enc)
    assert trained_runs(tok, enc) == ["4<|im_end|>", "9 equals 3 times 3.<|im_end|>"]
    assert "And 3 times 3?" in context_text(tok, enc)
    assert "<|im_start|>user\nAnd 3 times 3?<|im_end|>\n<|im_start|>assistant\n" in context_text(tok, enc)


def test_trailing_user_turn_is_context(tok):
    enc = encode_row({"messages": [U("q"), A("Paris."), U("thanks")]}, tok, 512)
    assert trained_runs(tok, enc) == ["Paris.<|im_end|>"]
    assert context_text(tok, enc).endswith("<|im_start|>user\nthanks<|im_end|>\n")


def test_prompt_completion_strings_train_completion_plus_eos(tok):
    row = {"prompt": "Question: how many apples are left? Answer:", "completion": " 7 apples are left."}
    enc = encode_row(row, tok, 512)
    check_invariants(enc)
    assert enc.format == "prompt_completion"
    assert tok.decode(enc.input_ids) == row["prompt"] + row["completion"] + tok.eos_token
    assert trained_runs(tok, enc) == [" 7 apples are left.<|im_end|>"]
    n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tok.eos_token_id


def test_prompt_completion_does_not_double_eos(tok):
    enc = encode_row({"prompt": "Q:", "completion": " 7<|im_end|>"}, tok, 512)
    assert tok.decode(enc.input_ids) == "Q: 7<|im_end|>"


def test_conversational_prompt_completion(tok):
    row = {
        "prompt": [S("Be brief."), U("What is 2 plus 2?"), A("4"), U("And 3 plus 3?")],
        "completion": [A("6")],
    }
    enc = encode_row(row, tok, 512)
    check_invariants(enc)
    assert enc.format == "prompt_completion"
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert tok.decode(enc.input_ids) == full
    assert trained_runs(tok, enc) == ["6<|im_end|>"]  # the assistant turn in the prompt is context


@pytest.mark.parametrize(
    "row, user",
    [
        ({"instruction": "Add the numbers.", "input": "1 2", "output": "3"}, "Add the numbers.\n\n1 2"),
        ({"instruction": "Add 1 and 2.", "input": "", "output": "3"}, "Add 1 and 2."),
        ({"instruction": "Add 1 and 2.", "output": "3"}, "Add 1 and 2."),
    ],
)
def test_alpaca_with_and_without_input(tok, row, user):
    enc = encode_row(row, tok, 512)
    check_invariants(enc)
    assert enc.format == "alpaca"
    assert tok.decode(enc.input_ids) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    assert trained_runs(tok, enc) == ["3<|im_end|>"]


def test_alpaca_system(tok):
    enc = encode_row({"instruction": "Say hi.", "output": "Hi.", "system": "Be nice."}, tok, 512)
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nSay hi.")
    assert trained_runs(tok, enc) == ["Hi.<|im_end|>"]


def test_fallback_template_without_chat_template(plain_tok):
    assert plain_tok.chat_template is None
    row = {"messages": [S("Be brief."), U("What is 2 plus 2?"), A("4"), U("Times 3?"), A("12")]}
    enc = encode_row(row, plain_tok, 512)
    check_invariants(enc)
    assert plain_tok.decode(enc.input_ids) == (
        "Be brief.\n\n### Instruction:\nWhat is 2 plus 2?\n\n### Response:\n4<|im_end|>\n\n"
        "### Instruction:\nTimes 3?\n\n### Response:\n12<|im_end|>\n\n"
    )
    assert trained_runs(plain_tok, enc) == ["4<|im_end|>", "12<|im_end|>"]
    alpaca = encode_row({"instruction": "Add.", "input": "1 2", "output": "3"}, plain_tok, 512)
    assert plain_tok.decode(alpaca.input_ids) == "### Instruction:\nAdd.\n\n1 2\n\n### Response:\n3<|im_end|>\n\n"
    assert trained_runs(plain_tok, alpaca) == ["3<|im_end|>"]
    assert "### Response:" in FALLBACK_CHAT_TEMPLATE


def test_template_without_generation_prompt_is_rejected(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0]
    with pytest.raises(DataError, match="generation prompt"):
        encode_row({"messages": [U("q"), A("a")]}, t, 512, where="f.jsonl:3")


MISTRAL_TEMPLATE = (  # no generation prompt: the assistant content follows [/INST] directly
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
    "{% else %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}"
)


def test_template_that_needs_no_generation_prompt_is_accepted(tok):
    t = copy.deepcopy(tok)
    t.chat_template = MISTRAL_TEMPLATE
    enc = encode_row({"messages": [U("What is 2 plus 2?"), A("4"), U("And 3 times 3?"), A("9.")]}, t, 512)
    assert trained_runs(t, enc) == [" 4<|im_end|>", " 9.<|im_end|>"]  # eos_token is <|im_end|> here
    assert context_text(t, enc) == "[INST] What is 2 plus 2? [/INST][INST] And 3 times 3? [/INST]"


def test_template_not_prefix_stable_is_rejected(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{{ messages | length }}\n" + CHATML_TEMPLATE
    with pytest.raises(DataError, match=r"^f\.jsonl:3: messages\[1\]: the chat template is not prefix-stable"):
        encode_row({"messages": [U("q"), A("a")]}, t, 512, where="f.jsonl:3")


def test_template_that_raises_becomes_data_error(tok):
    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHATML_TEMPLATE
    )
    assert encode_row({"messages": [U("q"), A("a")]}, t, 512) is not None
    with pytest.raises(DataError, match="^x:7: .*System role not supported"):
        encode_row({"messages": [S("s"), U("q"), A("a")]}, t, 512, where="x:7")


# --------------------------------------------------------------------------------------------------
# Truncation and skips
# --------------------------------------------------------------------------------------------------


def test_truncation_from_the_right(tok):
    answer = "The quick brown fox jumps over the lazy dog. " * 5
    full = encode_row({"messages": [U("q"), A(answer)]}, tok, 4096)
    enc = encode_row({"messages": [U("q"), A(answer)]}, tok, 20)
    assert enc.truncated and not full.truncated
    assert enc.input_ids == full.input_ids[:20] and enc.labels == full.labels[:20]
    assert enc.num_trained > 0


def test_skip_when_prompt_fills_the_window(tok):
    prompt = "What is the capital of France? " * 10
    assert encode_row({"messages": [U(prompt), A("Paris.")]}, tok, 16) is None
    assert encode_row({"prompt": prompt, "completion": " Paris."}, tok, 16) is None
    assert encode_row({"instruction": prompt, "output": "Paris."}, tok, 16) is None
    assert encode_row({"messages": [U(prompt), A("Paris.")]}, tok, 512) is not None


def chat(pairs: int) -> dict:
    messages = []
    for i in range(pairs):
        messages += [U(f"question {i}?"), A(f"answer {i}.")]
    return {"messages": messages}


def test_long_chat_costs_work_linear_in_its_turns(tok, rendered_messages):
    """A row of thousands of turns once hung the data check (each turn re-renders all before it). Turns
    past max_seq_length are not located, so the messages rendered grow with the row, not with its square."""
    long_row = chat(5000)
    enc = encode_row(long_row, tok, 128)
    assert rendered_messages["messages"] < 2 * len(long_row["messages"])  # quadratic would be ~ 10000**2
    # Cutting the conversation short changes nothing inside the window.
    assert enc.as_dict() == encode_row(chat(40), tok, 128).as_dict()
    assert enc.truncated and enc.num_trained > 0


def test_too_many_assistant_turns_inside_the_window_is_a_data_error(tok, monkeypatch):
    from sstoken.data import templates

    monkeypatch.setattr(templates, "MAX_ASSISTANT_TURNS", 3)
    assert encode_row(chat(3), tok, 4096) is not None
    with pytest.raises(DataError, match=r"messages\[7\]: more than 3 assistant turns .* split the conversation"):
        encode_row(chat(4), tok, 4096)
    assert encode_row(chat(4), tok, 24) is not None  # the 4th turn is cut off by truncation: not counted


def test_load_counts_skips_and_truncations(tok, tmp_path):
    long_prompt = "What is the capital of France? " * 10
    lines = [
        {"messages": [U("q"), A("Paris.")]},
        {"prompt": long_prompt, "completion": " Paris."},  # skipped
        {"messages": [U("q"), A("The quick brown fox jumps over the lazy dog. " * 5)]},  # truncated
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows, stats = load_training_rows(path, tok, 24)
    assert isinstance(stats, LoadStats)
    assert (stats.rows_read, stats.used, stats.skipped_no_trainable_token, stats.truncated) == (3, 2, 1, 1)
    assert stats.formats == {"messages": 2}
    assert [sorted(r) for r in rows] == [["input_ids", "labels"]] * 2
    assert all(len(r["input_ids"]) <= 24 for r in rows)
    assert stats.tokens == sum(len(r["input_ids"]) for r in rows)


def test_bad_max_seq_length_and_slow_tokenizer(tok):
    for bad in (0, 1, -5, 2.5, True, None):
        with pytest.raises(ConfigError):
            encode_row({"prompt": "a", "completion": "b"}, tok, bad)

    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        encode_row({"prompt": "a", "completion": "b"}, Slow(), 16)


# --------------------------------------------------------------------------------------------------
# ShareGPT conversations and language-modelling text
# --------------------------------------------------------------------------------------------------


def G(speaker, value, **extra):
    return {"from": speaker, "value": value, **extra}


def test_sharegpt_is_encoded_like_the_same_messages(tok):
    row = {"conversations": [G("human", "What is 2 plus 2?"), G("gpt", "4"), G("human", "And 3 times 3?"),
                             G("gpt", "9.")], "system": "Be brief.", "id": 7}
    enc = encode_row(row, tok, 512)
    assert enc.format == "sharegpt"
    assert trained_runs(tok, enc) == ["4<|im_end|>", "9.<|im_end|>"]
    assert context_text(tok, enc).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    same = [S("Be brief."), U("What is 2 plus 2?"), A("4"), U("And 3 times 3?"), A("9.")]
    assert enc.as_dict() == encode_row({"messages": same}, tok, 512).as_dict()


def test_sharegpt_variants_system_turn_role_content_and_blank_system(tok):
    expected = encode_row({"messages": [S("Be brief."), U("q"), A("Paris.")]}, tok, 512).as_dict()
    as_turn = {"conversations": [G("system", "Be brief."), G("human", "q"), G("gpt", "Paris.")], "system": ""}
    role_content = {"conversations": [S("Be brief."), U("q"), A("Paris.")]}
    weights = {"conversations": [G("system", "Be brief.", weight=0), G("human", "q", weight=0),
                                 G("gpt", "Paris.", weight=1)]}
    for row in (as_turn, role_content, weights):
        enc = encode_row(row, tok, 512)
        assert enc.format == "sharegpt" and enc.as_dict() == expected


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"conversations": [G("human", "q"), G("gtp", "a")]}, "conversations[1].from", "unknown speaker 'gtp'"),
        ({"conversations": [G("Human", "q"), G("gpt", "a")]}, "conversations[0].from", "did you mean 'human'?"),
        ({"conversations": [G("human", "q"), G("bot", "a")]}, "conversations[1].from", "(use 'gpt')"),
        ({"conversations": [G("human", "q"), G("gpt", " ")]}, "conversations[1].value", "empty or whitespace"),
        ({"conversations": [G("human", "q"), G("gpt", None)]}, "conversations[1].value", "got null"),
        ({"conversations": [G("human", "q"), {"from": "gpt"}]}, "conversations[1].value", "missing"),
        ({"conversations": [G("human", "q"), {"value": "a"}]}, "conversations[1].from", "missing"),
        ({"conversations": [G("human", "q"), G("gpt", "a", weight=-1)]}, "conversations[1].weight",
         "must be a number from 0 to 10"),
        ({"conversations": [G("human", "q", weight=1), G("gpt", "a")]}, "conversations[0].weight",
         "on a user message, which is context and never trained"),
        ({"conversations": [G("human", "q"), G("gpt", "a", loss=True)]}, "conversations[1].loss",
         "a ShareGPT turn has 'from' and 'value'"),
        ({"conversations": [G("human", "q"), G("system", "s"), G("gpt", "a")]}, "conversations[1].from",
         "only allowed as the first turn"),
        ({"conversations": [G("system", "s"), G("human", "q"), G("gpt", "a")], "system": "t"}, "system",
         "two system prompts"),
        ({"conversations": [G("human", "q")]}, "conversations", "has no assistant turn"),
        ({"conversations": []}, "conversations", "empty list"),
        ({"conversations": "q"}, "conversations", "must be a list of turns"),
        ({"conversations": [G("human", "q"), G("function_call", "get the weather")]}, "conversations[1].value",
         "must hold the JSON text of a tool call"),
        ({"conversations": [G("human", "q"), G("function_call", '{"name": "f"}')]},
         "conversations[1].value.arguments", "missing"),
        ({"conversations": [U("q"), {"role": "gpt", "content": "a"}]}, "conversations[1].role", "use 'assistant'"),
        ({"messages": [G("human", "q"), G("gpt", "a")]}, "messages[0]", "goes in a 'conversations' column"),
        ({"conversations": [G("human", "q"), G("gpt", "a")], "instruction": "q", "output": "a"}, None,
         "row mixes formats"),
    ],
)
def test_malformed_sharegpt_rows_name_the_field(tok, row, field, message):
    with pytest.raises(DataError) as info:
        encode_row(row, tok, 512, where="f:1")
    text = str(info.value)
    assert text.startswith(f"f:1: {field}: " if field else "f:1: ") and message in text and "\n" not in text, text


def test_text_row_trains_every_token_as_trl_does(tok):
    enc = encode_row({"text": "Alice was born in Paris.", "id": 1}, tok, 512)
    assert enc.format == "text" and enc.labels == enc.input_ids
    assert tok.decode(enc.input_ids) == "Alice was born in Paris." + tok.eos_token
    # a text column beside a conversation format is a rendered copy of the row, not a second format
    assert format_of({"messages": [], "text": "<|im_start|>..."}) == "messages"
    with pytest.raises(DataError, match=r"^f:1: text: is empty or whitespace only"):
        encode_row({"text": " "}, tok, 512, where="f:1")
    with pytest.raises(DataError, match=r"^f:1: tools: only conversations can use tools"):
        encode_row({"text": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, tok, 512, where="f:1")


# --------------------------------------------------------------------------------------------------
# format_of, read_jsonl, limits
# --------------------------------------------------------------------------------------------------


def test_format_of():
    assert format_of({"messages": [], "id": 1}) == "messages"
    assert format_of({"prompt": "a", "completion": "b", "meta": {}}) == "prompt_completion"
    assert format_of({"instruction": "a", "output": "b", "source": "x", "metadata": None}) == "alpaca"
    with pytest.raises(DataError, match="^<row>: row mixes formats"):
        format_of({"messages": [], "instruction": "a", "output": "b"})
    with pytest.raises(DataError, match="^r:1: mesages: unknown field .*did you mean 'messages'"):
        format_of({"mesages": []}, where="r:1")


def test_format_of_ignores_columns_no_format_uses():
    assert format_of({"messages": [], "category": "x", "prompt_id": "p1", "tools": []}) == "messages"
    # UltraChat rows carry the first question again as `prompt`: an incomplete format is ignored too
    assert format_of({"messages": [], "prompt": "q", "prompt_id": "p1"}) == "messages"
    assert format_of({"instruction": "a", "output": "b", "text": "a b"}) == "alpaca"
    with pytest.raises(DataError, match="row mixes formats: 'messages' .* and 'system' .*'role': 'system'"):
        format_of({"messages": [], "system": "be brief"})
    with pytest.raises(DataError, match="row mixes formats"):
        format_of({"messages": [], "prompt": "q", "completion": "a"})
    # a near miss of a key the row lacks is still an error, not an ignored column
    with pytest.raises(DataError, match="^<row>: inptu: unknown field .*did you mean 'input'"):
        format_of({"instruction": "a", "output": "b", "inptu": "c"})
    with pytest.raises(DataError, match="conversation: unknown field .*did you mean 'conversations'"):
        format_of({"conversation": [], "id": 1})
    with pytest.raises(DataError, match="complettion: unknown field .*did you mean 'completion'"):
        format_of({"prompt": "q", "complettion": "a"})
    with pytest.raises(DataError, match=r"row has no data: .*\(the row has 'question', 'answer'\); map other names"):
        format_of({"question": "q", "answer": "a"})


def test_read_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'\n{"a": 1}\n\n  \t\r\n{"b": 2}')
    assert list(read_jsonl(path)) == [(2, {"a": 1}), (5, {"b": 2})]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_line_limit_is_exact(tmp_path):
    line = json.dumps({"prompt": "a" * 50, "completion": "b"}).encode()
    path = tmp_path / "f.jsonl"
    path.write_bytes(line + b"\r\n" + line + b"x\n")
    it = read_jsonl(path, max_line_bytes=len(line))
    assert next(it)[0] == 1  # exactly at the limit (CRLF not counted) is fine
    with pytest.raises(DataError, match=rf"^{path}:2: line longer than {len(line)} bytes"):
        next(it)


@pytest.fixture
def huge_line_file(tmp_path):
    """A file whose second line is 50 MB (generated, never committed)."""
    path = tmp_path / "huge_line.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
        f.write(b'{"prompt": "' + b"x" * (50 * 1024 * 1024) + b'", "completion": "b"}\n')
        f.write(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
    return path


def test_huge_line_is_rejected_with_the_documented_limit(huge_line_file, tok):
    assert MAX_LINE_BYTES == 16 * 1024 * 1024
    with pytest.raises(DataError) as info:
        load_training_rows(huge_line_file, tok, 64)
    assert str(info.value).startswith(f"{huge_line_file}:2: line longer than {MAX_LINE_BYTES} bytes")


# --------------------------------------------------------------------------------------------------
# Bad-input corpus
# --------------------------------------------------------------------------------------------------


def corpus_files() -> list[str]:
    return sorted(p.name for p in BAD.iterdir() if p.name != "EXPECTED.json")


def test_corpus_is_big_and_every_file_is_listed():
    files = corpus_files()
    assert len([n for n in files if EXPECTED.get(n, {}).get("outcome") == "error"]) >= 30
    assert set(files) == set(EXPECTED), (
        f"unlisted files: {sorted(set(files) - set(EXPECTED))}; "
        f"listed but missing: {sorted(set(EXPECTED) - set(files))}"
    )
    assert not any(p.stat().st_size > 64 * 1024 for p in BAD.iterdir())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_corpus(name, tok):
    expected = EXPECTED[name]
    path = BAD / name
    max_seq_length = expected.get("max_seq_length", 512)
    if expected["outcome"] == "ok":  # counted skips / truncations, not errors
        rows, stats = load_training_rows(path, tok, max_seq_length)
        assert stats.used == expected["used"] == len(rows)
        assert stats.skipped_no_trainable_token == expected["skipped"]
        assert stats.truncated == expected["truncated"]
        return
    assert expected["outcome"] == "error"
    with pytest.raises(DataError) as info:  # any other exception fails the test
        load_training_rows(path, tok, max_seq_length)
    message = str(info.value)
    assert name in message
    prefix = f"{path}:{expected['line']}: " if expected["line"] is not None else f"{path}: "
    assert message.startswith(prefix), message
    for part in expected["contains"]:
        assert part in message, f"{part!r} not in {message!r}"
    for part in expected.get("excludes", []):  # e.g. a did-you-mean that points the wrong way
        assert part not in message, f"{part!r} in {message!r}"
    assert "\n" not in message  # one line for the CLI


GOOD_CASES = {
    "bom_first_line.jsonl": 2,  # a UTF-8 BOM on line 1 is accepted and dropped
    "crlf_blank_lines_no_final_newline.jsonl": 2,
    "metadata_and_all_formats.jsonl": 11,
}


def test_good_cases_are_all_listed():
    assert sorted(p.name for p in GOOD.iterdir()) == sorted(GOOD_CASES)


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_good_input_cases(name, tok, plain_tok):
    for t in (tok, plain_tok):
        rows, stats = load_training_rows(GOOD / name, t, 512)
        assert stats.used == stats.rows_read == GOOD_CASES[name]
        for r in rows:
            check_invariants(EncodedRow(r["input_ids"], r["labels"]))
            assert any(lbl != IGNORE_INDEX for lbl in r["labels"][1:])


def test_mutated_lines_only_raise_data_error(tok, tmp_path):
    """Byte-level and structure-level mutations of good rows never leak another exception."""
    rng = random.Random(0)
    seeds = [json.loads(line) for line in (GOOD / "metadata_and_all_formats.jsonl").read_text("utf-8").splitlines()]
    junk = [None, True, 0, -1.5, "", " ", "x", [], {}, [1], {"role": "user"}, "\ud800", 10**30]
    outcomes = {"ok": 0, "skip": 0, "error": 0}

    def mutate(value):
        if isinstance(value, dict) and value and rng.random() < 0.7:
            key = rng.choice(list(value))
            value = dict(value)
            choice = rng.random()
            if choice < 0.2:
                del value[key]
            elif choice < 0.3:
                value[key + rng.choice(["s", "_", ""])] = value.pop(key)
            else:
                value[key] = mutate(value[key])
            return value
        if isinstance(value, list) and value and rng.random() < 0.7:
            value = list(value)
            i = rng.randrange(len(value))
            value[i] = mutate(value[i])
            return value
        return rng.choice(junk)

    for i in range(300):
        row = mutate(rng.choice(seeds))
        try:
            result = encode_row(row, tok, rng.choice([2, 8, 64, 512]))
            outcomes["skip" if result is None else "ok"] += 1
        except DataError:
            outcomes["error"] += 1

    lines = [json.dumps(r, ensure_ascii=False).encode() for r in seeds]
    for i in range(150):
        line = bytearray(rng.choice(lines))
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randrange(len(line))
            if op < 0.4:
                line[pos] = rng.randrange(256)
            elif op < 0.7:
                del line[pos : pos + rng.randint(1, 8)]
            else:
                line[pos:pos] = rng.choice([b"{", b"}", b'"', b",", b"[", b"\xc3", b"\x00", b"\\u", b"\n"])
        path = tmp_path / f"m{i}.jsonl"
        path.write_bytes(bytes(line) + b"\n")
        try:
            load_training_rows(path, tok, 64)
            outcomes["ok"] += 1
        except DataError as exc:
            assert str(exc).startswith(str(path))
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 10


# --------------------------------------------------------------------------------------------------
# datasets, demo data
# --------------------------------------------------------------------------------------------------


def test_to_hf_dataset(tok):
    rows, _ = load_training_rows(GOOD / "metadata_and_all_formats.jsonl", tok, 512)
    ds = to_hf_dataset(rows)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == len(rows)
    assert ds[0]["input_ids"] == rows[0]["input_ids"] and ds[3]["labels"] == rows[3]["labels"]
    assert len(to_hf_dataset([])) == 0


def _load_demo_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "examples" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_loads_and_is_reproducible(tok):
    assert DEMO.stat().st_size < 200 * 1024
    rows, stats = load_training_rows(DEMO, tok, 512)
    assert stats.rows_read == stats.used == 300 and stats.truncated == 0
    assert stats.formats == {"messages": 240, "prompt_completion": 30, "alpaca": 30}
    raw = [json.loads(line) for line in DEMO.read_text("utf-8").splitlines()]
    two_turns = [r for r in raw if sum(m["role"] == "assistant" for m in r.get("messages", [])) == 2]
    assert len(two_turns) >= 5
    assert max(len(line) for line in DEMO.read_text("utf-8").splitlines()) < 700
    script = _load_demo_script()
    assert script.to_jsonl(script.generate()) == DEMO.read_text("utf-8")


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "assistant", "content": "Hello."}]},
    {"conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi?"}]},
])
def test_a_conversation_that_starts_with_the_assistant_is_refused_by_name(tok, row):
    with pytest.raises(DataError, match=r"^f:3: (messages|conversations)\[0\]: the conversation starts with an "
                                        r"assistant turn"):
        encode_row(row, tok, 128, where="f:3")


def test_the_encoding_cache_key_follows_the_template_renderer(tok, monkeypatch):
    import transformers

    from sstoken.data.sources import encoding_fingerprint

    before = encoding_fingerprint(tok, 128)
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert encoding_fingerprint(tok, 128) != before

"""Training data: JSONL reading, format detection, validation, tokenization and the label mask.

Rows come from a JSONL file (read here, strictly, by :func:`read_jsonl`) or from any other source that
:mod:`sstoken.sources` loads (Parquet, CSV, JSON, Arrow, saved datasets, Hub datasets, mixtures). Each row is
a mapping in one of three formats (detected per row from its keys):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``prompt_completion``: ``{"prompt": str, "completion": str}`` or, conversational,
  ``{"prompt": [messages...], "completion": [messages...]}``
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``

plus ``tools`` (handed to the encoder with the row). Any other key (``id``, ``category``, ``prompt_id``, ...) is
ignored, except a near miss of a format key the row lacks (``mesages``), which is an error.

Every row becomes ``{"input_ids": [...], "labels": [...]}`` with Hugging Face's unshifted labels:
``labels[i] == input_ids[i]`` on trained (response) tokens and ``-100`` on context tokens.

Rules (see ``docs/data.md`` for the long version):

* Conversations are rendered once with the tokenizer's chat template and tokenized once with offsets; a
  token is trained when its characters overlap an assistant turn's span. The span of assistant turn ``k``
  is ``[len(render(messages[:k], add_generation_prompt=True)), len(render(messages[:k + 1])))`` minus
  trailing whitespace, so it holds the content and the template's end-of-turn token. Every assistant
  turn is trained (multi-turn). Without a chat template, :data:`FALLBACK_CHAT_TEMPLATE` is used.
* Plain prompt/completion strings are tokenized separately and concatenated: prompt (plus BOS when the
  tokenizer adds one to plain text) is context, completion + EOS is trained.
* Sequences are truncated from the right to ``max_seq_length``; a row with no trained token left at a
  position >= 1 (position 0 never carries loss after the shift) is skipped and counted, not an error.
* Any malformed row raises :class:`~sstoken.errors.DataError` whose message starts with
  ``"{path}:{line}: "`` and names the field; loading fails on the first bad row (fail fast).
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sstoken.batch import IGNORE_INDEX
from sstoken.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "MAX_ASSISTANT_TURNS",
    "MAX_LINE_BYTES",
    "METADATA_KEYS",
    "EncodedRow",
    "LoadStats",
    "demo_data_path",
    "encode_row",
    "format_of",
    "load_training_rows",
    "read_jsonl",
    "render_chat",
    "to_hf_dataset",
]


MAX_LINE_BYTES = 16 * 1024 * 1024
"""Default limit on one JSONL line, in bytes, newline excluded (16 MiB)."""

MAX_ASSISTANT_TURNS = 512
"""Limit on the assistant turns of one row that fall inside ``max_seq_length`` (turns beyond it are cut off
and not counted). Locating turn k costs time proportional to k, so this bounds the check of one row to
seconds instead of letting a pathological conversation stall the data check."""

ROLES = ("system", "user", "assistant")
METADATA_KEYS = frozenset({"id", "meta", "metadata", "source"})
MESSAGE_KEYS = ("role", "content")
FORMATS = ("messages", "prompt_completion", "alpaca")

# Keys that identify each format, and which of them are required.
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
PASSTHROUGH_KEYS = frozenset({"tools"})
"""Top-level keys that are not a format of their own but are handed to the encoder with the row."""
KNOWN_KEYS = frozenset({k for keys in _FORMAT_FIELDS.values() for k in keys}) | METADATA_KEYS | PASSTHROUGH_KEYS
"""Every top-level key sstoken reads; other columns are ignored (see :func:`ignored_columns`)."""

# Roles of other chat dialects that get a pointed hint instead of a plain "unknown role".
_ROLE_HINTS = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "chatgpt": "assistant",
}

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + (eos_token or '') + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
"""Template used for message formats when the tokenizer has no chat template.

A system prompt is written as is, a user turn as ``### Instruction:\\n{content}``, an assistant turn as
``### Response:\\n{content}{eos}``; turns are separated by a blank line. The trained span of an assistant
turn is its content plus the EOS token.
"""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodedRow:
    """One tokenized training row. ``labels`` is unshifted, ``-100`` on context tokens."""

    input_ids: list[int]
    labels: list[int]
    format: str = "messages"
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        """Trained tokens that can carry loss (position 0 never does: nothing precedes it)."""
        return sum(1 for lbl in self.labels[1:] if lbl != IGNORE_INDEX)

    def as_dict(self) -> dict[str, list[int]]:
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}


@dataclass
class LoadStats:
    """Counts from :func:`load_training_rows` / :func:`sstoken.sources.load_data`.

    ``rows_read`` = ``used`` + ``skipped_no_trainable_token``; ``truncated`` counts used rows that were cut
    to ``max_seq_length`` (rows both truncated and skipped count only as skipped). ``ignored_columns`` are the
    columns (top-level keys) that no format reads, dropped from the encoded rows.
    """

    rows_read: int = 0
    used: int = 0
    skipped_no_trainable_token: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _BadConstant(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


def _a(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_jsonl(path: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-blank line of a JSONL file (line numbers are 1-based).

    The file is read in binary, line by line, and never more than ``max_line_bytes + 2`` bytes at a time,
    so a huge line costs no more memory than the limit. Each line is decoded as UTF-8 on its own; a UTF-8
    byte order mark at the start of line 1 is accepted and dropped. Lines holding only JSON whitespace are
    skipped. NaN/Infinity, duplicate keys in one object and top-level values other than objects are
    rejected. Every problem raises :class:`DataError` with a message starting ``"{path}:{line}: "``.
    """
    where = os.fspath(path)
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DataError(f"{where}: cannot open the file: {exc.strerror or exc}") from None
    with handle:
        lineno = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 2)
            except OSError as exc:
                raise DataError(f"{where}:{lineno + 1}: cannot read the file: {exc.strerror or exc}") from None
            if not raw:
                return
            lineno += 1
            content = raw
            if content.endswith(b"\n"):
                content = content[:-1]
                if content.endswith(b"\r"):
                    content = content[:-1]
            if len(content) > max_line_bytes:
                raise DataError(
                    f"{where}:{lineno}: line longer than {max_line_bytes} bytes (max_line_bytes); "
                    "one JSONL line must hold one row"
                )
            if lineno == 1 and content.startswith(codecs.BOM_UTF8):
                content = content[len(codecs.BOM_UTF8) :]
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                hint = ""
                if lineno == 1 and content[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
                    hint = " (the file looks UTF-16 encoded; save it as UTF-8)"
                raise DataError(
                    f"{where}:{lineno}: not valid UTF-8: byte 0x{content[exc.start]:02x} at byte offset "
                    f"{exc.start}{hint}"
                ) from None
            if not text.strip(" \t\r\n"):
                continue
            try:
                row = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
            except _DuplicateKey as exc:
                raise DataError(
                    f"{where}:{lineno}: {_field_name(exc.key)}: duplicate key in one JSON object "
                    "(which value is meant is ambiguous)"
                ) from None
            except _BadConstant as exc:
                raise DataError(f"{where}:{lineno}: invalid JSON: {exc.name} is not a JSON value") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}:{lineno}: invalid JSON: nested too deeply") from None
            except ValueError as exc:  # e.g. an integer with more digits than Python converts
                reason = "a number has too many digits" if "digits" in str(exc) else str(exc)
                raise DataError(f"{where}:{lineno}: invalid JSON: {reason}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{lineno}: expected one JSON object per line, got {_json_type(row)}")
            yield lineno, row


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


class _RowError(Exception):
    """A problem with one row; ``field`` is a path like ``messages[1].content`` or None for the row."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def render(self, where: str) -> str:
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


def _field_name(key: Any) -> str:
    key = str(key)
    return key if key.isidentifier() else repr(key)


def _detect_format(row: Mapping[str, Any]) -> str:
    """The row's format from its keys; keys that no format uses are ignored (not an error).

    A format counts when all its required keys are present. Keys of another, incomplete format are ignored too
    (UltraChat rows hold both ``messages`` and a ``prompt`` copy of the first question), except a top-level
    ``system`` beside ``messages``: dropping it would silently train without the user's system prompt. To keep
    a typo from silently dropping data, an unknown key that is a near miss of a format key the row lacks
    (``mesages``, ``complettion``, ``inptu``) is still an error.
    """
    complete = [fmt for fmt, keys in _REQUIRED.items() if all(k in row for k in keys)]
    relevant = [k for fmt in (complete or _FORMAT_FIELDS) for k in _FORMAT_FIELDS[fmt]]
    lacking = [k for k in relevant if k not in row]
    for key in row:
        if key not in KNOWN_KEYS and did_you_mean(key, lacking):
            raise _RowError(
                _field_name(key),
                f"unknown field{did_you_mean(key, lacking)}; a row has 'messages', or 'prompt' and "
                "'completion', or 'instruction', 'output' and optional 'input'/'system' (alpaca); other "
                "columns are ignored",
            )
    present = [fmt for fmt, keys in _FORMAT_FIELDS.items() if any(k in row for k in keys)]
    if complete == ["messages"] and "system" in row:
        present = ["messages", "alpaca"]
    elif len(complete) == 1:
        present = complete
    if len(present) > 1:
        parts = []
        for fmt in present:
            keys = ", ".join(repr(k) for k in _FORMAT_FIELDS[fmt] if k in row)
            parts.append(f"{keys} ({fmt})")
        hint = ""
        if "messages" in present and "system" in row:
            hint = "; in the messages format put the system prompt in a {'role': 'system'} message"
        raise _RowError(None, f"row mixes formats: {' and '.join(parts)}; use one format per row{hint}")
    if not present:
        found = [repr(str(k)) for k in row]
        has = f" (the row has {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""
        raise _RowError(
            None,
            "row has no data: expected 'messages', or 'prompt' and 'completion', or 'instruction' and "
            f"'output' (alpaca){has}; map other names with `columns:` (see docs/data.md)",
        )
    fmt = present[0]
    for key in _REQUIRED[fmt]:
        if key not in row:
            raise _RowError(key, f"missing (required by the {fmt} format)")
    return fmt


def format_of(row: Mapping[str, Any], *, where: str = "<row>") -> str:
    """The row's format: ``"messages"``, ``"prompt_completion"`` or ``"alpaca"``.

    Raises :class:`DataError` (prefixed with ``where``) for unknown keys, mixed formats or a missing
    required key. Field values are not checked here; :func:`encode_row` does that.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}")
    try:
        return _detect_format(row)
    except _RowError as exc:
        raise DataError(exc.render(where)) from None


def _text(value: Any, field: str, *, nonblank: bool = False, what: str = "") -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _RowError(
            field, f"contains an unpaired UTF-16 surrogate \\u{ord(value[exc.start]):04x} at character {exc.start}"
        ) from None
    if nonblank and not value.strip():
        raise _RowError(field, f"is empty or whitespace only{what}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _RowError(field, f"must be a list of messages, got {_json_type(value)}")
    if not value:
        raise _RowError(field, "is an empty list")
    out = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _RowError(name, f"must be an object with 'role' and 'content', got {_json_type(message)}")
        for key in message:
            if key not in MESSAGE_KEYS:
                raise _RowError(
                    f"{name}.{_field_name(key)}",
                    f"unknown field in a message{did_you_mean(key, MESSAGE_KEYS)}; a message has only "
                    "'role' and 'content'",
                )
        for key in MESSAGE_KEYS:
            if key not in message:
                raise _RowError(f"{name}.{key}", "missing (every message needs 'role' and 'content')")
        role = message["role"]
        if not isinstance(role, str):
            raise _RowError(f"{name}.role", f"must be a string, got {_json_type(role)}")
        if role not in ROLES:
            hint = f" (use {_ROLE_HINTS[role.lower()]!r})" if role.lower() in _ROLE_HINTS else ""
            hint = hint or did_you_mean(role, ROLES)
            raise _RowError(f"{name}.role", f"unknown role {role!r}{hint}; expected 'system', 'user' or 'assistant'")
        content = _text(
            message["content"],
            f"{name}.content",
            nonblank=role == "assistant",
            what=" (an assistant turn must have text to train on)",
        )
        out.append({"role": role, "content": content})
    return out


def _check_system_first(messages: list[dict[str, str]], names: list[str]) -> None:
    for i, message in enumerate(messages):
        if i > 0 and message["role"] == "system":
            raise _RowError(f"{names[i]}.role", "a system message is only allowed as the first message")


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "the tokenizer must be a fast (Rust) tokenizer: label masking needs return_offsets_mapping"
        )


def _check_max_seq_length(max_seq_length: Any) -> None:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The text the tokenizer's chat template makes of ``messages`` (a ChatML fallback where it has none)."""
    kwargs: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        kwargs = {"chat_template": FALLBACK_CHAT_TEMPLATE, "eos_token": tokenizer.eos_token or ""}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # jinja's raise_exception, undefined variables, ... : the template refuses
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise _RowError(None, f"the chat template cannot render this conversation: {reason}") from None
    if not isinstance(text, str):
        raise ConfigError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _encode_conversation(
    messages: list[dict[str, str]], names: list[str], train_from: int, tokenizer: Any, max_tokens: int
) -> tuple[list[int], list[int]]:
    """Tokenize a rendered conversation; train the assistant turns with index >= ``train_from``.

    Locating a turn renders the conversation up to it, which costs time proportional to the turns before it.
    Turns that start past the first ``max_tokens`` tokens are cut off by truncation anyway, so they are not
    located: the work stays bounded by the turns inside the window, not by the length of the conversation.
    """
    full = render_chat(tokenizer, messages, False)
    encoding = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(encoding["input_ids"])
    offsets = list(encoding["offset_mapping"])
    # Characters after this offset belong only to tokens that truncation removes.
    window_end = offsets[max_tokens - 1][1] if len(offsets) > max_tokens else len(full)
    starts: list[int] = []
    ends: list[int] = []
    checked_generation_prompt = False
    for k, message in enumerate(messages):
        if k < train_from or message["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:k], True)
        if len(prefix) >= window_end:
            break
        if len(starts) == MAX_ASSISTANT_TURNS:
            raise _RowError(
                names[k],
                f"more than {MAX_ASSISTANT_TURNS} assistant turns within max_seq_length={max_tokens} tokens "
                "(MAX_ASSISTANT_TURNS); split the conversation into several rows",
            )
        if not checked_generation_prompt:  # a property of the template: checking one turn is enough
            if prefix == render_chat(tokenizer, messages[:k], False):
                raise _RowError(
                    None,
                    "the chat template renders no generation prompt (add_generation_prompt=True changes "
                    "nothing), so assistant turns cannot be located; use a chat template with a generation "
                    "prompt",
                )
            checked_generation_prompt = True
        upto = render_chat(tokenizer, messages[: k + 1], False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise _RowError(
                names[k],
                "the chat template is not prefix-stable (rendering the conversation up to this assistant "
                "turn is not a prefix of the full rendering), so assistant turns cannot be marked",
            )
        start, end = len(prefix), len(upto.rstrip())
        if end > start:
            starts.append(start)
            ends.append(end)
    # The spans are ordered and disjoint (each turn's rendering is a prefix of the next), so the only span a
    # token can overlap is the last one starting before the token ends: a binary search instead of a scan.
    labels = []
    for token_id, (s, e) in zip(input_ids, offsets):
        if s == e:  # an empty token is trained when its position lies inside a span
            i = bisect.bisect_right(starts, s) - 1
            trained = i >= 0 and s < ends[i]
        else:
            i = bisect.bisect_left(starts, e) - 1
            trained = i >= 0 and s < ends[i]
        labels.append(token_id if trained else IGNORE_INDEX)
    return input_ids, labels


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode_strings(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer) and prompt_ids[:1] != [tokenizer.bos_token_id]:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and completion_ids[-1:] != [eos]:
        completion_ids.append(eos)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _alpaca_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    instruction = _text(row["instruction"], "instruction", nonblank=True)
    output = _text(row["output"], "output", nonblank=True, what=" (nothing to train on)")
    extra = _text(row["input"], "input") if "input" in row else ""
    system = _text(row["system"], "system") if "system" in row else ""
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _encode_fields(row: Mapping[str, Any], tokenizer: Any, max_tokens: int) -> tuple[str, list[int], list[int]]:
    fmt = _detect_format(row)
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
        names = [f"messages[{i}]" for i in range(len(messages))]
        _check_system_first(messages, names)
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowError("messages", "has no assistant turn (nothing to train on)")
        return fmt, *_encode_conversation(messages, names, 0, tokenizer, max_tokens)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt = _text(prompt, "prompt")
            completion = _text(completion, "completion", nonblank=True, what=" (nothing to train on)")
            return fmt, *_encode_strings(prompt, completion, tokenizer)
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt_messages = _messages(prompt, "prompt")
            completion_messages = _messages(completion, "completion")
            names = [f"prompt[{i}]" for i in range(len(prompt_messages))]
            names += [f"completion[{i}]" for i in range(len(completion_messages))]
            messages = prompt_messages + completion_messages
            _check_system_first(messages, names)
            if not any(m["role"] == "assistant" for m in completion_messages):
                raise _RowError("completion", "has no assistant message (nothing to train on)")
            return fmt, *_encode_conversation(messages, names, len(prompt_messages), tokenizer, max_tokens)
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, (str, list)):
                raise _RowError(name, f"must be a string or a list of messages, got {_json_type(value)}")
        raise _RowError(
            "completion",
            f"prompt is {_a(_json_type(prompt))} but completion is {_a(_json_type(completion))}; both must be "
            "strings or both lists of messages",
        )
    messages = _alpaca_messages(row)
    names = [{"system": "system", "user": "instruction", "assistant": "output"}[m["role"]] for m in messages]
    return fmt, *_encode_conversation(messages, names, 0, tokenizer, max_tokens)


def encode_row(
    row: Mapping[str, Any], tokenizer: Any, max_seq_length: int, *, where: str = "<row>"
) -> EncodedRow | None:
    """Validate and tokenize one row; ``None`` when no trained token survives truncation.

    ``where`` prefixes error messages (``load_training_rows`` passes ``"{path}:{line}"``). Raises
    :class:`DataError` for a malformed row and :class:`ConfigError` for an unusable tokenizer or
    ``max_seq_length``. The sequence is truncated from the right to ``max_seq_length`` tokens.
    """
    _check_tokenizer(tokenizer)
    _check_max_seq_length(max_seq_length)
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}")
    try:
        fmt, input_ids, labels = _encode_fields(row, tokenizer, max_seq_length)
    except _RowError as exc:
        raise DataError(exc.render(where)) from None
    truncated = len(input_ids) > max_seq_length
    if truncated:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    encoded = EncodedRow(input_ids=input_ids, labels=labels, format=fmt, truncated=truncated)
    if encoded.num_trained == 0:
        return None
    return encoded


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_training_rows(
    path: Any,
    tokenizer: Any,
    max_seq_length: int,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[list[dict[str, list[int]]], LoadStats]:
    """Read, validate and encode training data: a JSONL file, or any data spec :mod:`sstoken.sources` reads.

    Returns rows ``{"input_ids": [...], "labels": [...]}`` and :class:`LoadStats`. Fails fast: the first
    malformed row raises :class:`DataError` (never train on partly bad data). A file with no rows, or whose
    rows are all skipped (no trained token after truncation), also raises :class:`DataError`. The encoding
    is cached (see :func:`sstoken.sources.load_data`, which returns a ``datasets.Dataset`` instead of a list).
    """
    from sstoken.sources import load_data

    dataset, stats = load_data(path, tokenizer, max_seq_length, max_line_bytes=max_line_bytes)
    return dataset.to_list(), stats


def to_hf_dataset(rows: list[Mapping[str, list[int]]]):
    """A :class:`datasets.Dataset` with int64 ``input_ids`` and ``labels`` columns."""
    import datasets

    sequence = getattr(datasets, "List", None) or datasets.Sequence
    features = datasets.Features(
        {"input_ids": sequence(datasets.Value("int64")), "labels": sequence(datasets.Value("int64"))}
    )
    return datasets.Dataset.from_dict(
        {"input_ids": [list(r["input_ids"]) for r in rows], "labels": [list(r["labels"]) for r in rows]},
        features=features,
    )


def demo_data_path() -> str:
    """The demo data shipped with the package (``sstoken/demo/demo.jsonl``)."""
    return str(Path(__file__).parent / "demo" / "demo.jsonl")

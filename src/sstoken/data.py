"""Training data: JSONL reading, format detection, validation, tokenization and the label mask.

Rows come from a JSONL file (read here, strictly, by :func:`read_jsonl`) or from any other source that
:mod:`sstoken.sources` loads (Parquet, CSV, JSON, Arrow, saved datasets, Hub datasets, mixtures). Each row is
a mapping in one of five formats (detected per row from its keys):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str | [parts]}, ...]}``
  (assistant messages may carry ``tool_calls`` and ``reasoning_content``)
* ``prompt_completion``: ``{"prompt": str, "completion": str}`` or, conversational,
  ``{"prompt": [messages...], "completion": [messages...]}``
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...], "system": str (optional)}``,
  converted to messages
* ``text``: ``{"text": str}`` (language modelling: every token trained), only when no other format's key is there

plus ``tools`` (handed to the encoder with the row). Any other key (``id``, ``category``, ``prompt_id``, ...) is
ignored, except a near miss of a format key the row lacks (``mesages``), which is an error.

Every row becomes ``{"input_ids": [...], "labels": [...]}`` with Hugging Face's unshifted labels:
``labels[i] == input_ids[i]`` on trained (response) tokens and ``-100`` on context tokens.

Rules (see ``docs/data.md`` for the long version):

* Conversations are rendered once with the tokenizer's chat template and tokenized once with offsets; a
  token is trained when its characters overlap an assistant turn's span. A template with ``{% generation %}``
  blocks gives the spans through its assistant-token mask. Otherwise the span of assistant turn ``k`` starts
  at ``len(render(messages[:k], add_generation_prompt=True))`` and holds the turn as ``render(messages[:k + 1])``
  writes it, minus trailing whitespace (content and end-of-turn token); for templates that rewrite earlier
  turns (Qwen3 drops their reasoning) it is the tail of that turn which the full rendering shows. An empty
  reasoning block at the start of a span is context. Every assistant turn is trained (multi-turn). Without a
  chat template, :data:`FALLBACK_CHAT_TEMPLATE` is used.
* Plain prompt/completion strings are tokenized separately and concatenated: prompt (plus BOS when the
  tokenizer adds one to plain text) is context, completion + EOS is trained. A ``text`` row is tokenized as
  TRL does (special tokens, EOS appended) and trained whole.
* Sequences are truncated from the right to ``max_seq_length``; a row with no trained token left at a
  position >= 1 (position 0 never carries loss after the shift) is skipped and counted, not an error.
* Any malformed row raises :class:`~sstoken.errors.DataError` whose message starts with
  ``"{path}:{line}: "`` and names the field; loading fails on the first bad row (fail fast).
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import gzip
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sstoken.batch import IGNORE_INDEX
from sstoken.errors import ConfigError, DataError, did_you_mean, shown

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

ROLES = ("system", "user", "assistant", "tool")
METADATA_KEYS = frozenset({"id", "meta", "metadata", "source"})
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Names of an assistant message's reasoning, the ones transformers aliases: Qwen3's template and vLLM's
reasoning parsers use ``reasoning_content``, gpt-oss's template ``thinking``. The reasoning is handed to the
template under the first two, whichever the data used (as recent transformers versions do themselves)."""
MESSAGE_KEYS = ("role", "content", "name", "tool_call_id", "tool_calls", *REASONING_KEYS)
_TOOL_CALL_KEYS = ("type", "id", "function")
_FUNCTION_KEYS = ("name", "arguments")
_TEXT_PART_KEYS = ("type", "text")
_TOOL_CALL_SHAPE = "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}"
_TOOL_SHAPE = "{'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': {...}}}"
_TEXT_PART_SHAPE = "{'type': 'text', 'text': ...}"
_PART_SEPARATOR = "\n"
"""Joins the text parts of list content into one string, as OpenAI-compatible servers such as vLLM do for
text-only models, so the model is trained on the text it will be served."""
FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")

# Keys that identify each format, and which of them are required. ``text`` is not here: it is the format of a row
# that has no other (see :func:`_detect_format`).
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations",),  # and an optional top-level 'system', which alpaca's fields already list
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
TEXT_KEY = "text"
"""The column of a language-modelling row (``{"text": ...}``): every token trained, no context."""
PASSTHROUGH_KEYS = frozenset({"tools"})
"""Top-level keys that are not a format of their own but are handed to the encoder with the row."""
KNOWN_KEYS = (
    frozenset({k for keys in _FORMAT_FIELDS.values() for k in keys}) | METADATA_KEYS | PASSTHROUGH_KEYS | {TEXT_KEY}
)
"""Every top-level key sstoken reads; other columns are ignored (see :func:`ignored_columns`)."""

# ShareGPT speakers (LLaMA-Factory, axolotl, FastChat) and the message role each becomes. The message roles are
# accepted too: some ShareGPT files write "user" / "assistant". A function_call turn becomes an assistant turn
# with tool_calls (see _sharegpt_tool_calls).
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_SHAREGPT_TURN_KEYS = ("from", "value")
_SHAREGPT_CALL_SHAPE = '{"name": ..., "arguments": {...}}'

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


# Compressed JSON Lines are read by the same strict reader, through the standard library's decompressors.
_DECOMPRESSING_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_jsonl(path: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-blank line of a JSONL file (line numbers are 1-based).

    The file (or its ``.gz``/``.bz2``/``.xz`` compression) is read in binary, line by line, and never more than ``max_line_bytes + 2`` bytes at a time,
    so a huge line costs no more memory than the limit. Each line is decoded as UTF-8 on its own; a UTF-8
    byte order mark at the start of line 1 is accepted and dropped. Lines holding only JSON whitespace are
    skipped. NaN/Infinity, duplicate keys in one object and top-level values other than objects are
    rejected. Every problem raises :class:`DataError` with a message starting ``"{path}:{line}: "``.
    """
    where = os.fspath(path)
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
    opener = _DECOMPRESSING_OPENERS.get(Path(where).suffix.lower(), open)
    try:
        handle = opener(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DataError(f"{where}: cannot open the file: {exc.strerror or exc}") from None
    with handle:
        lineno = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 2)
            except (OSError, EOFError, lzma.LZMAError) as exc:  # EOFError, LZMAError: a cut or corrupt archive
                raise DataError(f"{where}:{lineno + 1}: cannot read the file: "
                                f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}") from None
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
                "'completion', or 'instruction', 'output' and optional 'input'/'system' (alpaca), or "
                "'conversations' (ShareGPT), or 'text'; other columns are ignored",
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
    if not present and TEXT_KEY in row:
        # Lowest priority: many chat datasets carry a rendered copy of each row as `text` beside `messages`.
        return TEXT_KEY
    if not present:
        found = [repr(str(k)) for k in row]
        has = f" (the row has {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""
        raise _RowError(
            None,
            "row has no data: expected 'messages', or 'prompt' and 'completion', or 'instruction' and "
            f"'output' (alpaca), or 'conversations' (ShareGPT), or 'text'{has}; map other names with `columns:` "
            "(see docs/data.md)",
        )
    fmt = present[0]
    for key in _REQUIRED[fmt]:
        if key not in row:
            raise _RowError(key, f"missing (required by the {fmt} format)")
    return fmt


def format_of(row: Mapping[str, Any], *, where: str = "<row>") -> str:
    """The row's format: ``"messages"``, ``"prompt_completion"``, ``"alpaca"``, ``"sharegpt"`` or ``"text"``.

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


def _is_set(mapping: Mapping[str, Any], key: str) -> bool:
    # An optional key holding null counts as absent: a file loaded with `datasets` gives every message every
    # key that any message of the file has, filled with null.
    return mapping.get(key) is not None


def _check_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], name: str, shape: str) -> None:
    for key in obj:
        if key not in allowed and obj[key] is not None:
            raise _RowError(f"{name}.{_field_name(key)}", f"unknown field{did_you_mean(key, allowed)}; {shape}")


def _text_parts(parts: list[Any], field: str) -> str:
    """The text of list-of-parts content (``[{"type": "text", "text": ...}, ...]``), parts joined by
    :data:`_PART_SEPARATOR`. Flattening keeps text-only templates (which read ``content`` as a string, or drop
    it when it is not one) from losing the text."""
    texts = []
    for i, part in enumerate(parts):
        name = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise _RowError(name, f"must be a content part like {_TEXT_PART_SHAPE}, got {_json_type(part)}")
        if not _is_set(part, "type"):
            raise _RowError(f"{name}.type", f"missing (a content part is {_TEXT_PART_SHAPE})")
        if part["type"] != "text":
            raise _RowError(
                f"{name}.type",
                f"{part['type']!r} parts are not supported: sstoken trains text-only models, so content parts "
                f"must be {_TEXT_PART_SHAPE}",
            )
        _check_keys(part, _TEXT_PART_KEYS, name, "a text part has only 'type' and 'text'")
        if not _is_set(part, "text"):
            raise _RowError(f"{name}.text", f"missing (a content part is {_TEXT_PART_SHAPE})")
        texts.append(_text(part["text"], f"{name}.text"))
    return _PART_SEPARATOR.join(texts)


def _content(value: Any, field: str) -> str:
    if isinstance(value, list):
        return _text_parts(value, field)
    if not isinstance(value, str):
        raise _RowError(field, f"must be a string or a list of text parts, got {_json_type(value)}")
    return _text(value, field)


def _function_call(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _RowError(field, f"must be an object with 'name' and 'arguments', got {_json_type(value)}")
    _check_keys(value, _FUNCTION_KEYS, field, "a function call has only 'name' and 'arguments'")
    if not _is_set(value, "name"):
        raise _RowError(f"{field}.name", "missing (the name of the called function)")
    name = _text(value["name"], f"{field}.name", nonblank=True)
    if not _is_set(value, "arguments"):
        raise _RowError(f"{field}.arguments", "missing (use {} for a call without arguments)")
    arguments = value["arguments"]
    if isinstance(arguments, str):  # OpenAI's shape; passed to the template as given, but it must be JSON
        try:
            parsed = json.loads(_text(arguments, f"{field}.arguments"))
        except (json.JSONDecodeError, RecursionError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            raise _RowError(f"{field}.arguments", "is a string but not a JSON object; use an object or its JSON text")
    elif not isinstance(arguments, dict):
        raise _RowError(f"{field}.arguments", f"must be an object (or its JSON text), got {_json_type(arguments)}")
    return {"name": name, "arguments": arguments}


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _RowError(field, f"must be a list of tool calls like {_TOOL_CALL_SHAPE}, got {_json_type(value)}")
    if not value:
        raise _RowError(field, "is an empty list (leave 'tool_calls' out when the turn calls no tool)")
    calls = []
    for i, call in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise _RowError(name, f"must be a tool call like {_TOOL_CALL_SHAPE}, got {_json_type(call)}")
        if not _is_set(call, "function") and "name" in call:
            raise _RowError(
                f"{name}.function", f"missing: put 'name' and 'arguments' inside 'function' ({_TOOL_CALL_SHAPE})"
            )
        _check_keys(call, _TOOL_CALL_KEYS, name, "a tool call has 'function' and optional 'type' and 'id'")
        if _is_set(call, "type") and call["type"] != "function":
            raise _RowError(f"{name}.type", f"only 'function' tool calls are supported, got {call['type']!r}")
        if not _is_set(call, "function"):
            raise _RowError(f"{name}.function", f"missing ({_TOOL_CALL_SHAPE})")
        clean = {key: call[key] for key in _TOOL_CALL_KEYS if _is_set(call, key)}
        clean["function"] = _function_call(call["function"], f"{name}.function")
        if "id" in clean:
            _text(clean["id"], f"{name}.id")
        calls.append(clean)
    return calls


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The row's ``tools`` (function schemas for ``apply_chat_template(tools=...)``); None when there are none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _RowError("tools", f"must be a list of tool schemas like {_TOOL_SHAPE}, got {_json_type(value)}")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _RowError(f"tools[{i}]", f"must be a tool schema like {_TOOL_SHAPE}, got {_json_type(tool)}")
        function = tool.get("function")
        if not isinstance(function, dict):
            got = "missing" if function is None else f"must be an object, got {_json_type(function)}"
            raise _RowError(f"tools[{i}].function", f"{got} (a tool schema is {_TOOL_SHAPE})")
        if not _is_set(function, "name"):
            raise _RowError(f"tools[{i}].function.name", "missing (the name the model calls the function by)")
        _text(function["name"], f"tools[{i}].function.name", nonblank=True)
    return value or None


def _message(message: Any, name: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _RowError(name, f"must be an object with 'role' and 'content', got {_json_type(message)}")
    if "role" not in message and any(key in message for key in _SHAREGPT_TURN_KEYS):
        raise _RowError(
            name,
            "is a ShareGPT turn ('from'/'value'): ShareGPT data goes in a 'conversations' column, which sstoken "
            "reads as is (no `columns:` mapping needed)",
        )
    _check_keys(
        message,
        MESSAGE_KEYS,
        name,
        "a message has 'role' and 'content', plus 'tool_calls' and 'reasoning_content' (assistant), "
        "'tool_call_id' (tool) and 'name'",
    )
    if "role" not in message:
        raise _RowError(f"{name}.role", "missing (every message needs 'role' and 'content')")
    role = message["role"]
    if not isinstance(role, str):
        raise _RowError(f"{name}.role", f"must be a string, got {_json_type(role)}")
    if role not in ROLES:
        hint = f" (use {_ROLE_HINTS[role.lower()]!r})" if role.lower() in _ROLE_HINTS else ""
        hint = hint or did_you_mean(role, ROLES)
        raise _RowError(
            f"{name}.role", f"unknown role {role!r}{hint}; expected 'system', 'user', 'assistant' or 'tool'"
        )
    tool_calls = None
    if _is_set(message, "tool_calls"):
        if role != "assistant":
            raise _RowError(f"{name}.tool_calls", f"only assistant messages call tools, this one is {role!r}")
        tool_calls = _tool_calls(message["tool_calls"], f"{name}.tool_calls")
    if tool_calls is not None and message.get("content") is None:
        content = ""  # a turn that only calls tools; templates expect a string
    elif "content" not in message:
        raise _RowError(f"{name}.content", "missing (every message needs 'role' and 'content')")
    else:
        content = _content(message["content"], f"{name}.content")
    if role == "assistant" and tool_calls is None and not content.strip():
        raise _RowError(
            f"{name}.content",
            "is empty or whitespace only (an assistant turn must have text or tool calls to train on)",
        )
    out: dict[str, Any] = {"role": role, "content": content}
    if _is_set(message, "name"):
        out["name"] = _text(message["name"], f"{name}.name", nonblank=True)
    if _is_set(message, "tool_call_id"):
        if role != "tool":
            raise _RowError(f"{name}.tool_call_id", f"only tool messages answer a tool call, this one is {role!r}")
        out["tool_call_id"] = _text(message["tool_call_id"], f"{name}.tool_call_id")
    if tool_calls is not None:
        out["tool_calls"] = tool_calls
    reasoning = _reasoning(message, role, name)
    if reasoning is not None:
        out["reasoning_content"] = out["thinking"] = reasoning
    return out


def _reasoning(message: Mapping[str, Any], role: str, name: str) -> str | None:
    """The message's reasoning, under whichever of :data:`REASONING_KEYS` it is written; None without any."""
    given = [key for key in REASONING_KEYS if _is_set(message, key)]
    if not given:
        return None
    if role != "assistant":
        raise _RowError(f"{name}.{given[0]}", f"only assistant messages reason, this one is {role!r}")
    texts = [_text(message[key], f"{name}.{key}") for key in given]
    for key, text in zip(given[1:], texts[1:]):
        if text != texts[0]:
            raise _RowError(f"{name}.{key}", f"differs from {given[0]}: a message has one reasoning; keep one key")
    return texts[0]


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _RowError(field, f"must be a list of messages, got {_json_type(value)}")
    if not value:
        raise _RowError(field, "is an empty list")
    return [_message(message, f"{field}[{i}]") for i, message in enumerate(value)]


def _renamed_field(field: str | None, name: str, renames: Mapping[str, str]) -> str | None:
    """``field`` with the key right after ``name`` renamed (``conversations[2].content`` -> ``...value``)."""
    for old, new in renames.items():
        if field is not None and (field == f"{name}.{old}" or field.startswith(f"{name}.{old}[")):
            return f"{name}.{new}" + field[len(f"{name}.{old}") :]
    return field


def _sharegpt_tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """The tool calls of a ShareGPT ``function_call`` turn, whose value is the JSON text of one call
    ``{"name", "arguments"}`` or of a list of them (LLaMA-Factory's shape), as message ``tool_calls``."""
    try:
        parsed = json.loads(_text(value, field))
    except (json.JSONDecodeError, RecursionError, ValueError):
        parsed = None
    calls = [parsed] if isinstance(parsed, dict) else parsed
    if not isinstance(calls, list) or not calls or not all(isinstance(call, dict) for call in calls):
        raise _RowError(
            field,
            f"a function_call turn must hold the JSON text of a tool call {_SHAREGPT_CALL_SHAPE} (or a list of "
            "them): a tool call needs structured arguments to be rendered by the chat template",
        )
    return [{"type": "function", "function": _function_call(call, field)} for call in calls]


def _sharegpt_turn(turn: Any, name: str) -> dict[str, Any]:
    """One ShareGPT turn ``{"from": ..., "value": ...}`` as a validated message; errors name ``from``/``value``."""
    _check_keys(turn, (*_SHAREGPT_TURN_KEYS, "weight"), name, "a ShareGPT turn has 'from' and 'value'")
    if not _is_set(turn, "from"):
        raise _RowError(f"{name}.from", "missing (a ShareGPT turn has 'from' and 'value')")
    speaker = turn["from"]
    if not isinstance(speaker, str):
        raise _RowError(f"{name}.from", f"must be a string, got {_json_type(speaker)}")
    if speaker not in _SHAREGPT_ROLES:
        hint = did_you_mean(speaker, _SHAREGPT_ROLES)
        if not hint and _ROLE_HINTS.get(speaker.lower()) == "assistant":
            hint = " (use 'gpt')"
        raise _RowError(
            f"{name}.from",
            f"unknown speaker {speaker!r}{hint}; expected 'human', 'gpt', 'system', 'function_call', "
            "'observation' or 'tool'",
        )
    if "value" not in turn:
        raise _RowError(f"{name}.value", "missing (a ShareGPT turn has 'from' and 'value')")
    # axolotl's per-turn loss switch. Every assistant turn is trained and every other turn is context, so only a
    # weight that says otherwise would be silently ignored.
    trained = _SHAREGPT_ROLES[speaker] == "assistant"
    if _is_set(turn, "weight") and turn["weight"] != int(trained):
        raise _RowError(
            f"{name}.weight",
            f"{shown(turn['weight'])} is not supported: every assistant turn is trained (weight 1) and no other "
            "(weight 0); to keep earlier assistant turns as context use prompt/completion",
        )
    message: dict[str, Any] = {"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]}
    if speaker == "function_call":
        calls = _sharegpt_tool_calls(turn["value"], f"{name}.value")
        message = {"role": "assistant", "content": None, "tool_calls": calls}
    try:
        return _message(message, name)
    except _RowError as exc:
        raise _RowError(_renamed_field(exc.field, name, {"role": "from", "content": "value"}), exc.message) from None


def _sharegpt_messages(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """A ShareGPT row as messages and their field names: the optional top-level ``system`` first, then each
    turn of ``conversations``, written ``{"from", "value"}`` or, as some datasets do, ``{"role", "content"}``."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise _RowError("conversations", f"must be a list of turns, got {_json_type(turns)}")
    if not turns:
        raise _RowError("conversations", "is an empty list")
    messages, names = [], []
    system = _text(row["system"], "system") if "system" in row else ""
    if system.strip():
        messages.append({"role": "system", "content": system})
        names.append("system")
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        is_sharegpt = isinstance(turn, dict) and "role" not in turn and any(k in turn for k in _SHAREGPT_TURN_KEYS)
        message = _sharegpt_turn(turn, name) if is_sharegpt else _message(turn, name)
        if message["role"] == "system" and messages:
            if names == ["system"]:
                raise _RowError("system", f"the row has two system prompts ('system' and {name}); keep one of them")
            speaker = f"{name}.from" if is_sharegpt else f"{name}.role"
            raise _RowError(speaker, "a system turn is only allowed as the first turn")
        messages.append(message)
        names.append(name)
    return messages, names


def _sharegpt_tools(value: Any) -> Any:
    """LLaMA-Factory writes ShareGPT ``tools`` as the JSON text of a list of function schemas, "" for none; as
    the ``tools`` of messages (a list of ``{"type": "function", "function": schema}``), checked by :func:`_tools`."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise _RowError("tools", "is a string but not JSON; use a list of tool schemas or its JSON text") from None
    if isinstance(value, list):
        return [{"type": "function", "function": tool} if isinstance(tool, dict) and "function" not in tool
                else tool for tool in value]
    return value


def _check_prompted(messages: list[dict[str, Any]], names: list[str]) -> None:
    """An assistant turn must answer something: as the very first message it has no prompt at all (and most
    templates cannot render the empty conversation before it)."""
    if messages[0]["role"] == "assistant":
        raise _RowError(names[0], "the conversation starts with an assistant turn, which then answers nothing; put "
                                  "the user turn it answers (or a system prompt) before it")


def _check_system_first(messages: list[dict[str, Any]], names: list[str]) -> None:
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


_LAST_TURN_ONLY = (
    "to train only the last turn, put the earlier turns in a conversational prompt (prompt/completion), or split "
    "the conversation into one row per assistant turn"
)
"""The fix for a template that rewrites earlier turns beyond recognition (gpt-oss's end-of-turn token, Mistral's
tools placement): the prompt's turns are context, located by one prefix at the end of the prompt."""

_Render = Callable[[list[dict[str, Any]], bool], str]
"""``render(messages, add_generation_prompt)``: :func:`render_chat` bound to one row's tokenizer and tools."""

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_EMPTY_REASONING = re.compile(r"<think>\s*</think>\s*")
"""An empty reasoning block at the start of an assistant turn. Templates such as Qwen3's write one into the
last assistant turn whether or not the data has reasoning; it carries no data, so it is context: training it
would teach the model to skip reasoning. A block with text in it (reasoning from the data) is trained."""


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    *,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The text the tokenizer's chat template makes of ``messages`` and ``tools`` (the
    :data:`FALLBACK_CHAT_TEMPLATE` where it has none)."""
    kwargs: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        kwargs = {"chat_template": FALLBACK_CHAT_TEMPLATE, "eos_token": tokenizer.eos_token or ""}
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:  # jinja's raise_exception, undefined variables, ... : the template refuses
        raise _RowError(None, f"the chat template cannot render this conversation: {_reason(exc)}") from None
    if not isinstance(text, str):
        raise ConfigError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def _has_generation_blocks(tokenizer: Any, tools: list[dict[str, Any]] | None) -> bool:
    """Whether the chat template marks assistant text with ``{% generation %}`` (for assistant masks)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    try:
        template = tokenizer.get_chat_template(None, tools)  # picks the "tool_use" one of named templates
    except Exception:  # noqa: BLE001 - no usable template: rendering reports it as a row error
        return False
    return bool(_GENERATION_BLOCK.search(template))


def _check_tools_rendered(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    names: list[str],
    tools: list[dict[str, Any]] | None,
    full: str,
) -> None:
    """Refuse tool data that the template would silently drop. Whether a template renders tools or tool
    messages is a property of the template, so one render (tools) and one substring search (the first tool
    message) are enough; tool calls are checked per trained turn where the turn is located."""
    if getattr(tokenizer, "chat_template", None) is None and _uses_tools(messages, tools):
        raise _RowError(
            None,
            "the tokenizer has no chat template and the built-in fallback cannot render tools, tool calls or "
            "tool messages; give the tokenizer a chat template that supports tools",
        )
    if tools and full == render_chat(tokenizer, messages, False):
        raise _RowError(
            "tools",
            "the chat template ignores tools (the rendering is the same without them); use a chat template "
            "that supports tools, or leave 'tools' out",
        )
    for k, message in enumerate(messages):
        if message["role"] == "tool":
            if not _shows_text(full, message["content"].strip()):
                raise _RowError(
                    names[k],
                    "the chat template drops 'tool' messages (their content is not in the rendering); use a "
                    "chat template that supports tools",
                )
            break


def _check_reasoning_rendered(
    messages: list[dict[str, Any]], names: list[str], train_from: int, render: _Render
) -> None:
    """Refuse reasoning that the template never renders because it reads neither ``reasoning_content`` nor
    ``thinking``: the answers would silently be trained without their reasoning. Templates may drop the
    reasoning of earlier turns (Qwen3 and gpt-oss do), so the first trained turn that has some is rendered as
    the last message, where a template that reads it writes it: one render per row, whatever the turns."""
    for k in range(train_from, len(messages)):
        reasoning = messages[k].get("reasoning_content", "").strip()
        if not reasoning:
            continue
        if not _shows_text(render(messages[: k + 1], False), reasoning):
            raise _RowError(
                names[k],
                "the chat template does not render the message's reasoning (it reads neither "
                "message.reasoning_content nor message.thinking); use a chat template that does (Qwen3's, "
                "gpt-oss's), or put the reasoning in the content",
            )
        return


def _shows_text(full: str, text: str) -> bool:
    """Whether ``full`` holds ``text`` as is or JSON-escaped (Llama 3.1's template writes tool results with
    ``tojson``)."""
    return text in full or json.dumps(text, ensure_ascii=False)[1:-1] in full


def _check_tool_calls_rendered(message: dict[str, Any], turn_text: str, name: str) -> None:
    for i, call in enumerate(message.get("tool_calls", ())):
        if call["function"]["name"] not in turn_text:
            raise _RowError(
                f"{name}.tool_calls[{i}]",
                f"the chat template does not render tool calls (the function name {call['function']['name']!r} "
                "is not in the rendered assistant turn); use a chat template that supports tools",
            )


def _shown_tail_length(turn: str, full: str, start: int) -> int:
    """Length of the longest tail of ``turn`` that ``full`` shows at ``start``.

    ``turn`` is an assistant turn as the model generates it at inference (rendered with nothing after it).
    Templates such as Qwen3's rewrite the head of a turn once later messages follow (they drop its reasoning
    block) but keep its content and end-of-turn token, so the full rendering shows a tail of the turn.
    """
    if full.startswith(turn, start):
        return len(turn)
    for i in range(1, len(turn)):
        # A short probe first keeps a turn that never matches from costing a copy of the turn per character.
        if full.startswith(turn[i : i + 16], start) and full.startswith(turn[i:], start):
            return len(turn) - i
    return 0


def _prefix_spans(
    messages: list[dict[str, Any]],
    names: list[str],
    train_from: int,
    render: _Render,
    full: str,
    window_end: int,
    max_tokens: int,
) -> list[tuple[int, int]]:
    """Character spans in ``full`` of the assistant turns with index >= ``train_from``, found by prefixes.

    Turn k starts where its prompt ends: ``prompt = render(messages[:k], add_generation_prompt=True)`` must
    be a prefix of ``full`` (so the context before the turn is what the model sees at inference). The turn as
    generated is ``render(messages[:k + 1])`` after the prompt, trailing whitespace removed. A prefix-stable
    template shows it unchanged in ``full``; a template that rewrites earlier turns (Qwen3 drops their
    reasoning) shows a tail of it, and that tail is the span.

    Locating a turn renders the conversation up to it, which costs time proportional to the turns before it.
    Turns that start past ``window_end`` are cut off by truncation anyway, so they are not located: the work
    stays bounded by the turns inside the window, not by the length of the conversation.
    """
    spans: list[tuple[int, int]] = []
    located = 0
    checked_generation_prompt = False
    for k, message in enumerate(messages):
        if k < train_from or message["role"] != "assistant":
            continue
        prompt = render(messages[:k], True)
        if len(prompt) >= window_end:
            break
        if located == MAX_ASSISTANT_TURNS:
            raise _RowError(
                names[k],
                f"more than {MAX_ASSISTANT_TURNS} assistant turns within max_seq_length={max_tokens} tokens "
                "(MAX_ASSISTANT_TURNS); split the conversation into several rows",
            )
        located += 1
        if not full.startswith(prompt):
            raise _RowError(
                names[k],
                "the chat template is not prefix-stable (the conversation before this assistant turn, rendered "
                "with add_generation_prompt=True, is not a prefix of the full rendering), so assistant turns "
                f"cannot be marked; {_LAST_TURN_ONLY}",
            )
        upto = render(messages[: k + 1], False)
        if not upto.startswith(prompt):
            raise _RowError(
                names[k],
                "the chat template renders this assistant turn without the generation prompt it writes before "
                "it (add_generation_prompt=True), so the turn cannot be located",
            )
        turn = upto[len(prompt) :].rstrip()
        if not checked_generation_prompt:  # a property of the template: checking one turn is enough
            _check_generation_prompt(render, messages[:k], prompt)
            checked_generation_prompt = True
        start = len(prompt)
        end = start + _shown_tail_length(turn, full, start)
        if turn and end == start:
            raise _RowError(
                names[k],
                "the chat template renders this assistant turn differently once later messages follow, and the "
                f"full rendering shows no part of it as generated, so the turn cannot be located; {_LAST_TURN_ONLY}",
            )
        if spans and start < spans[-1][1]:
            raise _RowError(names[k], "the chat template renders assistant turns out of order")
        _check_tool_calls_rendered(message, full[start:end], names[k])
        spans.append((start, end))
    return spans


_PROBE_CONTENT = "sstoken probe answer"


def _check_generation_prompt(render: _Render, before: list[dict[str, Any]], prompt: str) -> None:
    """Refuse a template whose prompt does not end where the model starts generating.

    A template whose ``add_generation_prompt=True`` changes nothing either needs no generation prompt
    (Mistral's: the assistant content follows ``[/INST]`` directly) or writes its assistant header inside the
    assistant turn, where it would be trained as if the model generated it. The two differ in where the turn
    starts: with the assistant's content, or with something of the template's. A probe turn of plain content is
    rendered to tell them apart, so that what the model itself writes first (reasoning, tool calls) is not taken
    for the template's header.
    """
    if prompt != render(before, False):
        return
    probe = render([*before, {"role": "assistant", "content": _PROBE_CONTENT}], False)[len(prompt) :]
    if not probe.lstrip().startswith(_PROBE_CONTENT):
        raise _RowError(
            None,
            "the chat template renders no generation prompt (add_generation_prompt=True changes nothing) and "
            "writes something of its own before the assistant's content, so assistant turns cannot be located; "
            "use a chat template with a generation prompt",
        )


def _generation_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    names: list[str],
    train_from: int,
    tools: list[dict[str, Any]] | None,
    render: _Render,
    full: str,
) -> list[tuple[int, int]]:
    """Character spans in ``full`` of the text the template marks with ``{% generation %}``.

    One render, whatever the number of turns. Turns before ``train_from`` (the prompt of conversational
    prompt/completion) are cut off at the end of the prompt rendered with ``add_generation_prompt=True``.
    """
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )
    except Exception as exc:  # noqa: BLE001 - the template refuses the conversation
        raise _RowError(None, f"the chat template cannot render this conversation: {_reason(exc)}") from None
    spans: list[tuple[int, int]] = []
    for marked, (start, end) in zip(out["assistant_masks"], out["offset_mapping"]):
        if not marked:
            continue
        if spans and start <= spans[-1][1]:  # consecutive marked tokens: one span
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    if not spans:
        raise _RowError(
            None,
            "the chat template has {% generation %} blocks but they mark no text of this conversation, so "
            "assistant turns cannot be located",
        )
    trained = [k for k, m in enumerate(messages) if k >= train_from and m["role"] == "assistant"]
    if train_from > 0:
        prompt = render(messages[:train_from], True)
        if not full.startswith(prompt):
            raise _RowError(
                names[trained[0]] if trained else None,
                "the chat template is not prefix-stable (the prompt rendered with add_generation_prompt=True "
                "is not a prefix of the full rendering), so the completion cannot be told from the prompt",
            )
        spans = [(max(start, len(prompt)), end) for start, end in spans if end > len(prompt)]
    marked_text = "".join(full[start:end] for start, end in spans)
    for k in trained:
        _check_tool_calls_rendered(messages[k], marked_text, names[k])
    return spans


def _trim_span(full: str, start: int, end: int) -> tuple[int, int]:
    """The span without a leading empty reasoning block and without trailing whitespace."""
    empty_reasoning = _EMPTY_REASONING.match(full, start, end)
    if empty_reasoning:
        start = empty_reasoning.end()
    while end > start and full[end - 1].isspace():
        end -= 1
    return start, end


def _label_tokens(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """``input_ids`` where a token's characters overlap a span, else ``IGNORE_INDEX``."""
    starts = [start for start, _ in spans]
    ends = [end for _, end in spans]
    # The spans are ordered and disjoint, so the only span a token can overlap is the last one starting before
    # the token ends: a binary search instead of a scan.
    labels = []
    for token_id, (s, e) in zip(input_ids, offsets):
        if s == e:  # an empty token is trained when its position lies inside a span
            i = bisect.bisect_right(starts, s) - 1
        else:
            i = bisect.bisect_left(starts, e) - 1
        trained = i >= 0 and s < ends[i]
        labels.append(token_id if trained else IGNORE_INDEX)
    return labels


def _encode_conversation(
    messages: list[dict[str, Any]],
    names: list[str],
    train_from: int,
    tokenizer: Any,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize one rendering of the whole conversation; train the assistant turns with index >= ``train_from``.

    The spans come from the template's ``{% generation %}`` blocks where it has them, else from prefix
    renderings (:func:`_prefix_spans`).
    """

    def render(part: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return render_chat(tokenizer, part, add_generation_prompt, tools=tools)

    full = render(messages, False)
    _check_tools_rendered(tokenizer, messages, names, tools, full)
    _check_reasoning_rendered(messages, names, train_from, render)
    encoding = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(encoding["input_ids"])
    offsets = list(encoding["offset_mapping"])
    if _has_generation_blocks(tokenizer, tools):
        spans = _generation_spans(tokenizer, messages, names, train_from, tools, render, full)
    else:
        # Characters after this offset belong only to tokens that truncation removes.
        window_end = offsets[max_tokens - 1][1] if len(offsets) > max_tokens else len(full)
        spans = _prefix_spans(messages, names, train_from, render, full, window_end, max_tokens)
    spans = [span for span in (_trim_span(full, start, end) for start, end in spans) if span[1] > span[0]]
    return input_ids, _label_tokens(input_ids, offsets, spans)


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


def _encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """A language-modelling row as TRL tokenizes it (special tokens the tokenizer adds, EOS appended unless the
    text ends with it): every token is trained, there is no context."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids[-1:] != [eos]:
        ids.append(eos)
    return ids, list(ids)


def _alpaca_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    instruction = _text(row["instruction"], "instruction", nonblank=True)
    output = _text(row["output"], "output", nonblank=True, what=" (nothing to train on)")
    extra = _text(row["input"], "input") if "input" in row else ""
    system = _text(row["system"], "system") if "system" in row else ""
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _refuse_tools(tools: list[dict[str, Any]] | None) -> None:
    if tools:
        raise _RowError(
            "tools", "only conversations can use tools (messages, or prompt and completion as lists of messages)"
        )


def _encode_fields(row: Mapping[str, Any], tokenizer: Any, max_tokens: int) -> tuple[str, list[int], list[int]]:
    # 'tools' goes with any conversation format, so the format is told by the other keys.
    fmt = _detect_format({key: value for key, value in row.items() if key != "tools"})
    tools = _tools(_sharegpt_tools(row.get("tools")) if fmt == "sharegpt" else row.get("tools"))
    if fmt == TEXT_KEY:
        _refuse_tools(tools)
        text = _text(row[TEXT_KEY], TEXT_KEY, nonblank=True, what=" (nothing to train on)")
        return fmt, *_encode_text(text, tokenizer)
    if fmt == "sharegpt":
        messages, names = _sharegpt_messages(row)  # checks that a system turn comes first
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowError("conversations", "has no assistant turn ('gpt'; nothing to train on)")
        _check_prompted(messages, names)
        return fmt, *_encode_conversation(messages, names, 0, tokenizer, max_tokens, tools)
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
        names = [f"messages[{i}]" for i in range(len(messages))]
        _check_system_first(messages, names)
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowError("messages", "has no assistant turn (nothing to train on)")
        _check_prompted(messages, names)
        return fmt, *_encode_conversation(messages, names, 0, tokenizer, max_tokens, tools)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt = _text(prompt, "prompt")
            completion = _text(completion, "completion", nonblank=True, what=" (nothing to train on)")
            _refuse_tools(tools)
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
            return fmt, *_encode_conversation(messages, names, len(prompt_messages), tokenizer, max_tokens, tools)
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, (str, list)):
                raise _RowError(name, f"must be a string or a list of messages, got {_json_type(value)}")
        raise _RowError(
            "completion",
            f"prompt is {_a(_json_type(prompt))} but completion is {_a(_json_type(completion))}; both must be "
            "strings or both lists of messages",
        )
    messages = _alpaca_messages(row)
    _refuse_tools(tools)
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


def token_features() -> dict[str, Any]:
    """The ``datasets`` features of encoded rows: int64 ``input_ids`` and ``labels`` sequences."""
    import datasets

    sequence = getattr(datasets, "List", None) or datasets.Sequence
    return {"input_ids": sequence(datasets.Value("int64")), "labels": sequence(datasets.Value("int64"))}


def to_hf_dataset(rows: list[Mapping[str, list[int]]]):
    """A :class:`datasets.Dataset` with int64 ``input_ids`` and ``labels`` columns."""
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": [list(r["input_ids"]) for r in rows], "labels": [list(r["labels"]) for r in rows]},
        features=datasets.Features(token_features()),
    )


def demo_data_path() -> str:
    """The demo data shipped with the package (``sstoken/demo/demo.jsonl``)."""
    return str(Path(__file__).parent / "demo" / "demo.jsonl")

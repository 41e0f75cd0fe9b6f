"""Row formats: detect a row's format from its keys and validate its fields into a :class:`ParsedRow`.

Each row is a mapping in one of five formats:

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str | [parts]}, ...]}``
  (assistant messages may carry ``tool_calls`` and ``reasoning_content``)
* ``prompt_completion``: ``{"prompt": str, "completion": str}`` or, conversational,
  ``{"prompt": [messages...], "completion": [messages...]}``
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...], "system": str (optional)}``,
  converted to messages
* ``text``: ``{"text": str}`` (language modelling: every token trained), only when no other format's key is there

plus ``tools`` (handed to the encoder with the row) and ``weight`` (a loss weight for the whole row; an assistant
message or ShareGPT turn may carry its own, see :func:`_weight`). Any other key (``id``, ``category``, ``prompt_id``, ...) is
ignored, except a near miss of a format key the row lacks (``mesages``), which is an error. A malformed row
raises :class:`RowError`, which the encoder turns into a :class:`~sstoken.errors.DataError` naming the row and the
field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sstoken.data.reading import field_name, json_type, with_article
from sstoken.errors import DataError, did_you_mean, shown

ROLES = ("system", "user", "assistant", "tool")


METADATA_KEYS = frozenset({"id", "meta", "metadata", "source"})


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""Names of an assistant message's reasoning, the ones transformers aliases: Qwen3's template and vLLM's
reasoning parsers use ``reasoning_content``, gpt-oss's template ``thinking``. The reasoning is handed to the
template under the first two, whichever the data used (as recent transformers versions do themselves)."""


WEIGHT_KEY = "weight"
"""A loss weight: on a row (all its trained tokens) or on an assistant message (that turn's tokens)."""


MAX_WEIGHT = 10.0
"""Largest ``weight`` accepted. Weights are relative to the default 1 and a token of weight w trains like w tokens
(the loss divides by the count of trained tokens, not by their weights), so a larger value is far more likely a
score on another scale (a percentage, a 1–100 rating) than a wish: such data is refused, to be rescaled."""


MESSAGE_KEYS = ("role", "content", "name", "tool_call_id", "tool_calls", *REASONING_KEYS, WEIGHT_KEY)


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


PASSTHROUGH_KEYS = frozenset({"tools", WEIGHT_KEY})
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


class RowError(Exception):
    """A problem with one row; ``field`` is a path like ``messages[1].content`` or None for the row."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def render(self, where: str) -> str:
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


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
            raise RowError(
                field_name(key),
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
        raise RowError(None, f"row mixes formats: {' and '.join(parts)}; use one format per row{hint}")
    if not present and TEXT_KEY in row:
        # Lowest priority: many chat datasets carry a rendered copy of each row as `text` beside `messages`.
        return TEXT_KEY
    if not present:
        found = [repr(str(k)) for k in row]
        has = f" (the row has {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""
        raise RowError(
            None,
            "row has no data: expected 'messages', or 'prompt' and 'completion', or 'instruction' and "
            f"'output' (alpaca), or 'conversations' (ShareGPT), or 'text'{has}; map other names with `columns:` "
            "(see docs/data.md)",
        )
    fmt = present[0]
    for key in _REQUIRED[fmt]:
        if key not in row:
            raise RowError(key, f"missing (required by the {fmt} format)")
    return fmt


def format_of(row: Mapping[str, Any], *, where: str = "<row>") -> str:
    """The row's format: ``"messages"``, ``"prompt_completion"``, ``"alpaca"``, ``"sharegpt"`` or ``"text"``.

    Raises :class:`DataError` (prefixed with ``where``) for unknown keys, mixed formats or a missing
    required key. Field values are not checked here; :func:`encode_row` does that.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {json_type(row)}")
    try:
        return _detect_format(row)
    except RowError as exc:
        raise DataError(exc.render(where)) from None


def _text(value: Any, field: str, *, nonblank: bool = False, what: str = "") -> str:
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(
            field, f"contains an unpaired UTF-16 surrogate \\u{ord(value[exc.start]):04x} at character {exc.start}"
        ) from None
    if nonblank and not value.strip():
        raise RowError(field, f"is empty or whitespace only{what}")
    return value


def _is_set(mapping: Mapping[str, Any], key: str) -> bool:
    # An optional key holding null counts as absent: a file loaded with `datasets` gives every message every
    # key that any message of the file has, filled with null.
    return mapping.get(key) is not None


def _weight(value: Any, field: str) -> float:
    """A loss weight: a finite number from 0 to :data:`MAX_WEIGHT` (0: not trained)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"must be a number from 0 to {MAX_WEIGHT:g}, got {json_type(value)}")
    if not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
        raise RowError(field, f"must be a number from 0 to {MAX_WEIGHT:g} (1 is the default; 0 leaves the tokens "
                              f"untrained), got {shown(value)}; rescale weights written on another scale")
    return float(value)


def _turn_weights(messages: list[dict[str, Any]], names: list[str], first_trained: int) -> list[float] | None:
    """The per-message weights of a parsed conversation (1 where none is given), taken out of the messages so
    that the chat template never sees them; None when no message has one. Only a trained turn (an assistant
    message from ``first_trained`` on) can weigh anything: context messages accept 0 alone, as axolotl writes
    weights on every turn."""
    weights = [message.pop(WEIGHT_KEY, None) for message in messages]
    if all(w is None for w in weights):
        return None
    for k, (message, w) in enumerate(zip(messages, weights)):
        trained = message["role"] == "assistant" and k >= first_trained
        if w and not trained:
            what = "an assistant message of the prompt" if message["role"] == "assistant" else \
                f"a {message['role']} message"
            raise RowError(f"{names[k]}.{WEIGHT_KEY}", f"{shown(w)} on {what}, which is context and never trained "
                                                       "(only 0 is accepted there); weigh the assistant turns")
    return [1.0 if w is None else w for w in weights]


def _check_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], name: str, shape: str) -> None:
    for key in obj:
        if key not in allowed and obj[key] is not None:
            raise RowError(f"{name}.{field_name(key)}", f"unknown field{did_you_mean(key, allowed)}; {shape}")


def _text_parts(parts: list[Any], field: str) -> str:
    """The text of list-of-parts content (``[{"type": "text", "text": ...}, ...]``), parts joined by
    :data:`_PART_SEPARATOR`. Flattening keeps text-only templates (which read ``content`` as a string, or drop
    it when it is not one) from losing the text."""
    texts = []
    for i, part in enumerate(parts):
        name = f"{field}[{i}]"
        if not isinstance(part, dict):
            raise RowError(name, f"must be a content part like {_TEXT_PART_SHAPE}, got {json_type(part)}")
        if not _is_set(part, "type"):
            raise RowError(f"{name}.type", f"missing (a content part is {_TEXT_PART_SHAPE})")
        if part["type"] != "text":
            raise RowError(
                f"{name}.type",
                f"{part['type']!r} parts are not supported: sstoken trains text-only models, so content parts "
                f"must be {_TEXT_PART_SHAPE}",
            )
        _check_keys(part, _TEXT_PART_KEYS, name, "a text part has only 'type' and 'text'")
        if not _is_set(part, "text"):
            raise RowError(f"{name}.text", f"missing (a content part is {_TEXT_PART_SHAPE})")
        texts.append(_text(part["text"], f"{name}.text"))
    return _PART_SEPARATOR.join(texts)


def _content(value: Any, field: str) -> str:
    if isinstance(value, list):
        return _text_parts(value, field)
    if not isinstance(value, str):
        raise RowError(field, f"must be a string or a list of text parts, got {json_type(value)}")
    return _text(value, field)


def _function_call(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowError(field, f"must be an object with 'name' and 'arguments', got {json_type(value)}")
    _check_keys(value, _FUNCTION_KEYS, field, "a function call has only 'name' and 'arguments'")
    if not _is_set(value, "name"):
        raise RowError(f"{field}.name", "missing (the name of the called function)")
    name = _text(value["name"], f"{field}.name", nonblank=True)
    if not _is_set(value, "arguments"):
        raise RowError(f"{field}.arguments", "missing (use {} for a call without arguments)")
    arguments = value["arguments"]
    if isinstance(arguments, str):  # OpenAI's shape; passed to the template as given, but it must be JSON
        try:
            parsed = json.loads(_text(arguments, f"{field}.arguments"))
        except (json.JSONDecodeError, RecursionError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            raise RowError(f"{field}.arguments", "is a string but not a JSON object; use an object or its JSON text")
    elif not isinstance(arguments, dict):
        raise RowError(f"{field}.arguments", f"must be an object (or its JSON text), got {json_type(arguments)}")
    return {"name": name, "arguments": arguments}


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of tool calls like {_TOOL_CALL_SHAPE}, got {json_type(value)}")
    if not value:
        raise RowError(field, "is an empty list (leave 'tool_calls' out when the turn calls no tool)")
    calls = []
    for i, call in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise RowError(name, f"must be a tool call like {_TOOL_CALL_SHAPE}, got {json_type(call)}")
        if not _is_set(call, "function") and "name" in call:
            raise RowError(
                f"{name}.function", f"missing: put 'name' and 'arguments' inside 'function' ({_TOOL_CALL_SHAPE})"
            )
        _check_keys(call, _TOOL_CALL_KEYS, name, "a tool call has 'function' and optional 'type' and 'id'")
        if _is_set(call, "type") and call["type"] != "function":
            raise RowError(f"{name}.type", f"only 'function' tool calls are supported, got {call['type']!r}")
        if not _is_set(call, "function"):
            raise RowError(f"{name}.function", f"missing ({_TOOL_CALL_SHAPE})")
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
        raise RowError("tools", f"must be a list of tool schemas like {_TOOL_SHAPE}, got {json_type(value)}")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RowError(f"tools[{i}]", f"must be a tool schema like {_TOOL_SHAPE}, got {json_type(tool)}")
        function = tool.get("function")
        if not isinstance(function, dict):
            got = "missing" if function is None else f"must be an object, got {json_type(function)}"
            raise RowError(f"tools[{i}].function", f"{got} (a tool schema is {_TOOL_SHAPE})")
        if not _is_set(function, "name"):
            raise RowError(f"tools[{i}].function.name", "missing (the name the model calls the function by)")
        _text(function["name"], f"tools[{i}].function.name", nonblank=True)
    return value or None


def _message(message: Any, name: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RowError(name, f"must be an object with 'role' and 'content', got {json_type(message)}")
    if "role" not in message and any(key in message for key in _SHAREGPT_TURN_KEYS):
        raise RowError(
            name,
            "is a ShareGPT turn ('from'/'value'): ShareGPT data goes in a 'conversations' column, which sstoken "
            "reads as is (no `columns:` mapping needed)",
        )
    _check_keys(
        message,
        MESSAGE_KEYS,
        name,
        "a message has 'role' and 'content', plus 'tool_calls' and 'reasoning_content' (assistant), "
        "'tool_call_id' (tool), 'name' and 'weight'",
    )
    if "role" not in message:
        raise RowError(f"{name}.role", "missing (every message needs 'role' and 'content')")
    role = message["role"]
    if not isinstance(role, str):
        raise RowError(f"{name}.role", f"must be a string, got {json_type(role)}")
    if role not in ROLES:
        hint = f" (use {_ROLE_HINTS[role.lower()]!r})" if role.lower() in _ROLE_HINTS else ""
        hint = hint or did_you_mean(role, ROLES)
        raise RowError(
            f"{name}.role", f"unknown role {role!r}{hint}; expected 'system', 'user', 'assistant' or 'tool'"
        )
    tool_calls = None
    if _is_set(message, "tool_calls"):
        if role != "assistant":
            raise RowError(f"{name}.tool_calls", f"only assistant messages call tools, this one is {role!r}")
        tool_calls = _tool_calls(message["tool_calls"], f"{name}.tool_calls")
    if tool_calls is not None and message.get("content") is None:
        content = ""  # a turn that only calls tools; templates expect a string
    elif "content" not in message:
        raise RowError(f"{name}.content", "missing (every message needs 'role' and 'content')")
    else:
        content = _content(message["content"], f"{name}.content")
    if role == "assistant" and tool_calls is None and not content.strip():
        raise RowError(
            f"{name}.content",
            "is empty or whitespace only (an assistant turn must have text or tool calls to train on)",
        )
    out: dict[str, Any] = {"role": role, "content": content}
    if _is_set(message, "name"):
        out["name"] = _text(message["name"], f"{name}.name", nonblank=True)
    if _is_set(message, "tool_call_id"):
        if role != "tool":
            raise RowError(f"{name}.tool_call_id", f"only tool messages answer a tool call, this one is {role!r}")
        out["tool_call_id"] = _text(message["tool_call_id"], f"{name}.tool_call_id")
    if tool_calls is not None:
        out["tool_calls"] = tool_calls
    reasoning = _reasoning(message, role, name)
    if reasoning is not None:
        out["reasoning_content"] = out["thinking"] = reasoning
    if _is_set(message, WEIGHT_KEY):  # taken out again by _turn_weights, before any template sees the message
        out[WEIGHT_KEY] = _weight(message[WEIGHT_KEY], f"{name}.{WEIGHT_KEY}")
    return out


def _reasoning(message: Mapping[str, Any], role: str, name: str) -> str | None:
    """The message's reasoning, under whichever of :data:`REASONING_KEYS` it is written; None without any."""
    given = [key for key in REASONING_KEYS if _is_set(message, key)]
    if not given:
        return None
    if role != "assistant":
        raise RowError(f"{name}.{given[0]}", f"only assistant messages reason, this one is {role!r}")
    texts = [_text(message[key], f"{name}.{key}") for key in given]
    for key, text in zip(given[1:], texts[1:]):
        if text != texts[0]:
            raise RowError(f"{name}.{key}", f"differs from {given[0]}: a message has one reasoning; keep one key")
    return texts[0]


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of messages, got {json_type(value)}")
    if not value:
        raise RowError(field, "is an empty list")
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
        raise RowError(
            field,
            f"a function_call turn must hold the JSON text of a tool call {_SHAREGPT_CALL_SHAPE} (or a list of "
            "them): a tool call needs structured arguments to be rendered by the chat template",
        )
    return [{"type": "function", "function": _function_call(call, field)} for call in calls]


def _sharegpt_turn(turn: Any, name: str) -> dict[str, Any]:
    """One ShareGPT turn ``{"from": ..., "value": ...}`` as a validated message; errors name ``from``/``value``."""
    _check_keys(turn, (*_SHAREGPT_TURN_KEYS, WEIGHT_KEY), name, "a ShareGPT turn has 'from' and 'value' (and an "
                                                                 "optional 'weight')")
    if not _is_set(turn, "from"):
        raise RowError(f"{name}.from", "missing (a ShareGPT turn has 'from' and 'value')")
    speaker = turn["from"]
    if not isinstance(speaker, str):
        raise RowError(f"{name}.from", f"must be a string, got {json_type(speaker)}")
    if speaker not in _SHAREGPT_ROLES:
        hint = did_you_mean(speaker, _SHAREGPT_ROLES)
        if not hint and _ROLE_HINTS.get(speaker.lower()) == "assistant":
            hint = " (use 'gpt')"
        raise RowError(
            f"{name}.from",
            f"unknown speaker {speaker!r}{hint}; expected 'human', 'gpt', 'system', 'function_call', "
            "'observation' or 'tool'",
        )
    if "value" not in turn:
        raise RowError(f"{name}.value", "missing (a ShareGPT turn has 'from' and 'value')")
    message: dict[str, Any] = {"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]}
    if speaker == "function_call":
        calls = _sharegpt_tool_calls(turn["value"], f"{name}.value")
        message = {"role": "assistant", "content": None, "tool_calls": calls}
    if _is_set(turn, WEIGHT_KEY):  # axolotl's per-turn switch (0 or 1), here any loss weight
        message[WEIGHT_KEY] = turn[WEIGHT_KEY]
    try:
        return _message(message, name)
    except RowError as exc:
        raise RowError(_renamed_field(exc.field, name, {"role": "from", "content": "value"}), exc.message) from None


def _sharegpt_messages(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """A ShareGPT row as messages and their field names: the optional top-level ``system`` first, then each
    turn of ``conversations``, written ``{"from", "value"}`` or, as some datasets do, ``{"role", "content"}``."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError("conversations", f"must be a list of turns, got {json_type(turns)}")
    if not turns:
        raise RowError("conversations", "is an empty list")
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
                raise RowError("system", f"the row has two system prompts ('system' and {name}); keep one of them")
            speaker = f"{name}.from" if is_sharegpt else f"{name}.role"
            raise RowError(speaker, "a system turn is only allowed as the first turn")
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
            raise RowError("tools", "is a string but not JSON; use a list of tool schemas or its JSON text") from None
    if isinstance(value, list):
        return [{"type": "function", "function": tool} if isinstance(tool, dict) and "function" not in tool
                else tool for tool in value]
    return value


def _check_prompted(messages: list[dict[str, Any]], names: list[str]) -> None:
    """An assistant turn must answer something: as the very first message it has no prompt at all (and most
    templates cannot render the empty conversation before it)."""
    if messages[0]["role"] == "assistant":
        raise RowError(names[0], "the conversation starts with an assistant turn, which then answers nothing; put "
                                  "the user turn it answers (or a system prompt) before it")


def _check_system_first(messages: list[dict[str, Any]], names: list[str]) -> None:
    for i, message in enumerate(messages):
        if i > 0 and message["role"] == "system":
            raise RowError(f"{names[i]}.role", "a system message is only allowed as the first message")


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
        raise RowError(
            "tools", "only conversations can use tools (messages, or prompt and completion as lists of messages)"
        )


@dataclass
class ParsedRow:
    """A validated row, ready to tokenize: a conversation (``messages``, whose turns from ``first_trained`` on
    are trained when they are the assistant's), a plain ``prompt``/``completion`` pair, or a language-modelling
    ``text``. ``names`` are the fields that the messages came from, for error messages. ``weight`` is the row's
    loss weight, ``turn_weights`` one per message (None: all 1)."""

    format: str
    messages: list[dict[str, Any]] | None = None
    names: list[str] = field(default_factory=list)
    first_trained: int = 0
    tools: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    weight: float = 1.0
    turn_weights: list[float] | None = None


def parse_row(row: Mapping[str, Any]) -> ParsedRow:
    """Detect the row's format and validate its fields; raises :class:`RowError`."""
    parsed = _parse_fields(row)
    if _is_set(row, WEIGHT_KEY):
        parsed.weight = _weight(row[WEIGHT_KEY], WEIGHT_KEY)
    if parsed.messages is not None:
        parsed.turn_weights = _turn_weights(parsed.messages, parsed.names, parsed.first_trained)
    return parsed


def _parse_fields(row: Mapping[str, Any]) -> ParsedRow:
    # 'tools' and 'weight' go with any format, so the format is told by the other keys.
    fmt = _detect_format({key: value for key, value in row.items() if key not in PASSTHROUGH_KEYS})
    tools = _tools(_sharegpt_tools(row.get("tools")) if fmt == "sharegpt" else row.get("tools"))
    if fmt == TEXT_KEY:
        _refuse_tools(tools)
        return ParsedRow(fmt, text=_text(row[TEXT_KEY], TEXT_KEY, nonblank=True, what=" (nothing to train on)"))
    if fmt == "sharegpt":
        messages, names = _sharegpt_messages(row)  # checks that a system turn comes first
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("conversations", "has no assistant turn ('gpt'; nothing to train on)")
        _check_prompted(messages, names)
        return ParsedRow(fmt, messages, names, tools=tools)
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
        names = [f"messages[{i}]" for i in range(len(messages))]
        _check_system_first(messages, names)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("messages", "has no assistant turn (nothing to train on)")
        _check_prompted(messages, names)
        return ParsedRow(fmt, messages, names, tools=tools)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt = _text(prompt, "prompt")
            completion = _text(completion, "completion", nonblank=True, what=" (nothing to train on)")
            _refuse_tools(tools)
            return ParsedRow(fmt, prompt=prompt, completion=completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt_messages = _messages(prompt, "prompt")
            completion_messages = _messages(completion, "completion")
            names = [f"prompt[{i}]" for i in range(len(prompt_messages))]
            names += [f"completion[{i}]" for i in range(len(completion_messages))]
            messages = prompt_messages + completion_messages
            _check_system_first(messages, names)
            if not any(m["role"] == "assistant" for m in completion_messages):
                raise RowError("completion", "has no assistant message (nothing to train on)")
            return ParsedRow(fmt, messages, names, len(prompt_messages), tools)
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, (str, list)):
                raise RowError(name, f"must be a string or a list of messages, got {json_type(value)}")
        raise RowError(
            "completion",
            f"prompt is {with_article(json_type(prompt))} but completion is {with_article(json_type(completion))}; both must be "
            "strings or both lists of messages",
        )
    messages = _alpaca_messages(row)
    _refuse_tools(tools)
    names = [{"system": "system", "user": "instruction", "assistant": "output"}[m["role"]] for m in messages]
    return ParsedRow(fmt, messages, names)

"""Conversations through the chat template: one rendering, tokenized once with offsets, and the character spans
of the trained (assistant) turns.

A template with ``{% generation %}`` blocks gives the spans through its assistant-token mask. Otherwise the span
of assistant turn ``k`` starts at ``len(render(messages[:k], add_generation_prompt=True))`` and holds the turn as
``render(messages[:k + 1])`` writes it, minus trailing whitespace (content and end-of-turn token); for templates
that rewrite earlier turns (Qwen3 drops their reasoning) it is the tail of that turn which the full rendering
shows. An empty reasoning block at the start of a span is context. Without a chat template,
:data:`FALLBACK_CHAT_TEMPLATE` is used.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from typing import Any

from sstoken.batch import IGNORE_INDEX
from sstoken.data.formats import RowError
from sstoken.errors import ConfigError

MAX_ASSISTANT_TURNS = 512
"""Limit on the assistant turns of one row that fall inside ``max_seq_length`` (turns beyond it are cut off
and not counted). Locating turn k costs time proportional to k, so this bounds the check of one row to
seconds instead of letting a pathological conversation stall the data check."""


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
        raise RowError(None, f"the chat template cannot render this conversation: {_reason(exc)}") from None
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
        raise RowError(
            None,
            "the tokenizer has no chat template and the built-in fallback cannot render tools, tool calls or "
            "tool messages; give the tokenizer a chat template that supports tools",
        )
    if tools and full == render_chat(tokenizer, messages, False):
        raise RowError(
            "tools",
            "the chat template ignores tools (the rendering is the same without them); use a chat template "
            "that supports tools, or leave 'tools' out",
        )
    for k, message in enumerate(messages):
        if message["role"] == "tool":
            if not _shows_text(full, message["content"].strip()):
                raise RowError(
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
            raise RowError(
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
            raise RowError(
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
) -> tuple[list[tuple[int, int]], list[int]]:
    """Character spans in ``full`` of the assistant turns with index >= ``train_from``, found by prefixes, and the
    index of the turn each span is.

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
    turns: list[int] = []
    located = 0
    checked_generation_prompt = False
    for k, message in enumerate(messages):
        if k < train_from or message["role"] != "assistant":
            continue
        prompt = render(messages[:k], True)
        if len(prompt) >= window_end:
            break
        if located == MAX_ASSISTANT_TURNS:
            raise RowError(
                names[k],
                f"more than {MAX_ASSISTANT_TURNS} assistant turns within max_seq_length={max_tokens} tokens "
                "(MAX_ASSISTANT_TURNS); split the conversation into several rows",
            )
        located += 1
        if not full.startswith(prompt):
            raise RowError(
                names[k],
                "the chat template is not prefix-stable (the conversation before this assistant turn, rendered "
                "with add_generation_prompt=True, is not a prefix of the full rendering), so assistant turns "
                f"cannot be marked; {_LAST_TURN_ONLY}",
            )
        upto = render(messages[: k + 1], False)
        if not upto.startswith(prompt):
            raise RowError(
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
            raise RowError(
                names[k],
                "the chat template renders this assistant turn differently once later messages follow, and the "
                f"full rendering shows no part of it as generated, so the turn cannot be located; {_LAST_TURN_ONLY}",
            )
        if spans and start < spans[-1][1]:
            raise RowError(names[k], "the chat template renders assistant turns out of order")
        _check_tool_calls_rendered(message, full[start:end], names[k])
        spans.append((start, end))
        turns.append(k)
    return spans, turns


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
        raise RowError(
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
        raise RowError(None, f"the chat template cannot render this conversation: {_reason(exc)}") from None
    spans: list[tuple[int, int]] = []
    for marked, (start, end) in zip(out["assistant_masks"], out["offset_mapping"]):
        if not marked:
            continue
        if spans and start <= spans[-1][1]:  # consecutive marked tokens: one span
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    if not spans:
        raise RowError(
            None,
            "the chat template has {% generation %} blocks but they mark no text of this conversation, so "
            "assistant turns cannot be located",
        )
    trained = [k for k, m in enumerate(messages) if k >= train_from and m["role"] == "assistant"]
    if train_from > 0:
        prompt = render(messages[:train_from], True)
        if not full.startswith(prompt):
            raise RowError(
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
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
    span_weights: list[float] | None = None,
) -> tuple[list[int], list[float] | None]:
    """``input_ids`` where a token's characters overlap a span, else ``IGNORE_INDEX``; and each token's weight,
    its span's (1 on context), or None when every span weighs 1."""
    starts = [start for start, _ in spans]
    ends = [end for _, end in spans]
    weighted = span_weights is not None and any(w != 1.0 for w in span_weights)
    # The spans are ordered and disjoint, so the only span a token can overlap is the last one starting before
    # the token ends: a binary search instead of a scan.
    labels, weights = [], []
    for token_id, (s, e) in zip(input_ids, offsets):
        if s == e:  # an empty token is trained when its position lies inside a span
            i = bisect.bisect_right(starts, s) - 1
        else:
            i = bisect.bisect_left(starts, e) - 1
        trained = i >= 0 and s < ends[i]
        labels.append(token_id if trained else IGNORE_INDEX)
        if weighted:
            weights.append(span_weights[i] if trained else 1.0)
    return labels, weights if weighted else None


def _generation_span_turns(
    spans: list[tuple[int, int]], messages: list[dict[str, Any]], names: list[str], trained: list[int],
    render: _Render, full: str,
) -> list[int]:
    """The trained turn each ``{% generation %}`` span belongs to: the last one whose prompt (the conversation
    before it, rendered with ``add_generation_prompt=True``) ends at or before the span. Needed only when the
    turns weigh differently; one render per trained turn."""
    starts = []
    for k in trained:
        prompt = render(messages[:k], True)
        if not full.startswith(prompt):
            raise RowError(
                f"{names[k]}.weight",
                "turns of different weights need the conversation before each turn, rendered with "
                "add_generation_prompt=True, to be a prefix of the full rendering, and this chat template is not "
                "prefix-stable; give the row's assistant turns one weight (or a row 'weight')",
            )
        starts.append(len(prompt))
    return [trained[max(0, bisect.bisect_right(starts, start) - 1)] for start, _ in spans]


def encode_conversation(
    messages: list[dict[str, Any]],
    names: list[str],
    train_from: int,
    tokenizer: Any,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
    turn_weights: list[float] | None = None,
) -> tuple[list[int], list[int], list[float] | None]:
    """Tokenize one rendering of the whole conversation; train the assistant turns with index >= ``train_from``.

    The spans come from the template's ``{% generation %}`` blocks where it has them, else from prefix
    renderings (:func:`_prefix_spans`). ``turn_weights`` (one per message, None: all 1) weigh each trained
    turn's tokens; a turn of weight 0 is not trained (context). Returns the ids, the labels and the per-token
    weights (None when every trained token weighs 1).
    """

    def render(part: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return render_chat(tokenizer, part, add_generation_prompt, tools=tools)

    full = render(messages, False)
    _check_tools_rendered(tokenizer, messages, names, tools, full)
    _check_reasoning_rendered(messages, names, train_from, render)
    encoding = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(encoding["input_ids"])
    offsets = list(encoding["offset_mapping"])
    trained = [k for k, m in enumerate(messages) if k >= train_from and m["role"] == "assistant"]
    turn_weights = turn_weights or [1.0] * len(messages)
    one_weight = len({turn_weights[k] for k in trained}) <= 1
    if _has_generation_blocks(tokenizer, tools):
        spans = _generation_spans(tokenizer, messages, names, train_from, tools, render, full)
        if one_weight:
            turns = [trained[0] if trained else 0] * len(spans)
        else:
            turns = _generation_span_turns(spans, messages, names, trained, render, full)
    else:
        # Characters after this offset belong only to tokens that truncation removes.
        window_end = offsets[max_tokens - 1][1] if len(offsets) > max_tokens else len(full)
        spans, turns = _prefix_spans(messages, names, train_from, render, full, window_end, max_tokens)
    weighted = [(span, turn_weights[k]) for span, k in
                zip((_trim_span(full, start, end) for start, end in spans), turns)]
    weighted = [(span, weight) for span, weight in weighted if span[1] > span[0] and weight > 0]
    labels, weights = _label_tokens(input_ids, offsets, [span for span, _ in weighted], [w for _, w in weighted])
    return input_ids, labels, weights

"""Chat templates beyond plain ChatML: tools and tool calls, list content, ``{% generation %}`` masks, and
templates that rewrite earlier turns (Qwen3). The templates below are small fixtures written for these tests
that imitate the behaviour of real ones; every label mask is checked by decoding the trained tokens."""

from __future__ import annotations

import copy
import json

import pytest
from test_encoding import A, S, U  # one set of message builders for the data tests

from sstoken.batch import IGNORE_INDEX
from sstoken.data.encoding import EncodedRow, encode_row
from sstoken.errors import DataError
from sstoken.testing import CHATML_TEMPLATE, tiny_tokenizer

# Tool-aware ChatML (prefix-stable): tools listed in the system turn, each tool call as one <tool_call> JSON
# in the assistant turn, tool results in a "tool" turn.
TOOL_CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ 'Tools:\n' }}{% for tool in tools %}{{ tool | tojson + '\n' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Imitates Qwen3's template: the last assistant turn after the last user message gets a <think> block (empty
# when the data has no reasoning); earlier turns lose theirs, so the template is not prefix-stable; tool
# results go into a user turn. Reasoning comes from message.reasoning_content when it is a string, else from a
# <think> block in the content.
QWEN3_LIKE = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for message in messages %}{% if message.role == 'user' %}{% set ns.last_query = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}{% for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}{{ '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}"
    "{% elif message.role == 'assistant' %}"
    "{% set content = message.content %}{% set reasoning = '' %}"
    "{% if message.reasoning_content is string %}{% set reasoning = message.reasoning_content %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}{% endif %}"
    "{{ content }}"
    "{% for call in message.tool_calls or [] %}{% if content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson"
    " + '\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

# Imitates gpt-oss's "harmony" template: the last assistant message, and only it, is written with its reasoning
# (analysis channel) and ends with <|return|>; earlier ones keep only the final channel and end with <|end|>.
# Like the real template, it reads the reasoning from message.thinking.
HARMONY_LIKE = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "{% if loop.last and message.thinking %}"
    "{{ '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{% endif %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message.content }}"
    "{{ '<|return|>' if loop.last else '<|end|>' }}"
    "{% else %}{{ '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

# Imitates Mistral's v3 template: the tools list is written just before the last user message, so it moves
# when a later user message follows (not prefix-stable in a multi-turn conversation).
MISTRAL_LIKE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}"
    "{% if tools and loop.index0 == ns.last_user %}"
    "{{ '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{{ '[INST]' + message.content + '[/INST]' }}"
    "{% elif message.role == 'assistant' %}{{ message.content }}"
    "{% for call in message.tool_calls or [] %}{{ '[TOOL_CALLS]' + [call.function] | tojson }}{% endfor %}"
    "{{ '</s>' }}"
    "{% elif message.role == 'tool' %}{{ '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}{% endif %}"
    "{% endfor %}"
)

# ChatML whose assistant text (content and <|im_end|>) is marked for assistant masks.
GENERATION_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def with_template(template: str | None):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tool_tok():
    return with_template(TOOL_CHATML)


@pytest.fixture(scope="module")
def qwen_tok():
    return with_template(QWEN3_LIKE)


def CALL(name="get_weather", content=None, **arguments):
    call = {"type": "function", "function": {"name": name, "arguments": arguments or {"city": "Paris"}}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def TOOL(c, **extra):
    return {"role": "tool", "content": c, **extra}


def trained_runs(tok, enc: EncodedRow) -> list[str]:
    """Decoded maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for label in [*enc.labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            current.append(label)
    return runs


def context_text(tok, enc: EncodedRow) -> str:
    return tok.decode([i for i, lbl in zip(enc.input_ids, enc.labels) if lbl == IGNORE_INDEX])


def assert_one_rendering(tok, enc: EncodedRow, messages, tools=None):
    """input_ids are one rendering of the whole conversation, and labels only copy input_ids."""
    messages = [{**m, "content": m["content"] or ""} for m in messages]  # a tool-call turn may have no content
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert all(lbl in (IGNORE_INDEX, i) for i, lbl in zip(enc.input_ids, enc.labels))


# --------------------------------------------------------------------------------------------------
# Tools, tool calls, list content
# --------------------------------------------------------------------------------------------------


def test_tool_call_turn_is_trained_and_tool_result_is_context(tool_tok):
    messages = [U("Weather in Paris?"), CALL(), TOOL("22 C", tool_call_id="call_1", name="get_weather"), A("22 C.")]
    enc = encode_row({"messages": messages, "tools": [WEATHER_TOOL]}, tool_tok, 512)
    assert_one_rendering(tool_tok, enc, messages, [WEATHER_TOOL])
    assert trained_runs(tool_tok, enc) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "22 C.<|im_end|>",
    ]
    context = context_text(tool_tok, enc)
    assert context.startswith("<|im_start|>system\nTools:\n" + json.dumps(WEATHER_TOOL) + "\n<|im_end|>\n")
    assert "<|im_start|>tool\n22 C<|im_end|>\n<|im_start|>assistant\n" in context


def test_tool_call_with_text_and_string_arguments(tool_tok):
    call = CALL(content="Let me check. ")
    call["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'  # OpenAI's shape: passed as given
    call["tool_calls"][0]["id"] = "call_1"
    enc = encode_row({"messages": [U("Weather?"), call, TOOL("22 C"), A("22 C.")]}, tool_tok, 512)
    assert trained_runs(tool_tok, enc)[0] == (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
        "<|im_end|>"
    )


def test_sharegpt_function_call_and_observation_are_a_tool_loop(tool_tok):
    """LLaMA-Factory's ShareGPT shape: tools as the JSON text of bare function schemas, a function_call turn
    holding the JSON text of {"name", "arguments"}, the result in an observation turn."""
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "22 C"},
            {"from": "gpt", "value": "22 C."},
        ],
        "tools": json.dumps([WEATHER_TOOL["function"]]),
    }
    enc = encode_row(row, tool_tok, 512)
    assert enc.format == "sharegpt"
    assert enc.as_dict() == encode_row(
        {"messages": [U("Weather in Paris?"), CALL(), TOOL("22 C"), A("22 C.")], "tools": [WEATHER_TOOL]}, tool_tok, 512
    ).as_dict()
    assert trained_runs(tool_tok, enc) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "22 C.<|im_end|>",
    ]
    # Several calls in one turn are a JSON list; no tools is "" in LLaMA-Factory's files.
    two = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {}}]'
    row["conversations"][1]["value"] = two
    row["tools"] = ""
    assert trained_runs(tool_tok, encode_row(row, tool_tok, 512))[0].count("<tool_call>") == 2


def test_null_keys_count_as_absent(tool_tok):
    """A file loaded with `datasets` gives every message every key of the file, filled with null."""
    nulls = {"tool_calls": None, "tool_call_id": None, "name": None}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather?", "image": None}], **nulls},
        {**CALL(), "tool_call_id": None, "name": None},
        {**TOOL("22 C"), "tool_calls": None, "name": None},
        {**A("22 C."), **nulls},
    ]
    enc = encode_row({"messages": messages, "tools": None}, tool_tok, 512)
    expected = encode_row({"messages": [U("Weather?"), CALL(), TOOL("22 C"), A("22 C.")]}, tool_tok, 512)
    assert enc.as_dict() == expected.as_dict()


def TEXT(text):
    return {"type": "text", "text": text}


def test_list_content_is_joined_text():
    tok = tiny_tokenizer()
    row = {"messages": [U([TEXT("What is"), TEXT("the capital of France?")]), A([TEXT("Paris.")])]}
    enc = encode_row(row, tok, 512)
    as_strings = encode_row({"messages": [U("What is\nthe capital of France?"), A("Paris.")]}, tok, 512)
    assert enc.as_dict() == as_strings.as_dict()
    assert trained_runs(tok, enc) == ["Paris.<|im_end|>"]


def test_image_part_is_refused_in_one_line():
    row = {"messages": [U([TEXT("What is this?"), {"type": "image"}]), A("A cat.")]}
    with pytest.raises(DataError) as info:
        encode_row(row, tiny_tokenizer(), 512, where="f.jsonl:4")
    assert str(info.value) == (
        "f.jsonl:4: messages[0].content[1].type: 'image' parts are not supported: sstoken trains text-only models, "
        "so content parts must be {'type': 'text', 'text': ...}"
    )


def calls(tool_calls):
    return {"messages": [U("q"), {"role": "assistant", "tool_calls": tool_calls}]}


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"messages": [{**CALL(), "role": "user"}, A("a")]}, "messages[0].tool_calls", "only assistant"),
        ({"messages": [{**U("q"), "tool_call_id": "c1"}, A("a")]}, "messages[0].tool_call_id", "only tool messages"),
        (calls([]), "messages[1].tool_calls", "empty list"),
        (calls([{"name": "f", "arguments": {}}]), "messages[1].tool_calls[0].function", "inside 'function'"),
        (calls([{"function": {"name": " ", "arguments": {}}}]), "messages[1].tool_calls[0].function.name", "empty"),
        (
            calls([{"function": {"name": "f", "arguments": "{x"}}]),
            "messages[1].tool_calls[0].function.arguments",
            "not a JSON object",
        ),
        (calls([{"function": {"name": "f"}}]), "messages[1].tool_calls[0].function.arguments", "missing"),
        (calls([{"type": "retrieval", "function": {}}]), "messages[1].tool_calls[0].type", "only 'function'"),
        ({"messages": [U("q"), A(None)]}, "messages[1].content", "got null"),
        ({"messages": [U(["q"]), A("a")]}, "messages[0].content[0]", "got string"),
        ({"messages": [U([{"type": "text", "txt": "q"}]), A("a")]}, "messages[0].content[0].txt", "'text'"),
        ({"messages": [U("q"), A("a")], "tools": {"a": 1}}, "tools", "must be a list"),
        ({"messages": [U("q"), A("a")], "tools": [{"name": "f"}]}, "tools[0].function", "missing"),
        ({"prompt": "q", "completion": "a", "tools": [WEATHER_TOOL]}, "tools", "only conversations"),
        ({"instruction": "q", "output": "a", "tools": [WEATHER_TOOL]}, "tools", "only conversations"),
    ],
)
def test_malformed_tool_data_names_the_field(tool_tok, row, field, message):
    with pytest.raises(DataError) as info:
        encode_row(row, tool_tok, 512, where="f:1")
    text = str(info.value)
    assert text.startswith(f"f:1: {field}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize(
    "template, row, match",
    [
        (
            CHATML_TEMPLATE,
            {"messages": [U("q"), A("a")], "tools": [WEATHER_TOOL]},
            r"^x:2: tools: the chat template ignores tools",
        ),
        (
            CHATML_TEMPLATE,
            {"messages": [U("q"), CALL(), TOOL("22"), A("a")]},
            r"^x:2: messages\[1\]\.tool_calls\[0\]: the chat template does not render tool calls",
        ),
        (
            (
                "{% for m in messages %}{% if m.role != 'tool' %}{{ '<|im_start|>' + m.role + '\n' + m.content + "
                "'<|im_end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
            ),
            {"messages": [U("q"), A("calling"), TOOL("22 C"), A("a")]},
            r"^x:2: messages\[2\]: the chat template drops 'tool' messages",
        ),
        (None, {"messages": [U("q"), CALL(), TOOL("22"), A("a")]}, r"^x:2: the tokenizer has no chat template"),
        (
            "{% if tools %}{{ raise_exception('tools are not supported') }}{% endif %}" + CHATML_TEMPLATE,
            {"messages": [U("q"), A("a")], "tools": [WEATHER_TOOL]},
            r"^x:2: the chat template cannot render this conversation: .*tools are not supported",
        ),
    ],
)
def test_templates_that_cannot_render_tool_data_are_refused(template, row, match):
    with pytest.raises(DataError, match=match):
        encode_row(row, with_template(template), 512, where="x:2")


# --------------------------------------------------------------------------------------------------
# {% generation %} masks
# --------------------------------------------------------------------------------------------------

GENERATION_ROWS = [
    {"messages": [S("Be brief."), U("What is 2 plus 2?"), A("4"), U("And 3 times 3?"), A("9 equals 3 times 3.")]},
    {"messages": [U("q"), A("Paris."), U("thanks")]},
    {"prompt": [U("What is 2 plus 2?"), A("4"), U("And 3 plus 3?")], "completion": [A("6"), U("ok"), A("bye")]},
    {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
]


@pytest.mark.parametrize("row", GENERATION_ROWS)
def test_generation_mask_agrees_with_prefix_method(row, monkeypatch):
    from sstoken.data import templates

    prefix_tok = tiny_tokenizer()  # the same template without {% generation %} blocks: prefix method
    generation_tok = with_template(GENERATION_CHATML)
    assert generation_tok.apply_chat_template([U("q"), A("a")], tokenize=False) == prefix_tok.apply_chat_template(
        [U("q"), A("a")], tokenize=False
    )
    expected = encode_row(row, prefix_tok, 512)

    def no_prefix_method(*args, **kwargs):
        raise AssertionError("a template with {% generation %} blocks must not use the prefix method")

    monkeypatch.setattr(templates, "_prefix_spans", no_prefix_method)
    enc = encode_row(row, generation_tok, 512)
    assert enc.as_dict() == expected.as_dict()
    if "completion" in row:
        assert trained_runs(generation_tok, enc) == ["6<|im_end|>", "bye<|im_end|>"]  # "4" is prompt


def test_generation_mask_that_marks_nothing_is_refused():
    tok = with_template(GENERATION_CHATML.replace("message['role'] == 'assistant'", "message['role'] == 'bot'"))
    with pytest.raises(DataError, match="generation %} blocks but they mark no text"):
        encode_row({"messages": [U("q"), A("a")]}, tok, 512)


# --------------------------------------------------------------------------------------------------
# Qwen3-style templates: reasoning dropped from earlier turns, an empty <think> block in the last one
# --------------------------------------------------------------------------------------------------


def test_qwen3_single_turn_does_not_train_the_empty_think_block(qwen_tok):
    messages = [S("Be brief."), U("What is the capital of France?"), A("Paris.")]
    enc = encode_row({"messages": messages}, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, messages)
    assert trained_runs(qwen_tok, enc) == ["Paris.<|im_end|>"]
    assert context_text(qwen_tok, enc).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n\n")


def test_qwen3_multi_turn_trains_exactly_the_assistant_contents(qwen_tok):
    messages = [U("What is 2 plus 2?"), A("<think>Two and two.</think>4"), U("And 3 times 3?"), A("9")]
    enc = encode_row({"messages": messages}, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, messages)
    assert trained_runs(qwen_tok, enc) == ["4<|im_end|>", "9<|im_end|>"]
    assert "Two and two" not in qwen_tok.decode(enc.input_ids)  # the template drops earlier reasoning
    assert context_text(qwen_tok, enc) == (
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd 3 times 3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n\n"
    )


def test_qwen3_reasoning_in_the_data_is_trained(qwen_tok):
    messages = [U("q"), A("a1"), U("And 3 times 3?"), A("<think>3 threes.</think>9")]
    enc = encode_row({"messages": messages}, qwen_tok, 512)
    assert trained_runs(qwen_tok, enc) == ["a1<|im_end|>", "<think>\n3 threes.\n</think>\n\n9<|im_end|>"]


def test_qwen3_tool_loop(qwen_tok):
    messages = [U("Weather in Paris?"), CALL(), TOOL("22 C"), A("It is 22 C.")]
    enc = encode_row({"messages": messages, "tools": [WEATHER_TOOL]}, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, messages, [WEATHER_TOOL])
    assert trained_runs(qwen_tok, enc) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 22 C.<|im_end|>",
    ]
    assert "<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>\n" in context_text(qwen_tok, enc)


def test_qwen3_conversational_prompt_completion(qwen_tok):
    row = {"prompt": [U("What is 2 plus 2?"), A("4"), U("And 3 times 3?")], "completion": [A("9")]}
    enc = encode_row(row, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, row["prompt"] + row["completion"])
    assert trained_runs(qwen_tok, enc) == ["9<|im_end|>"]


def test_qwen3_long_chat_stays_linear_and_truncates_like_a_short_one(qwen_tok, rendered_messages):
    long_row = {"messages": [m for i in range(2000) for m in (U(f"question {i}?"), A(f"answer {i}."))]}
    enc = encode_row(long_row, qwen_tok, 128)
    assert rendered_messages["messages"] < 2 * len(long_row["messages"])
    assert enc.truncated and trained_runs(qwen_tok, enc)[:2] == ["answer 0.<|im_end|>", "answer 1.<|im_end|>"]


def R(content, reasoning, **extra):
    """An assistant message with its reasoning in reasoning_content (Qwen3 / vLLM reasoning parsers)."""
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, **extra}


def T(content, thinking):
    """An assistant message with its reasoning in thinking (gpt-oss's template reads that key)."""
    return {"role": "assistant", "content": content, "thinking": thinking}


def test_qwen3_reasoning_content_is_trained_where_the_template_renders_it(qwen_tok):
    messages = [U("What is 2 plus 2?"), R("4", "Two and two."), U("And 3 times 3?"), R("9", "Three threes.")]
    enc = encode_row({"messages": messages}, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, messages)
    # The last turn shows its reasoning and trains it; the earlier one is rendered (and trained) without it.
    assert trained_runs(qwen_tok, enc) == ["4<|im_end|>", "<think>\nThree threes.\n</think>\n\n9<|im_end|>"]
    assert "Two and two" not in qwen_tok.decode(enc.input_ids)
    # reasoning_content and a <think> block in the content are the same data to this template
    inline = [U("What is 2 plus 2?"), A("<think>Two and two.</think>4"), U("And 3 times 3?"),
              A("<think>Three threes.</think>9")]
    assert enc.as_dict() == encode_row({"messages": inline}, qwen_tok, 512).as_dict()


def test_reasoning_under_any_name_reaches_the_template_that_reads_another():
    """transformers' names for reasoning: a Qwen3 template trains `thinking` data, gpt-oss's `reasoning_content`."""
    for template, key in ((QWEN3_LIKE, "thinking"), (HARMONY_LIKE, "reasoning_content"), (HARMONY_LIKE, "reasoning")):
        tok = with_template(template)
        by_name = encode_row({"messages": [U("q"), {**A("Paris."), key: "Capital."}]}, tok, 512)
        native = {QWEN3_LIKE: R, HARMONY_LIKE: T}[template]
        assert by_name.as_dict() == encode_row({"messages": [U("q"), native("Paris.", "Capital.")]}, tok, 512).as_dict()
        assert "Capital." in trained_runs(tok, by_name)[0]


def test_qwen3_reasoning_content_of_a_tool_call_turn_is_trained(qwen_tok):
    messages = [U("Weather in Paris?"), {**CALL(), "reasoning_content": "I need the weather."}, TOOL("22 C"),
                A("It is 22 C.")]
    enc = encode_row({"messages": messages, "tools": [WEATHER_TOOL]}, qwen_tok, 512)
    assert_one_rendering(qwen_tok, enc, messages, [WEATHER_TOOL])
    assert trained_runs(qwen_tok, enc) == [
        (
            '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>'
        ),
        "It is 22 C.<|im_end|>",
    ]


def test_qwen3_blank_reasoning_content_is_context(qwen_tok):
    enc = encode_row({"messages": [U("q"), R("Paris.", "")]}, qwen_tok, 512)
    assert trained_runs(qwen_tok, enc) == ["Paris.<|im_end|>"]
    assert context_text(qwen_tok, enc).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n\n")


def test_reasoning_content_in_the_prompt_is_context(qwen_tok):
    row = {"prompt": [U("q"), R("a1", "Thinking about q.")], "completion": [R("a2", "Still thinking.")]}
    enc = encode_row(row, qwen_tok, 512)
    # No user message after a1: both turns keep their reasoning, and the prompt's turn is context.
    assert "<think>\nThinking about q.\n</think>\n\na1<|im_end|>" in context_text(qwen_tok, enc)
    assert trained_runs(qwen_tok, enc) == ["<think>\nStill thinking.\n</think>\n\na2<|im_end|>"]


@pytest.mark.parametrize(
    "template, row, field, message",
    [
        (CHATML_TEMPLATE, {"messages": [U("q"), R("a", "why")]}, "messages[1]",
         "the chat template does not render the message's reasoning"),
        (None, {"messages": [U("q"), R("a", "why")]}, "messages[1]",
         "the chat template does not render the message's reasoning"),
        (QWEN3_LIKE, {"messages": [{**U("q"), "reasoning_content": "why"}, A("a")]}, "messages[0].reasoning_content",
         "only assistant messages reason"),
        (QWEN3_LIKE, {"messages": [U("q"), R("a", ["why"])]}, "messages[1].reasoning_content",
         "must be a string, got array"),
        (QWEN3_LIKE, {"messages": [U("q"), {**R("a", "why"), "thinking": "how"}]}, "messages[1].thinking",
         "differs from reasoning_content"),
        (HARMONY_LIKE, {"messages": [U("q"), T("a", ""), {**U("q"), "thinking": "why"}, A("b")]},
         "messages[2].thinking", "only assistant messages reason"),
    ],
)
def test_unusable_reasoning_content_is_refused(template, row, field, message):
    with pytest.raises(DataError) as info:
        encode_row(row, with_template(template), 512, where="f:1")
    text = str(info.value)
    assert text.startswith(f"f:1: {field}: ") and message in text and "\n" not in text, text


def test_template_that_changes_a_turn_beyond_its_head_is_refused():
    # The end-of-turn token of a turn depends on whether it is the last one: no tail of the turn as
    # generated appears in the full rendering, so it cannot be located.
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
        "{{ '<|endoftext|>' if m.role == 'assistant' and not loop.last else '<|im_end|>' }}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(
        DataError, match=r"^f:1: messages\[1\]: the chat template renders this assistant turn differently"
    ):
        encode_row({"messages": [U("q"), A("a"), U("q2"), A("b")]}, with_template(template), 512, where="f:1")


def test_tool_results_written_as_json_are_accepted():
    # Llama 3.1's template writes tool results with tojson (a string is iterable in Jinja).
    template = TOOL_CHATML.replace(
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}",
        "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] | tojson) + '<|im_end|>\n' }}",
    )
    assert template != TOOL_CHATML
    tok = with_template(template)
    messages = [U("Weather?"), CALL(), TOOL('{"temperature": "22 C"}\n'), A("22 C.")]
    enc = encode_row({"messages": messages}, tok, 512)
    assert '<|im_start|>tool\n"{\\"temperature\\": \\"22 C\\"}\\n"<|im_end|>' in context_text(tok, enc)


@pytest.mark.parametrize(
    "messages",
    [
        [U("What is 2 plus 2?"), A("<think>Two and two.</think>4"), U("And 3 times 3?"), A("9")],
        [U("Weather in Paris?"), CALL(), TOOL("22 C"), A("It is 22 C.")],
        [U("q"), A("a1"), U("And 3 times 3?"), A("<think>3 threes.</think>9")],
        [U("What is 2 plus 2?"), R("4", "Two and two."), U("And 3 times 3?"), R("9", "Three threes.")],
    ],
)
def test_qwen3_generation_mask_agrees_with_the_rendering_cut_after_each_turn(messages, qwen_tok):
    """TRL-style Qwen3 training templates mark the whole assistant output (reasoning block included) with
    {% generation %}; the empty block is context there too, and both ways train the same tokens."""
    start = "{{ '<|im_start|>assistant\n' }}"
    end = "{{ '<|im_end|>\n' }}{% elif message.role == 'tool' %}"
    template = QWEN3_LIKE.replace(start, start + "{% generation %}", 1).replace(
        end, "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% elif message.role == 'tool' %}", 1
    )
    assert template.count("generation %}") == 2
    generation_tok = with_template(template)
    row = {"messages": messages, "tools": [WEATHER_TOOL]}
    enc = encode_row(row, generation_tok, 512)
    assert enc.as_dict() == encode_row(row, qwen_tok, 512).as_dict()
    assert not any(run.startswith("<think>\n\n</think>") for run in trained_runs(generation_tok, enc))


# --------------------------------------------------------------------------------------------------
# Templates that rewrite earlier turns beyond their head: gpt-oss (harmony), Mistral's tools placement
# --------------------------------------------------------------------------------------------------


def test_harmony_single_turn_trains_analysis_and_final_channels():
    tok = with_template(HARMONY_LIKE)
    messages = [U("What is 2 plus 2?"), T("4", "Two and two.")]
    enc = encode_row({"messages": messages}, tok, 512)
    assert_one_rendering(tok, enc, messages)
    assert trained_runs(tok, enc) == [
        "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    ]
    assert context_text(tok, enc) == "<|start|>user<|message|>What is 2 plus 2?<|end|><|start|>assistant"


def test_harmony_multi_turn_is_refused_with_the_fix_and_the_fix_works():
    tok = with_template(HARMONY_LIKE)
    messages = [U("What is 2 plus 2?"), T("4", "Two and two."), U("And 3 times 3?"), T("9", "Three threes.")]
    # An earlier turn ends with <|end|> where the model, generating it, writes <|return|>: the full rendering
    # shows no tail of the turn as generated, so there is no sound span to train.
    with pytest.raises(DataError) as info:
        encode_row({"messages": messages}, tok, 512, where="f:1")
    assert str(info.value).startswith("f:1: messages[1]: the chat template renders this assistant turn differently")
    assert "put the earlier turns in a conversational prompt (prompt/completion)" in str(info.value)
    enc = encode_row({"prompt": messages[:3], "completion": messages[3:]}, tok, 512)
    assert_one_rendering(tok, enc, messages)
    assert trained_runs(tok, enc) == [
        "<|channel|>analysis<|message|>Three threes.<|end|><|start|>assistant<|channel|>final<|message|>9<|return|>"
    ]
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|>" in context_text(tok, enc)


def test_mistral_tools_before_the_last_user_message():
    tok = with_template(MISTRAL_LIKE)
    tools = [WEATHER_TOOL]
    single = [U("Weather in Paris?"), CALL(), TOOL("22 C"), A("It is 22 C.")]
    enc = encode_row({"messages": single, "tools": tools}, tok, 512)
    assert_one_rendering(tok, enc, single, tools)
    assert trained_runs(tok, enc) == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>', "It is 22 C.</s>"
    ]
    # No generation prompt, and a first turn without content: a probe turn shows that the content comes first.
    enc = encode_row({"messages": single[:3], "tools": tools}, tok, 512)
    assert trained_runs(tok, enc) == ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>']
    headed = TOOL_CHATML.replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}", "")
    assert headed != TOOL_CHATML
    with pytest.raises(DataError, match="renders no generation prompt .* writes something of its own"):
        encode_row({"messages": single[:3], "tools": tools}, with_template(headed), 512)
    # A second user message moves the tools list after the first exchange: the context of the first turns is
    # not what the model saw when it generated them (documented limit), and the fix is the conversational prompt.
    multi = [U("Hi"), A("Hello."), *single]
    not_prefix_stable = r"^f:1: messages\[1\]: the chat template is not prefix-stable .*prompt/completion"
    with pytest.raises(DataError, match=not_prefix_stable):
        encode_row({"messages": multi, "tools": tools}, tok, 512, where="f:1")
    enc = encode_row({"prompt": multi[:3], "completion": multi[3:], "tools": tools}, tok, 512)
    assert trained_runs(tok, enc) == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>', "It is 22 C.</s>"
    ]
    assert context_text(tok, enc).startswith("[INST]Hi[/INST]Hello.</s>[AVAILABLE_TOOLS]")


def test_reasoning_before_the_content_under_a_template_without_generation_prompt():
    """Magistral-style: no generation prompt, and the model writes [THINK]…[/THINK] before its answer. What the
    model writes first is not the template's header, so the turn is located and the reasoning trained."""
    magistral = MISTRAL_LIKE.replace(
        "{% elif message.role == 'assistant' %}{{ message.content }}",
        "{% elif message.role == 'assistant' %}{% if message.reasoning_content %}"
        "{{ '[THINK]' + message.reasoning_content + '[/THINK]' }}{% endif %}{{ message.content }}")
    assert magistral != MISTRAL_LIKE
    tok = with_template(magistral)
    enc = encode_row({"messages": [U("2 plus 2?"), {"role": "assistant", "content": "4",
                                                    "reasoning_content": "Two and two."}]}, tok, 512)
    assert trained_runs(tok, enc) == ["[THINK]Two and two.[/THINK]4</s>"]

"""Prompt rendering, checkpoint hints, and generated text -> client text."""

from __future__ import annotations

import json

import pytest

from proxy.chat import ChatTokenizer, boundary_hints, normalize_messages
from proxy.errors import InvalidRequest
from proxy.text_output import find_stop, held_back

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you?"},
]


# ----------------------------------------------------------------- pure logic


def test_boundary_hints_keep_true_prefixes_only():
    prompt = list(range(20))
    renders = {1: [0, 1, 2], 2: [0, 1, 2, 3, 4, 5], 3: [0, 1, 9], 4: list(range(20))}
    hints = boundary_hints(prompt, renders.get, n_messages=4)
    # k=3 diverges from the prompt; k=4 is the whole prompt (not a useful hint).
    assert hints == [3, 6]


def test_boundary_hints_skip_failed_renders_and_limit_to_last_boundaries():
    prompt = list(range(100))
    calls = []

    def render(k):
        calls.append(k)
        return None if k == 9 else prompt[: k * 5]

    hints = boundary_hints(prompt, render, n_messages=10, max_hints=3)
    assert calls == [8, 9, 10]
    assert hints == [40, 50]


def test_normalize_messages_copies_and_flattens():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
    ]  # fmt: skip
    out = normalize_messages(messages)
    assert out[0]["content"] == "ab"
    assert out[1]["content"] == ""
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # untouched
    with pytest.raises(InvalidRequest):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content", "thinking"])
def test_past_reasoning_under_any_name_reaches_every_template(key):
    out = normalize_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "why"}])
    assert {k: out[1][k] for k in ("reasoning", "reasoning_content", "thinking")} == dict.fromkeys(
        ("reasoning", "reasoning_content", "thinking"), "why"
    )
    assert "reasoning" not in out[0]


def test_stop_string_search_and_hold_back():
    assert find_stop("abcSTOPd", ["STOP", "cS"]) == 2
    assert find_stop("abc", ["x"]) == -1
    assert held_back("hello ST", ["STOP"]) == 2
    assert held_back("hello S", ["STOP", "Sx"]) == 1
    assert held_back("hello", ["STOP"]) == 0
    assert held_back("xSTO", ["STOP"]) == 3


# ----------------------------------------------------------------- with a tiny model's tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from worker.tiny_models import make_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        template: make_model("qwen3_next", root / template, seed=0, template=template)
        for template in ("chatml-tools", "chatml-drop-reasoning")
    }


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return ChatTokenizer.load(model_dirs["chatml-tools"])


def test_hints_are_message_ends(tokenizer):
    rendered = tokenizer.render_chat(CONVERSATION)
    wrapper = tokenizer.wrapper
    ends = []
    for k in range(1, len(CONVERSATION) + 1):
        prefix = wrapper.apply_chat_template(CONVERSATION[:k], add_generation_prompt=False)
        ends.append(len(prefix))
        assert rendered.tokens[: len(prefix)] == list(prefix)
    # The last message's end is 3 tokens before the prompt end, which the next turn renders as it is
    # ("<|im_start|>assistant\n" + the reply): the prompt end's checkpoint serves, no stop is spent there.
    assert rendered.checkpoint_hints == ends[:-1]
    # Each hint ends on the end-of-message token.
    im_end = wrapper.convert_tokens_to_ids("<|im_end|>")
    newline = rendered.tokens[ends[0] - 1]
    for hint in rendered.checkpoint_hints:
        assert rendered.tokens[hint - 2 : hint] == [im_end, newline]
    assert rendered.initial_state == "normal"


def test_hints_limited_to_the_last_boundaries(tokenizer):
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(21)]
    rendered = tokenizer.render_chat(long_chat, max_hints=8)
    assert len(rendered.checkpoint_hints) == 7  # the last 8 message ends, but the last (see above)
    assert rendered.checkpoint_hints == sorted(rendered.checkpoint_hints)
    assert rendered.checkpoint_hints[-1] < len(rendered.tokens)


def test_reasoning_dropping_template_still_hints_the_last_user_message(model_dirs):
    tok = ChatTokenizer.load(model_dirs["chatml-drop-reasoning"])
    turn1 = [{"role": "user", "content": "what is two plus two?"}]
    first = tok.render_chat(turn1)
    # The model answered with reasoning; the next turn's template drops it.
    turn2 = turn1 + [
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nfour"},
        {"role": "user", "content": "and three?"},
    ]
    second = tok.render_chat(turn2)
    generated = tok.wrapper.encode("<think>\nadd them\n</think>\n\nfour", add_special_tokens=False)
    cached = first.tokens + generated
    common = 0
    while common < min(len(cached), len(second.tokens)) and cached[common] == second.tokens[common]:
        common += 1
    # The generated sequence diverges from the re-rendered turn right after the first prompt's end
    # (its generation prompt is rendered as it was), so that prompt end is the restore point that
    # still matches, and the first user message's end needs no hint.
    assert len(first.tokens) <= common
    assert first.checkpoint_hints == []
    assert second.checkpoint_hints[0] < len(first.tokens)  # the second prompt's earlier ends are hinted


def test_tools_render_and_template_errors(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = tokenizer.render_chat(CONVERSATION, tools=tools)
    plain = tokenizer.render_chat(CONVERSATION)
    assert len(with_tools.tokens) > len(plain.tokens)
    assert "get_weather" in tokenizer.wrapper.decode(with_tools.tokens)


def test_enable_thinking_false_opens_and_closes_a_think_block(tokenizer):
    rendered = tokenizer.render_chat(CONVERSATION, template_kwargs={"enable_thinking": False})
    assert tokenizer.wrapper.decode(rendered.tokens).endswith("<think>\n\n</think>\n\n")
    assert rendered.initial_state == "normal"


def test_completion_prompt_encoding(tokenizer):
    assert tokenizer.encode_text("hello world") == list(tokenizer.wrapper.encode("hello world"))


# ----------------------------------------------------------------- text output


def feed(output, tokens):
    text = []
    for token in tokens:
        delta = output.add(token)
        text.append(delta)
        if output.stopped:
            break
    return text


def joined(deltas, field="content"):
    return "".join(getattr(d, field) for d in deltas)


def test_plain_text_round_trips(tokenizer):
    tokens = tokenizer.wrapper.encode("the quick brown fox", add_special_tokens=False)
    out = tokenizer.text_output()
    deltas = feed(out, tokens) + [out.finish("length")]
    assert joined(deltas) == "the quick brown fox"


def test_eos_is_not_text(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    tokens = tokenizer.wrapper.encode("done", add_special_tokens=False) + [eos]
    out = tokenizer.text_output()
    assert joined(feed(out, tokens) + [out.finish("stop")]) == "done"


def test_stop_string_across_tokens(tokenizer):
    text = "one two END three"
    tokens = tokenizer.wrapper.encode(text, add_special_tokens=False)
    out = tokenizer.text_output(stop=["END"])
    deltas = feed(out, tokens)
    assert out.stopped
    deltas.append(out.finish("stop"))
    assert joined(deltas) == "one two "
    # Nothing after the stop string was consumed.
    assert len(deltas) - 1 <= len(tokens)


def test_stop_prefix_is_released_when_no_stop_follows(tokenizer):
    tokens = tokenizer.wrapper.encode("ab EN", add_special_tokens=False)
    out = tokenizer.text_output(stop=["END"])
    deltas = feed(out, tokens)
    assert not out.stopped
    assert joined(deltas) in ("ab ", "ab", "ab E")  # " EN" may be held back
    assert joined(deltas + [out.finish("length")]) == "ab EN"


def test_tool_call_extraction(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tokens = tokenizer.wrapper.encode(text, add_special_tokens=False)
    out = tokenizer.text_output(tools=tools, parse_tools=True, split_reasoning=True)
    deltas = feed(out, tokens) + [out.finish("stop")]
    calls = [c for d in deltas for c in d.tool_calls]
    assert joined(deltas) == "Let me check."
    assert len(calls) == 1 and out.tool_calls_made == 1
    assert calls[0]["type"] == "function" and calls[0]["index"] == 0
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_tool_call_text_without_tools_stays_content(tokenizer):
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    tokens = tokenizer.wrapper.encode(text, add_special_tokens=False)
    out = tokenizer.text_output(split_reasoning=True)
    deltas = feed(out, tokens) + [out.finish("stop")]
    assert joined(deltas) == text
    assert not any(d.tool_calls for d in deltas)


def test_unparseable_tool_call_is_returned_as_text(tokenizer):
    tools = [{"type": "function", "function": {"name": "f"}}]
    text = "<tool_call>\nnot json\n</tool_call>"
    tokens = tokenizer.wrapper.encode(text, add_special_tokens=False)
    out = tokenizer.text_output(tools=tools, parse_tools=True, split_reasoning=True)
    deltas = feed(out, tokens) + [out.finish("stop")]
    assert joined(deltas) == text


def test_reasoning_is_split_from_content(tokenizer):
    text = "<think>\nponder\n</think>\n\nanswer"
    tokens = tokenizer.wrapper.encode(text, add_special_tokens=False)
    out = tokenizer.text_output(split_reasoning=True)
    deltas = feed(out, tokens) + [out.finish("stop")]
    assert joined(deltas, "reasoning").strip() == "ponder"
    assert joined(deltas).strip() == "answer"

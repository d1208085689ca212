"""GPT-OSS's harmony format through the whole service, with the openai and anthropic clients, streamed and not.

The model is the tiny gpt_oss one with the harmony template and tokenizer,
taught (`tests.harmony_fixtures.teach_replies`) to answer a weather conversation
in harmony: first reasoning, a preamble and a get_weather call, then, after the
tool's result, reasoning and a final answer. The service must return each part
in its own field: reasoning (`reasoning` and `reasoning_content`; `thinking`
blocks), content (`text` blocks) and a structured tool call (`tool_use`).
"""

from __future__ import annotations

import json
from typing import Iterator

import anthropic
import openai
import pytest

from tests.e2e.conftest import Server, running_proxy
from tests.harmony_fixtures import (
    ANSWER,
    ARGUMENTS,
    PREAMBLE,
    QUESTION,
    REASONING_1,
    REASONING_2,
    SYSTEM,
    TOOL_RESULT,
    WEATHER_TOOL,
    first_turn,
    make_taught_model,
    second_turn,
)

pytestmark = pytest.mark.slow

ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


@pytest.fixture(scope="module")
def harmony_proxy(harmony_vocab, tmp_path_factory, log_dir) -> Iterator[Server]:
    model = make_taught_model(tmp_path_factory.mktemp("harmony") / "tiny-gpt-oss")
    with running_proxy(model, log_dir, name="harmony") as server:
        server.model = str(model)  # requests name the model as --model did
        yield server


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def anthropic_client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.root, api_key="x", max_retries=0, timeout=60)


def chat(server: Server, messages: list[dict], **extra):
    return openai_client(server).chat.completions.create(
        model=server.model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=200, **extra
    )


def test_openai_reply_has_reasoning_content_and_a_tool_call(harmony_proxy):
    choice = chat(harmony_proxy, first_turn()).choices[0]
    message = choice.model_dump()["message"]
    assert message["reasoning"] == message["reasoning_content"] == REASONING_1
    assert message["content"] == PREAMBLE
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == json.loads(ARGUMENTS)
    assert choice.finish_reason == "tool_calls"


def test_openai_stream_has_the_same_fields(harmony_proxy):
    reasoning = reasoning_content = content = ""
    calls, finish = [], None
    for chunk in chat(harmony_proxy, first_turn(), stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.model_dump()
        reasoning += delta.get("reasoning") or ""
        reasoning_content += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
        calls += delta.get("tool_calls") or []
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == reasoning_content == REASONING_1
    assert content == PREAMBLE
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == json.loads(ARGUMENTS)
    assert calls[0]["id"] and calls[0]["index"] == 0
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_final_answer_after_the_tool_result(harmony_proxy, stream):
    if not stream:
        choice = chat(harmony_proxy, second_turn()).choices[0]
        message = choice.model_dump()["message"]
        reasoning, content, calls, finish = message["reasoning"], message["content"], message["tool_calls"], choice.finish_reason
    else:
        reasoning = content = ""
        calls, finish = None, None
        for chunk in chat(harmony_proxy, second_turn(), stream=True):
            delta = chunk.choices[0].delta.model_dump()
            reasoning += delta.get("reasoning") or ""
            content += delta.get("content") or ""
            calls = calls or delta.get("tool_calls")
            finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, calls, finish) == (REASONING_2, ANSWER, None, "stop")


def anthropic_first_turn() -> dict:
    return {"system": SYSTEM, "messages": [{"role": "user", "content": QUESTION}]}


def messages_create(server: Server, body: dict, **extra):
    return anthropic_client(server).messages.create(
        model=server.model, max_tokens=200, tools=[ANTHROPIC_TOOL], extra_body={"temperature": 0}, **body, **extra
    )


def test_anthropic_reply_has_thinking_text_and_tool_use_blocks(harmony_proxy):
    reply = messages_create(harmony_proxy, anthropic_first_turn())
    kinds = [block.type for block in reply.content]
    assert kinds == ["thinking", "text", "tool_use"]
    thinking, text, tool_use = reply.content
    assert thinking.thinking == REASONING_1 and text.text == PREAMBLE
    assert tool_use.name == "get_weather" and tool_use.input == json.loads(ARGUMENTS)
    assert reply.stop_reason == "tool_use"


def test_anthropic_stream_builds_the_same_blocks(harmony_proxy):
    with anthropic_client(harmony_proxy).messages.stream(
        model=harmony_proxy.model, max_tokens=200, tools=[ANTHROPIC_TOOL], extra_body={"temperature": 0},
        **anthropic_first_turn(),
    ) as stream:
        reply = stream.get_final_message()
    assert [block.type for block in reply.content] == ["thinking", "text", "tool_use"]
    assert reply.content[0].thinking == REASONING_1 and reply.content[1].text == PREAMBLE
    assert reply.content[2].input == json.loads(ARGUMENTS) and reply.stop_reason == "tool_use"


def test_anthropic_final_answer_after_the_tool_result(harmony_proxy):
    first = messages_create(harmony_proxy, anthropic_first_turn())
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[2].id, "content": TOOL_RESULT}]},
    ]
    reply = messages_create(harmony_proxy, {"system": SYSTEM, "messages": history})
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == REASONING_2 and reply.content[1].text == ANSWER
    assert reply.stop_reason == "end_turn"


def test_reasoning_field_keeps_one_field(harmony_proxy, log_dir):
    with running_proxy(harmony_proxy.model, log_dir, "--reasoning-field", "reasoning", name="reasoning-field") as server:
        server.model = harmony_proxy.model
        message = chat(server, first_turn()).choices[0].model_dump()["message"]
        deltas = [c.choices[0].delta.model_dump() for c in chat(server, first_turn(), stream=True) if c.choices]
    assert message["reasoning"] == REASONING_1 and message.get("reasoning_content") is None
    assert "".join(d.get("reasoning") or "" for d in deltas) == REASONING_1
    assert all(d.get("reasoning_content") is None for d in deltas)

"""Structured output through the clients people use, on the random-weight tiny model.

The tiny model writes gibberish, so a reply that parses and validates against its schema shows the
grammar at work: openai's `.parse()` with a pydantic model, `json_object`, `json_schema` strict,
LangChain's `with_structured_output`, openai-agents' `output_type`, the anthropic SDK's JSON output
and a forced tool call, streamed and not. Schemas keep strings short (maxLength, enums) so that the
JSON closes well within max_tokens. A grammar changes nothing the pool stores: the same prompt
reports the same cached tokens with or without one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MAX_TOKENS = 400


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    mood: Literal["happy", "sad", "calm"]


PERSON_SCHEMA = {**Person.model_json_schema(), "additionalProperties": False}


class Pet(BaseModel):
    """For the anthropic SDK, whose `output_format` drops maxLength and bounds from the schema it sends."""

    kind: Literal["cat", "dog", "owl"]
    legs: Literal[2, 4]
    friendly: bool

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 6}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def messages(topic: str) -> list[dict]:
    return [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": f"Tell me about {topic}."}]


@pytest.fixture(scope="module")
def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.mark.parametrize("topic", ["a person", "a sailor", "the moon"])
def test_openai_parse_with_a_pydantic_model(client, model, topic):
    completion = client.chat.completions.parse(
        model=model, messages=messages(topic), response_format=Person, max_tokens=MAX_TOKENS
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_strict_streamed_and_not(client, model, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    text, finish = _chat(client, model, messages("a cook"), stream, response_format=fmt)
    assert finish == "stop"
    Person.model_validate_json(text)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_is_one_json_object(client, model, stream):
    # Any object: nothing bounds its strings, so a prompt whose greedy reply closes within max_tokens
    # (others run to finish_reason "length", an honest cut the client's parse then refuses).
    prompt = [{"role": "user", "content": "Describe a person."}]
    text, finish = _chat(client, model, prompt, stream, response_format={"type": "json_object"})
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


def test_langchain_with_structured_output(proxy, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=proxy.base_url, api_key="unused", model=model, max_tokens=MAX_TOKENS, temperature=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Tell me about a baker.")
    assert isinstance(person, Person)


def test_openai_agents_output_type(proxy, model):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from agents.model_settings import ModelSettings

    set_tracing_disabled(True)
    async_client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    agent = Agent(
        name="describer",
        instructions="Describe a person.",
        model=OpenAIChatCompletionsModel(model=model, openai_client=async_client),
        model_settings=ModelSettings(max_tokens=MAX_TOKENS, temperature=0),
        output_type=Person,
    )
    result = asyncio.run(Runner.run(agent, "Tell me about a painter."))
    assert isinstance(result.final_output, Person)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_json_output(proxy, model, stream):
    client = anthropic.Anthropic(base_url=proxy.root, api_key="unused", max_retries=0)
    kwargs = dict(model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "Tell me about a pilot."}])
    if stream:
        fmt = {"format": {"type": "json_schema", "schema": PERSON_SCHEMA}}
        with client.messages.stream(output_config=fmt, **kwargs) as events:
            message = events.get_final_message()
        text = "".join(block.text for block in message.content if block.type == "text")
        Person.model_validate_json(text)
    else:
        message = client.messages.parse(output_format=Pet, **kwargs)
        assert isinstance(message.parsed_output, Pet)
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_forces_a_call_with_valid_arguments(client, model, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    calls, finish = _tool_calls(client, model, stream, tools=[TIME, WEATHER], tool_choice=choice)
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather"
    arguments = json.loads(calls[0]["arguments"])
    assert arguments["city"] in ("Paris", "Rome", "Oslo") and 1 <= arguments["days"] <= 7


def test_required_tool_choice_forces_a_call_of_one_of_the_tools(client, model):
    calls, finish = _tool_calls(client, model, False, tools=[TIME, WEATHER], tool_choice="required")
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] in ("get_time", "get_weather")
    json.loads(calls[0]["arguments"])


def test_anthropic_tool_choice_tool_forces_a_tool_use(proxy, model):
    client = anthropic.Anthropic(base_url=proxy.root, api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    message = client.messages.create(
        model=model, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "Weather?"}],
        tools=[tool], tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Rome", "Oslo")


def test_a_grammar_leaves_the_cache_as_it_is(client, model):
    """The same prompt restores the same tokens whether or not the request before or now had a grammar."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    prompt = messages("a gardener who keeps bees on the roof of an old library")

    def cached(**extra) -> int:
        reply = client.chat.completions.create(model=model, messages=prompt, max_tokens=8, **extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    cached()  # stores the prompt
    plain, constrained, plain_again = cached(), cached(response_format=fmt), cached()
    assert plain > 0 and plain == constrained == plain_again


def test_a_schema_llguidance_cannot_compile_is_a_400_naming_the_feature(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "unevaluatedProperties": False}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages("x"), response_format=fmt, max_tokens=8)
    assert "unevaluatedProperties" in info.value.message


# ----------------------------------------------------------------- helpers


def _chat(client, model, prompt, stream: bool, **extra) -> tuple[str, str]:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS, **extra)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS, stream=True, **extra):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def _tool_calls(client, model, stream: bool, **extra) -> tuple[list[dict], str]:
    prompt = messages("the weather")
    if not stream:
        reply = client.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS, **extra)
        calls = reply.choices[0].message.tool_calls or []
        return [{"name": c.function.name, "arguments": c.function.arguments} for c in calls], reply.choices[0].finish_reason
    calls, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS, stream=True, **extra):
        if chunk.choices:
            for call in chunk.choices[0].delta.tool_calls or []:
                calls.append({"name": call.function.name, "arguments": call.function.arguments})
            finish = chunk.choices[0].finish_reason or finish
    return calls, finish

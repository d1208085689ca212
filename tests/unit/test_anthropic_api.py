"""The Messages API: request conversion to the chat form, reply building, error shapes."""

from __future__ import annotations

import json

import pytest

from proxy import anthropic_api as anthropic
from proxy.chat import ChatTokenizer
from proxy.errors import ContextLengthExceeded, InternalError, InvalidRequest, ModelNotFound, QueueFull, WorkerUnavailable
from proxy.anthropic_routes import AnthropicResponder
from proxy.generation import Finished, KeepAlive, Output, Prefill
from proxy.openai_api import ResponseIdentity
from proxy.responders import ChatFormat, Collected
from proxy.text_output import OutputDelta

USER = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "I should call the tool.", "signature": ""},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"},
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
]


def messages_request(**fields):
    return anthropic.parse_messages_request({"max_tokens": 16, "messages": USER, **fields})


def bad_param(**fields) -> str:
    with pytest.raises(InvalidRequest) as info:
        messages_request(**fields)
    assert info.value.status == 400
    return info.value.param


# ----------------------------------------------------------------- requests


def test_defaults_and_sampling():
    req = messages_request()
    assert req.messages == USER
    assert req.options.max_tokens == 16
    assert req.options.temperature == 1.0  # Anthropic's default
    assert (req.options.top_p, req.options.top_k, req.options.stop) == (1.0, 0, ())
    assert not req.options.stream and req.tools is None and not req.parse_tools
    assert req.template_kwargs == {}
    req = messages_request(temperature=0, top_p=0.9, top_k=5, stop_sequences=["END", ""], stream=True,
                           metadata={"user_id": "u"}, model="m")  # fmt: skip
    assert (req.options.temperature, req.options.top_p, req.options.top_k) == (0.0, 0.9, 5)
    assert req.options.stop == ("END",) and req.options.stream and req.model == "m"


def test_max_tokens_is_required_but_not_for_counting():
    with pytest.raises(InvalidRequest) as info:
        anthropic.parse_messages_request({"messages": USER})
    assert info.value.param == "max_tokens"
    assert anthropic.parse_count_tokens_request({"messages": USER}).messages == USER


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"stream": "yes"}, "stream"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"metadata": "x"}, "metadata"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
        ({"messages": USER + [{"role": "assistant", "content": "Sure"}]}, "messages"),  # prefill
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tool_choice": {"type": "required"}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"system": [{"type": "image"}]}, "system[0]"),
    ],
)
def test_invalid_requests_name_the_field(fields, param):
    assert bad_param(**fields) == param


def test_system_and_text_blocks():
    req = messages_request(
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in French."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )  # fmt: skip
    assert req.messages == [
        {"role": "system", "content": "You are terse.\nAnswer in French."},
        {"role": "user", "content": "a\nb"},
    ]
    assert messages_request(system="sys").messages[0] == {"role": "system", "content": "sys"}
    assert messages_request(system="").messages == USER


def test_tool_use_round_trip_becomes_tool_calls_and_tool_messages():
    req = messages_request(messages=ROUND_TRIP, tools=[WEATHER_TOOL])
    assert req.messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 21 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert req.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert req.parse_tools


def test_tool_results_with_blocks_and_redacted_thinking():
    req = messages_request(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "a", "name": "f", "input": {}},
                {"type": "tool_use", "id": "b", "name": "f", "input": {"x": 1}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "one"},
                                                                         {"type": "text", "text": "two"}]},
                {"type": "tool_result", "tool_use_id": "b", "is_error": True},
            ]},
        ]
    )  # fmt: skip
    assistant, first, second = req.messages[1:]
    assert assistant["content"] == "" and "reasoning_content" not in assistant
    assert [c["id"] for c in assistant["tool_calls"]] == ["a", "b"]
    assert first == {"role": "tool", "tool_call_id": "a", "content": "one\ntwo"}
    assert second == {"role": "tool", "tool_call_id": "b", "content": ""}


def test_tool_choice_and_thinking_mapping():
    assert messages_request(tools=[WEATHER_TOOL], tool_choice={"type": "any"}).parse_tools
    named = messages_request(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    assert named.parse_tools and named.tools
    none = messages_request(tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert none.tools is None and not none.parse_tools
    assert messages_request(thinking={"type": "disabled"}).template_kwargs == {"enable_thinking": False}
    assert messages_request(thinking={"type": "enabled", "budget_tokens": 2048}).template_kwargs == {
        "enable_thinking": True
    }


def test_anthropic_paths():
    for path in ("/v1/messages", "/messages", "/v1/messages/count_tokens", "/v1/messages/nope"):
        assert anthropic.is_anthropic_path(path)
    for path in ("/v1/chat/completions", "/v1/messagesx", "/v1/models", "/health"):
        assert not anthropic.is_anthropic_path(path)


# ----------------------------------------------------------------- rendering, with a tiny model's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from worker.tiny_models import make_model

    return ChatTokenizer.load(make_model("qwen3_next", tmp_path_factory.mktemp("tiny") / "m", template="chatml-tools"))


def test_round_trip_renders_the_tool_call_and_its_response(tokenizer):
    req = messages_request(system="Be brief.", messages=ROUND_TRIP, tools=[WEATHER_TOOL])
    rendered = tokenizer.render_chat(req.messages, tools=req.tools, template_kwargs=req.template_kwargs)
    text = tokenizer.wrapper.decode(rendered.tokens)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in text
    assert "<think>\nI should call the tool.\n</think>\n\nLet me check.\n<tool_call>\n" in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")
    # Every message end is a checkpoint hint, as for chat completions, but the last: the prompt
    # end, 3 tokens on, serves the next turn.
    assert len(rendered.checkpoint_hints) == len(req.messages) - 1


def test_stop_string_that_ended_the_text_is_known(tokenizer):
    tokens = tokenizer.wrapper.encode("one two END three", add_special_tokens=False)
    out = tokenizer.text_output(stop=["three", "END"])
    for token in tokens:
        out.add(token)
        if out.stopped:
            break
    assert out.stopped and out.stop_string == "END"


# ----------------------------------------------------------------- replies

IDENT = ResponseIdentity("msg-1", "tiny")
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def finished(reason="stop", delta=None, stop=None, cached=40):
    return Finished(delta or OutputDelta(), reason, prompt_tokens=50, completion_tokens=7, cached_tokens=cached, stop_sequence=stop)


def test_stream_events_and_whole_message_agree():
    builder = anthropic.MessageBuilder(IDENT, prompt_tokens=50)
    events = builder.start()
    events += builder.add(OutputDelta(reasoning="hmm"))
    events += builder.add(OutputDelta(reasoning=" ok"))
    events += builder.add(OutputDelta(content="Let me check."))
    events += builder.finish(finished("tool_calls", OutputDelta(tool_calls=[CALL])))
    kinds = [(name, payload.get("index")) for name, payload in events]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]  # fmt: skip
    assert all(name == payload["type"] for name, payload in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 50, "output_tokens": 0, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0}  # fmt: skip
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[2][1]["delta"] == {"type": "thinking_delta", "thinking": "hmm"}
    assert events[6][1]["delta"] == {"type": "text_delta", "text": "Let me check."}
    assert events[8][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert json.loads(events[9][1]["delta"]["partial_json"]) == {"city": "Paris"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 10, "output_tokens": 7, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 40}  # fmt: skip

    message = builder.message(finished("tool_calls"))
    assert message["content"] == [
        {"type": "thinking", "thinking": "hmm ok", "signature": ""},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert (message["id"], message["type"], message["role"], message["model"]) == ("msg-1", "message", "assistant", "tiny")
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None


def test_blocks_follow_the_order_of_the_output():
    builder = anthropic.MessageBuilder(IDENT, prompt_tokens=5)
    builder.add(OutputDelta(content="a"))
    builder.add(OutputDelta(reasoning="b"))
    builder.finish(finished(delta=OutputDelta(content="c")))
    assert [b["type"] for b in builder.message(finished())["content"]] == ["text", "thinking", "text"]


def test_empty_reply_has_no_blocks():
    builder = anthropic.MessageBuilder(IDENT, prompt_tokens=5)
    events = builder.start() + builder.finish(finished())
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert builder.message(finished())["content"] == []


@pytest.mark.parametrize(
    "reason, stop, expected",
    [
        ("stop", None, ("end_turn", None)),
        ("stop", "END", ("stop_sequence", "END")),
        ("length", None, ("max_tokens", None)),
        ("tool_calls", None, ("tool_use", None)),
    ],
)
def test_stop_reasons(reason, stop, expected):
    assert anthropic.stop_reason(finished(reason, stop=stop)) == expected


def test_usage_without_cache_facts():
    assert anthropic.usage(12, 3, None) == {"input_tokens": 12, "output_tokens": 3, "cache_creation_input_tokens": 0,
                                            "cache_read_input_tokens": 0}  # fmt: skip


def test_tool_use_input_is_always_an_object():
    def call(arguments):
        return {"id": "c", "function": {"name": "f", "arguments": arguments}}

    assert anthropic.tool_use_block(call(""))["input"] == {}
    assert anthropic.tool_use_block(call({"a": 1}))["input"] == {"a": 1}
    assert anthropic.tool_use_block(call("[1, 2]"))["input"] == {"arguments": [1, 2]}
    assert anthropic.tool_use_block(call("not json"))["input"] == {"arguments": "not json"}


def test_chat_completions_return_reasoning_in_both_fields_by_default():
    fmt = ChatFormat()
    chunk = fmt.chunk(IDENT, OutputDelta(reasoning="think"), [])
    assert chunk["choices"][0]["delta"] == {"reasoning": "think", "reasoning_content": "think"}
    body = fmt.whole(IDENT, Collected(OutputDelta(content="hi", reasoning="think")), finished())
    message = body["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "think" and message["content"] == "hi"


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_field_picks_one(field):
    fmt = ChatFormat(field)
    assert fmt.chunk(IDENT, OutputDelta(reasoning="think"), [])["choices"][0]["delta"] == {field: "think"}
    message = fmt.whole(IDENT, Collected(OutputDelta(content="hi", reasoning="think")), finished())["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "hi", field: "think"}
    assert "reasoning" not in fmt.chunk(IDENT, OutputDelta(content="x"), [])["choices"][0]["delta"]


class FakeStream:
    def __init__(self):
        self.events, self.ended = [], False

    async def event(self, name, payload):
        assert not self.ended
        self.events.append((name, payload))

    async def end(self):
        self.ended = True


class FakeGeneration:
    def __init__(self, *events):
        self._events = events
        self.job = type("Job", (), {"prompt_tokens": [1] * 50})()

    async def events(self):
        for event in self._events:
            if isinstance(event, Exception):
                raise event
            yield event


async def test_streamed_reply_pings_while_waiting_and_ends_with_message_stop():
    stream = FakeStream()
    generation = FakeGeneration(KeepAlive(1), Prefill(512, 600), Output(OutputDelta(content="hi")), finished())
    await AnthropicResponder().stream(stream, generation, IDENT)
    names = [name for name, _ in stream.events]
    assert names == ["message_start", "ping", "ping", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert stream.ended


async def test_error_mid_stream_is_an_anthropic_error_event():
    stream = FakeStream()
    error = WorkerUnavailable("the worker died", retry_after=5)
    generation = FakeGeneration(Output(OutputDelta(content="hi")), error)
    with pytest.raises(WorkerUnavailable):
        await AnthropicResponder().stream(stream, generation, IDENT)
    assert stream.events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "the worker died"}})
    assert stream.ended


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "error, status, kind",
    [
        (InvalidRequest("bad"), 400, "invalid_request_error"),
        (ContextLengthExceeded("long"), 400, "invalid_request_error"),
        (ModelNotFound("nope"), 404, "not_found_error"),
        (QueueFull("full", retry_after=1), 529, "overloaded_error"),
        (WorkerUnavailable("down", retry_after=5), 503, "api_error"),
        (InternalError("bug"), 500, "api_error"),
    ],
)
def test_error_shapes(error, status, kind):
    assert anthropic.error_status(error) == status
    assert anthropic.error_body(error) == {"type": "error", "error": {"type": kind, "message": error.message}}
    response = anthropic.error_response(error)
    assert response.status == status and json.loads(response.text)["error"]["type"] == kind
    if error.retry_after is not None:
        assert response.headers["Retry-After"] == str(error.retry_after)


def test_tool_choice_any_without_tools_is_a_400():
    import pytest

    from proxy.anthropic_api import tool_choice
    from proxy.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="any needs tools"):
        tool_choice({"type": "any"}, None)


def test_a_schema_whose_x_guidance_is_not_an_object_is_a_400():
    import pytest

    from proxy.errors import InvalidRequest
    from proxy.grammar import _json_rule

    with pytest.raises(InvalidRequest, match="x-guidance"):
        _json_rule({"type": "object", "x-guidance": "bad"})
    assert _json_rule({"type": "object"}).startswith("%json ")


def test_a_call_is_forced_only_for_tools_with_plain_names():
    import pytest

    from proxy.errors import InvalidRequest
    from proxy.grammar import forced_tools

    def tools(*names):
        return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]

    assert forced_tools("required", tools("get_weather", "mcp.server:read-file")).names == (
        "get_weather", "mcp.server:read-file")  # fmt: skip
    with pytest.raises(InvalidRequest, match="forced only"):
        forced_tools("required", tools('a"b\n</tool_call>'))
    assert forced_tools("auto", tools('a"b\n</tool_call>')) is None  # not forced: nothing to split


def test_a_schema_of_false_is_a_400():
    import pytest

    from proxy.errors import InvalidRequest
    from proxy.grammar import openai_response_format

    with pytest.raises(InvalidRequest, match="no value satisfies it"):
        openai_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": False}})
    assert openai_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}) is not None

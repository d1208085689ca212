"""Request parsing and validation: the right 400s, the right typed requests."""

from __future__ import annotations

import json

import pytest

from proxy import openai_api as api
from proxy.config import parse_size
from proxy.errors import ApiError, InvalidJson, InvalidRequest, QueueFull, from_worker_error
from proxy.upstream import forwarded_headers, upstream_url
from protocol.messages import ErrorCode

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return api.parse_chat_request({"messages": USER, **fields}, default_max_tokens=64)


def bad_param(fn, **fields) -> str:
    with pytest.raises(InvalidRequest) as info:
        fn(**fields)
    assert info.value.status == 400
    return info.value.param


# ----------------------------------------------------------------- bodies


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_bad_bodies_are_invalid_json(raw):
    with pytest.raises(InvalidJson) as info:
        api.parse_json_body(raw)
    body = info.value.body()
    assert info.value.status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


def test_model_must_be_a_string():
    assert api.requested_model({"model": "m"}) == "m"
    assert api.requested_model({}) is None
    with pytest.raises(InvalidRequest):
        api.requested_model({"model": 3})


# ----------------------------------------------------------------- chat


def test_defaults():
    req = chat()
    assert req.options.max_tokens == 64
    assert req.options.temperature == 0.0
    assert req.options.stop == ()
    assert req.options.top_logprobs == -1
    assert not req.options.stream and not req.options.include_usage
    assert req.tools is None and not req.parse_tools


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"n": 0}, "n"),
        ({"n": api.MAX_CHOICES + 1}, "n"),
        ({"n": 2.0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"presence_context_size": 0}, "presence_context_size"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"one": 2}}, "logit_bias"),
        ({"logit_bias": {"-1": 2}}, "logit_bias"),
        ({"logit_bias": {"1": "2"}}, "logit_bias"),
        ({"logit_bias": {"1": True}}, "logit_bias"),
        ({"logit_bias": [[1, 2]]}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
    ],
)
def test_invalid_chat_params(fields, param):
    assert bad_param(chat, **fields) == param


def test_messages_required():
    with pytest.raises(InvalidRequest) as info:
        api.parse_chat_request({"model": "x"}, 16)
    assert info.value.param == "messages"


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=10).options.max_tokens == 10
    assert chat(max_completion_tokens=7, max_tokens=10).options.max_tokens == 7


def test_sampling_fields_and_stop():
    req = chat(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=3, repetition_penalty=1.1, stop="END")
    sampling = req.options.sampling([2, 0])
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p) == (0.7, 0.9, 40, 0.05)
    assert sampling.seed == 3 and sampling.repetition_penalty == 1.1
    assert sampling.stop_token_ids == [2, 0]
    assert req.options.stop == ("END",)
    assert chat(stop=["a", "", "b"]).options.stop == ("a", "b")


def test_penalties_logit_bias_and_n():
    req = chat(presence_penalty=0.5, frequency_penalty=-1, frequency_context_size=64, logit_bias={"7": 100, "3": -2.5}, n=3)
    sampling = req.options.sampling([2])
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert (sampling.presence_context_size, sampling.frequency_context_size, sampling.repetition_context_size) == (20, 64, 20)
    assert (sampling.logit_bias_ids, sampling.logit_bias_values) == ([7, 3], [100.0, -2.5])
    assert req.options.n == 3
    assert chat().options.n == 1 and chat().options.sampling([]).logit_bias_ids == []


def test_logit_bias_ids_must_be_in_the_vocabulary():
    hello = type("Hello", (), {"vocab_size": 100})()
    api.check_model_limits(chat(logit_bias={"99": 1}).options, hello)
    with pytest.raises(InvalidRequest) as info:
        api.check_model_limits(chat(logit_bias={"100": 1}).options, hello)
    assert info.value.param == "logit_bias" and info.value.status == 400


def test_repetition_penalty_zero_means_off():
    # mlx_lm.server's default is 0 ("off"); the worker's "off" is 1.0.
    assert chat(repetition_penalty=0).options.repetition_penalty == 1.0


def test_logprobs():
    assert chat(logprobs=True).options.top_logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).options.top_logprobs == 5
    assert chat(logprobs=False).options.top_logprobs == -1


def test_stream_options():
    req = chat(stream=True, stream_options={"include_usage": True})
    assert req.options.stream and req.options.include_usage


def test_tools_and_tool_choice():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    req = chat(tools=tools)
    assert req.tools == tools and req.parse_tools
    assert chat(tools=tools, tool_choice="auto").parse_tools
    none = chat(tools=tools, tool_choice="none")
    assert none.tools is None and not none.parse_tools
    assert chat(tools=[]).tools is None


def test_harmless_unknown_fields_are_ignored():
    req = chat(user="u", metadata={"a": 1}, parallel_tool_calls=True, presence_penalty=0, n=1)
    assert req.messages == USER


def test_template_kwargs_pass_through():
    assert chat(chat_template_kwargs={"enable_thinking": False}).template_kwargs == {"enable_thinking": False}


# ----------------------------------------------------------------- completions


def completion(**fields):
    return api.parse_completion_request({"prompt": "x", **fields}, default_max_tokens=32)


def test_completion_prompts():
    assert completion().prompt == "x"
    assert completion(prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert completion(prompt=["only"]).prompt == "only"
    assert completion(prompt=[[4, 5]]).prompt == [4, 5]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_invalid_completion_params(fields, param):
    assert bad_param(completion, **fields) == param


def test_completion_logprobs_count():
    assert completion(logprobs=3).options.top_logprobs == 3
    assert completion(logprobs=0).options.top_logprobs == 0
    assert completion().options.top_logprobs == -1


def test_prompt_required():
    with pytest.raises(InvalidRequest):
        api.parse_completion_request({}, 8)


# ----------------------------------------------------------------- responses and errors


def test_usage_carries_cached_tokens():
    usage = api.usage(10, 5, 8)
    assert usage == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert "prompt_tokens_details" not in api.usage(1, 1, None)


def test_chat_message_drops_stream_index_of_tool_calls():
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = api.chat_message("", "", [call])
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


def test_completion_logprobs_shape():
    entries = [api.TokenLogprobView("a", -0.1, [("a", -0.1), ("b", -2.0)]), api.TokenLogprobView("bc", -0.5)]
    out = api.completion_logprobs(entries)
    assert out["tokens"] == ["a", "bc"]
    assert out["text_offset"] == [0, 1]
    assert out["top_logprobs"][0] == {"a": -0.1, "b": -2.0}


def test_error_statuses():
    assert QueueFull("full", retry_after=3).response().status == 429
    assert QueueFull("full", retry_after=3).headers() == {"Retry-After": "3"}
    body = json.loads(InvalidRequest("bad", param="x").response().text)
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}}


@pytest.mark.parametrize(
    "code, status",
    [
        (ErrorCode.BAD_REQUEST, 400),
        (ErrorCode.CONTEXT_LENGTH_EXCEEDED, 400),
        (ErrorCode.WORKER_DIED, 503),
        (ErrorCode.INSUFFICIENT_MEMORY, 503),
        (ErrorCode.INTERNAL, 500),
    ],
)
def test_worker_errors_map_to_statuses(code, status):
    error = from_worker_error(code, "m")
    assert isinstance(error, ApiError) and error.status == status


# ----------------------------------------------------------------- config and upstream


@pytest.mark.parametrize(
    "text, value",
    [("1024", 1024), ("512M", 512 * 2**20), ("8G", 8 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("64kb", 65536)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "8X", "-1G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "base, path, url",
    [
        ("http://up:9000", "/v1/chat/completions", "http://up:9000/v1/chat/completions"),
        ("http://up:9000/", "/chat/completions", "http://up:9000/chat/completions"),
        ("https://api.example.com/v1", "/v1/models?x=1", "https://api.example.com/v1/models?x=1"),
        ("https://api.example.com/v1", "/chat/completions", "https://api.example.com/v1/chat/completions"),
        ("http://h/prefix", "/v1/completions", "http://h/prefix/v1/completions"),
    ],
)
def test_upstream_url(base, path, url):
    assert str(upstream_url(base, path)) == url


def test_forwarded_headers_drop_hop_by_hop():
    headers = {"Authorization": "Bearer k", "Host": "me", "Connection": "keep-alive", "Content-Length": "3", "X-A": "1"}
    assert forwarded_headers(headers) == {"Authorization": "Bearer k", "X-A": "1"}


@pytest.mark.parametrize("kwargs", [
    {"chat_template": "{{ '<|im_' + 'start|>' }}"}, {"tokenize": True}, {"bos_token": "x"},
    {"enable_thinking": {"nested": 1}}, {"not an identifier": 1}, {"reasoning_effort": "x" * 2000},
])  # fmt: skip
def test_chat_template_kwargs_set_variables_only(kwargs):
    from proxy.errors import InvalidRequest
    from proxy.openai_api import parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}
    with pytest.raises(InvalidRequest, match="chat_template_kwargs"):
        parse_chat_request(body, 16)


def test_chat_template_kwargs_accept_plain_variables():
    from proxy.openai_api import parse_chat_request

    kwargs = {"enable_thinking": False, "reasoning_effort": "low", "budget": 3, "x": None}
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}
    assert parse_chat_request(body, 16).template_kwargs == kwargs


@pytest.mark.parametrize("field", ["repetition_context_size", "presence_context_size", "frequency_context_size"])
def test_penalty_context_sizes_are_bounded(field):
    from proxy.errors import InvalidRequest
    from proxy.openai_api import MAX_PENALTY_CONTEXT, parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], field: MAX_PENALTY_CONTEXT + 1}
    with pytest.raises(InvalidRequest, match=field):
        parse_chat_request(body, 16)
    assert getattr(parse_chat_request({**body, field: MAX_PENALTY_CONTEXT}, 16).options, field) == MAX_PENALTY_CONTEXT

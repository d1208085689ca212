"""The Messages API, driven by the `anthropic` client, against the tiny hybrid (qwen3_next, chatml-tools).

Same service, same model, same pool as the chat completions tests: a cached
reply must equal what a --no-cache service says (greedy decoding), and every
turn of a conversation must restore the previous turn's prompt from the pool.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import anthropic
import pytest

from proxy import anthropic_api
from proxy.chat import ChatTokenizer
from tests.e2e.conftest import Server
from tests.e2e.conftest import post as post_json

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}  # the SDK no longer takes sampling arguments; the API still does
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ANTHROPIC_HEADERS = {"x-api-key": "x", "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-05-16"}
FEW = 4  # tokens a restore may fall short of the previous prompt


def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.root, api_key="x", max_retries=0, timeout=60)


def model_id(server: Server) -> str:
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    return post_json(server, path, body, {**ANTHROPIC_HEADERS, **(headers or {})})


def sse_events(server: Server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed reply, pings included, checking the raw framing on the way."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/messages", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json", **ANTHROPIC_HEADERS})  # fmt: skip
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        raw = response.read().decode()
    finally:
        connection.close()
    events = []
    for frame in raw.split("\n\n"):
        if not frame.strip():
            continue
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def prompt_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


# ----------------------------------------------------------------- replies


def test_non_streamed_and_streamed_replies_agree(proxy):
    c, model = client(proxy), model_id(proxy)
    ask = dict(model=model, max_tokens=8, messages=[{"role": "user", "content": "say something"}], extra_body=GREEDY)
    whole = c.messages.create(**ask)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == model
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    assert whole.usage.output_tokens <= 8 and whole.usage.cache_creation_input_tokens == 0
    counted = c.messages.count_tokens(model=model, messages=ask["messages"]).input_tokens
    assert prompt_tokens(whole.usage) == counted

    events = list(c.messages.create(**ask, stream=True))
    streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert streamed == text_of(whole)
    assert events[-1].type == "message_stop"
    with c.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason
    # An exact repeat restores the whole prompt from the pool.
    assert final.usage.cache_read_input_tokens == counted and final.usage.input_tokens == 0
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequence(proxy):
    c, model = client(proxy), model_id(proxy)
    ask = dict(model=model, max_tokens=12, messages=[{"role": "user", "content": "count to ten"}], extra_body=GREEDY)
    text = text_of(c.messages.create(**ask))
    words = text.split()
    if len(words) < 2:
        pytest.skip(f"the tiny model said too little to cut: {text!r}")
    stopped = c.messages.create(**ask, stop_sequences=[words[1]])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == words[1]
    assert text_of(stopped) == text[: text.index(words[1])]


def test_stream_event_sequence(proxy):
    # A prompt over 512 tokens: the worker reports prefill progress, which the stream turns into pings.
    long_prompt = " ".join(f"word{i}" for i in range(600))
    events = sse_events(proxy, {"model": model_id(proxy), "max_tokens": 6, "temperature": 0,
                                "messages": [{"role": "user", "content": long_prompt}]})  # fmt: skip
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 0
    body = [e for e in events[1:-2] if e[0] != "ping"]
    first_block = names.index("content_block_start") if "content_block_start" in names else len(names) - 2
    assert "ping" in names[1:first_block], names[:10]  # while the prompt was prefilled
    # Blocks: start, deltas, stop, with indices 0, 1, ... in order.
    index = 0
    while body:
        name, data = body.pop(0)
        assert name == "content_block_start" and data["index"] == index
        kind = data["content_block"]["type"]
        deltas = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}[kind]
        while body[0][0] == "content_block_delta":
            assert body[0][1]["index"] == index and body[0][1]["delta"]["type"] == deltas
            body.pop(0)
        assert body.pop(0) == ("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["delta"]["stop_sequence"] is None
    usage = delta["usage"]
    assert 1 <= usage["output_tokens"] <= 6 and usage["cache_creation_input_tokens"] == 0
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == start["usage"]["input_tokens"] > 600


# ----------------------------------------------------------------- tools and the cache


def tool_round_trip(first_reply: list[dict]) -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first_reply + [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]},
    ]  # fmt: skip


def test_tool_use_round_trip_renders_through_the_template(proxy, tiny_model):
    c, model = client(proxy), model_id(proxy)
    messages = tool_round_trip([{"type": "thinking", "thinking": "Call it.", "signature": ""},
                                {"type": "text", "text": "Checking."}])  # fmt: skip
    body = {"model": model, "max_tokens": 8, "system": "Be brief.", "tools": [WEATHER_TOOL], "messages": messages}
    request = anthropic_api.parse_messages_request(body)
    tokenizer = ChatTokenizer.load(tiny_model)
    rendered = tokenizer.render_chat(request.messages, tools=request.tools)
    text = tokenizer.wrapper.decode(rendered.tokens)
    assert '<think>\nCall it.\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    # The service renders the same prompt.
    counted = c.messages.count_tokens(model=model, system="Be brief.", tools=[WEATHER_TOOL], messages=messages)
    assert counted.input_tokens == len(rendered.tokens)
    without_result = c.messages.count_tokens(model=model, system="Be brief.", tools=[WEATHER_TOOL], messages=messages[:1])
    assert counted.input_tokens > without_result.input_tokens
    reply = c.messages.create(**body, extra_body=GREEDY)
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert prompt_tokens(reply.usage) == len(rendered.tokens)


def test_five_turn_agent_loop_reuses_the_cache_and_matches_a_cold_service(proxy, nocache_proxy):
    """Each turn: the model's reply, a tool call the agent makes of it, the tool's result."""
    cached, cold = client(proxy), client(nocache_proxy)
    cached_model, cold_model = model_id(proxy), model_id(nocache_proxy)
    system = [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}]
    messages: list[dict] = [{"role": "user", "content": "Fix the failing test."}]
    previous = None
    for turn in range(5):
        ask = dict(max_tokens=6, system=system, tools=[WEATHER_TOOL], messages=messages, extra_body=GREEDY)
        if turn % 2:
            with cached.messages.stream(model=cached_model, **ask) as stream:
                reply = stream.get_final_message()
        else:
            reply = cached.messages.create(model=cached_model, **ask)
        reference = cold.messages.create(model=cold_model, **ask)
        assert [b.to_dict() for b in reply.content] == [b.to_dict() for b in reference.content], f"turn {turn + 1}"
        assert reply.stop_reason == reference.stop_reason
        assert prompt_tokens(reply.usage) == prompt_tokens(reference.usage)
        assert reference.usage.cache_read_input_tokens == 0
        if previous is not None:
            # The previous turn's whole prompt (its input_tokens are the part it computed) comes from the pool.
            assert reply.usage.cache_read_input_tokens >= prompt_tokens(previous.usage) - FEW, f"turn {turn + 1}"
            assert reply.usage.cache_read_input_tokens >= previous.usage.input_tokens - FEW
            assert reply.usage.input_tokens < prompt_tokens(reply.usage) - prompt_tokens(previous.usage) + FEW + 8
        previous = reply
        call_id = f"toolu_{turn}"
        messages = messages + [
            {"role": "assistant", "content": [b.to_dict() for b in reply.content] + [
                {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": f"city{turn}"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": f"result {turn}"}]},
        ]  # fmt: skip


# ----------------------------------------------------------------- errors


def test_errors_take_anthropics_shape_only_on_its_routes(proxy, nocache_proxy):
    user = [{"role": "user", "content": "hi"}]
    status, body = post(proxy, "/v1/messages", json.dumps({"model": model_id(proxy), "messages": user}).encode())
    assert status == 400
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: field required"}}
    status, body = post(proxy, "/messages", b"{not json")
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    status, body = post(proxy, "/v1/chat/completions", b"{not json")  # the OpenAI route keeps OpenAI's shape
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(proxy, "/v1/messages/nothing", b"{}")
    assert status == 404 and body["error"]["type"] == "not_found_error"

    # Unknown model: a 404 here; forwarded by a proxy with an upstream, whose 404 comes back as it is.
    for server in (nocache_proxy, proxy):
        with pytest.raises(anthropic.NotFoundError) as info:
            client(server).messages.create(model="claude-nowhere", max_tokens=4, messages=user)
        assert info.value.status_code == 404
        assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        client(proxy).messages.create(model=model_id(proxy), max_tokens=4, messages=user, extra_body={"temperature": 3})
    assert info.value.body["error"]["type"] == "invalid_request_error"


def test_a_max_tokens_past_the_context_is_fitted_not_refused(tiny_model, log_dir):
    """Agents send max_tokens of 32K and more whatever the model; on this API it is a budget."""
    from tests.e2e.conftest import running_proxy

    with running_proxy(tiny_model, log_dir, "--max-kv-size", "64", name="anthropic-fit") as server:
        c = client(server)
        reply = c.messages.create(
            model=str(tiny_model), max_tokens=100_000, messages=[{"role": "user", "content": "say something"}],
            extra_body=GREEDY,
        )  # fmt: skip
        assert prompt_tokens(reply.usage) + reply.usage.output_tokens <= 64
        assert reply.stop_reason in ("max_tokens", "end_turn")

"""Malformed requests against a running proxy: each a 400 OpenAI error naming the parameter, none
reaching the worker, and the service still up and answering afterwards."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional

import openai
import pytest

from tests.e2e.conftest import Server, post, running_proxy

pytestmark = pytest.mark.slow

MAX_BODY = 256 * 1024
VOCAB = 1000  # the tiny model's vocabulary
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# A request id in a log line: the proxy's record of a generation, or the worker's of a request it got.
REQUEST_LINE = re.compile(r"request (?:chatcmpl|cmpl)-[0-9a-f]{32}")


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "default_model", "messages": USER, "max_tokens": 4, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "default_model", "prompt": "once", "max_tokens": 4, **fields}).encode()


def with_tool(**function: Any) -> bytes:
    return chat(tools=[{"type": "function", "function": {"name": "f", **function}}])


CHAT, TEXT = "/v1/chat/completions", "/v1/completions"

# (id, path, body, param the error names (None: no parameter), error code (None: not checked))
CASES: list[tuple[str, str, bytes, Optional[str], Optional[str]]] = [
    ("invalid-json", CHAT, b'{"messages": [', None, "invalid_json"),
    ("body-not-an-object", CHAT, b'[{"role": "user", "content": "hi"}]', None, "invalid_json"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}', None, "invalid_json"),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', None, "invalid_json"),
    ("nested-too-deep", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "x": '
     + b"[" * 2000 + b"]" * 2000 + b"}", None, "invalid_json"),  # fmt: skip
    ("oversize-body", CHAT, chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 1)}]), None,
     "request_too_large"),  # fmt: skip
    ("model-not-a-string", CHAT, chat(model=7), "model", None),
    ("messages-missing", CHAT, json.dumps({"model": "default_model"}).encode(), "messages", None),
    ("messages-empty", CHAT, chat(messages=[]), "messages", None),
    ("messages-not-an-array", CHAT, chat(messages="hi"), "messages", None),
    ("message-not-an-object", CHAT, chat(messages=["hi"]), "messages[0]", None),
    ("role-missing", CHAT, chat(messages=[{"content": "hi"}]), "messages[0].role", None),
    ("role-unknown", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", None),
    ("content-a-number", CHAT, chat(messages=[{"role": "user", "content": 42}]), "messages[0].content", None),
    ("content-part-not-text", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages[0].content", None),  # fmt: skip
    ("max-tokens-negative", CHAT, chat(max_tokens=-5), "max_tokens", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), "max_tokens", None),
    ("max-tokens-huge", CHAT, chat(max_tokens=10**30), "max_tokens", "context_length_exceeded"),
    ("max-tokens-a-string", CHAT, chat(max_tokens="10"), "max_tokens", None),
    ("max-completion-tokens-float", CHAT, chat(max_completion_tokens=2.5), "max_completion_tokens", None),
    ("temperature-negative", CHAT, chat(temperature=-0.5), "temperature", None),
    ("temperature-above-2", CHAT, chat(temperature=2.5), "temperature", None),
    ("temperature-nan", CHAT, chat(max_tokens=4).replace(b'"max_tokens": 4', b'"temperature": NaN'),
     "temperature", None),  # fmt: skip
    ("top-p-zero", CHAT, chat(top_p=0), "top_p", None),
    ("top-p-above-1", CHAT, chat(top_p=1.5), "top_p", None),
    ("top-k-negative", CHAT, chat(top_k=-1), "top_k", None),
    ("top-k-whole-vocabulary", CHAT, chat(top_k=VOCAB), "top_k", None),
    ("min-p-above-1", CHAT, chat(min_p=1.5), "min_p", None),
    ("min-p-negative", CHAT, chat(min_p=-0.1), "min_p", None),
    ("seed-a-string", CHAT, chat(seed="abc"), "seed", None),
    ("seed-a-float", CHAT, chat(seed=1.5), "seed", None),
    ("seed-beyond-64-bits", CHAT, chat(seed=2**70), "seed", None),
    ("logprobs-not-a-boolean", CHAT, chat(logprobs="yes"), "logprobs", None),
    ("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), "top_logprobs", None),
    ("stream-not-a-boolean", CHAT, chat(stream="yes"), "stream", None),
    ("n-above-8", CHAT, chat(n=9), "n", None),
    ("presence-penalty-above-2", CHAT, chat(presence_penalty=2.5), "presence_penalty", None),
    ("logit-bias-not-a-token-id", CHAT, chat(logit_bias={"a": 1}), "logit_bias", None),
    ("logit-bias-outside-the-vocabulary", CHAT, chat(logit_bias={"999999999": 1}), "logit_bias", None),
    ("stop-a-number", CHAT, chat(stop=5), "stop", None),
    ("tools-not-an-array", CHAT, chat(tools={"type": "function"}), "tools", None),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), "tools[0].function", None),
    ("tool-without-name", CHAT, chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
     "tools[0].function.name", None),  # fmt: skip
    ("tool-parameters-a-string", CHAT, with_tool(parameters="{}"), "tools[0].function.parameters", None),
    ("tool-schema-unknown-type", CHAT, with_tool(parameters={"type": "banana"}),
     "tools[0].function.parameters.type", None),  # fmt: skip
    ("tool-schema-properties-an-array", CHAT, with_tool(parameters={"type": "object", "properties": ["a"]}),
     "tools[0].function.parameters.properties", None),  # fmt: skip
    ("tool-schema-nested-property-bad", CHAT, with_tool(parameters={
        "type": "object", "properties": {"city": {"type": "string", "required": "yes"}}}),
     "tools[0].function.parameters.properties.city.required", None),  # fmt: skip
    ("tool-choice-unknown-function", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "nope"}}), "tool_choice", None),  # fmt: skip
    ("tool-choice-without-tools", CHAT, chat(tool_choice="required"), "tool_choice", None),
    ("response-format-unknown", CHAT, chat(response_format={"type": "xml"}), "response_format", None),
    ("response-format-schema-llguidance-refuses", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "unevaluatedProperties": False}}}),
     "response_format.json_schema.schema", None),  # fmt: skip
    ("completion-prompt-missing", TEXT, json.dumps({"model": "default_model"}).encode(), "prompt", None),
    ("completion-prompt-empty", TEXT, completion(prompt=""), "prompt", None),
    ("completion-token-beyond-vocabulary", TEXT, completion(prompt=[1, 2, VOCAB + 5]), "prompt", None),
    ("completion-token-negative", TEXT, completion(prompt=[1, -2]), "prompt", None),
    ("completion-several-prompts", TEXT, completion(prompt=["a", "b"]), "prompt", None),
    ("completion-logprobs-too-many", TEXT, completion(logprobs=6), "logprobs", None),
]


def requests_seen(server: Server) -> int:
    return len(REQUEST_LINE.findall(server.log()))


def settled_count(server: Server, quiet: float = 0.5, timeout: float = 10.0) -> int:
    """The request-line count once no new line has appeared for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = requests_seen(server), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = requests_seen(server)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return count


def ask(server: Server) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
    return c.chat.completions.create(model="default_model", messages=USER, max_tokens=4)


@pytest.fixture(scope="module")
def server(tiny_model, log_dir) -> Iterator[tuple[Server, int]]:
    """A proxy that answered one valid request, and the settled count of request log lines."""
    with running_proxy(tiny_model, log_dir, "--max-body-bytes", str(MAX_BODY), name="bad-input") as proxy:
        ask(proxy)
        yield proxy, settled_count(proxy)


def test_there_are_enough_distinct_cases():
    assert len(CASES) >= 25 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("path, body, param, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request_is_a_400_openai_error(server, path, body, param, code):
    proxy, _ = server
    before = requests_seen(proxy)
    status, reply = post(proxy, path, body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert requests_seen(proxy) == before  # no generation was started for it
    assert proxy.process.poll() is None


def test_nothing_reached_the_worker_and_the_next_valid_request_succeeds(server):
    proxy, baseline = server
    assert settled_count(proxy) == baseline  # neither the proxy nor the worker logged a request
    with urllib.request.urlopen(f"{proxy.root}/health", timeout=5) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["workers"][0]["alive"]
    reply = ask(proxy)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert settled_count(proxy) > baseline  # and this one did reach it

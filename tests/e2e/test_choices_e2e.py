"""n > 1, penalties and logit_bias through the real service and the `openai` client.

n=3 answers three choices from one prefill: the request log shows the first
choice computing the prompt and the other two restoring all of it, and the
worker's recomputed-token counter grows by one prompt's worth.
"""

from __future__ import annotations

import re
import time
import urllib.request

import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

MAX_TOKENS = 10


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def messages(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Write three sentences about {topic}, each one different. " * 6}]


def recomputed_total(server: Server) -> float:
    with urllib.request.urlopen(f"{server.root}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^mlx_cache_proxy_recomputed_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def choice_lines(server: Server, request_id: str, n: int) -> list[dict[str, int]]:
    """cached= / recomputed= of each choice's request log line (`<id>-<i>`), waiting for them to be written."""
    deadline = time.monotonic() + 10
    while True:
        found = {}
        for i in range(n):
            m = re.search(rf"request {re.escape(request_id)}-{i} .*?cached=(\d+) recomputed=(\d+)", server.log())
            if m:
                found[i] = {"cached": int(m[1]), "recomputed": int(m[2])}
        if len(found) == n or time.monotonic() > deadline:
            return [found.get(i, {}) for i in range(n)]
        time.sleep(0.1)


def assert_one_prefill(server: Server, request_id: str, prompt_tokens: int, cached: int, recomputed: float) -> None:
    first, *others = choice_lines(server, request_id, 3)
    assert first == {"cached": cached, "recomputed": prompt_tokens - cached}, first
    for line in others:
        assert line == {"cached": prompt_tokens, "recomputed": 0}, others
    assert recomputed == prompt_tokens - cached


def test_n3_is_one_prefill_and_three_choices(proxy):
    before = recomputed_total(proxy)
    reply = client(proxy).chat.completions.create(
        model="default_model", messages=messages("rivers"), max_tokens=MAX_TOKENS, n=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert texts[0] and texts[0] == texts[1] == texts[2]  # greedy: the same three times, as OpenAI's
    alone = client(proxy).chat.completions.create(model="default_model", messages=messages("rivers"), max_tokens=MAX_TOKENS)
    assert alone.choices[0].message.content == texts[0]
    usage = reply.usage
    assert usage.completion_tokens == 3 * alone.usage.completion_tokens
    assert usage.prompt_tokens == alone.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens
    recomputed = recomputed_total(proxy) - before - (alone.usage.prompt_tokens - alone.usage.prompt_tokens_details.cached_tokens)
    assert_one_prefill(proxy, reply.id, usage.prompt_tokens, cached, recomputed)


def test_n3_streamed(proxy):
    before = recomputed_total(proxy)
    stream = client(proxy).chat.completions.create(
        model="default_model", messages=messages("mountains"), max_tokens=MAX_TOKENS, n=3, temperature=1.0, seed=7,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finish, usage, request_id = ["", "", ""], [None] * 3, None, None
    for chunk in stream:
        request_id = chunk.id
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
        usage = chunk.usage or usage
    assert all(finish) and all(texts), (finish, texts)
    assert len(set(texts)) > 1, texts  # sampled, with a seed per choice: they differ
    assert usage.completion_tokens <= 3 * MAX_TOKENS and usage.completion_tokens >= 3
    cached = usage.prompt_tokens_details.cached_tokens
    assert_one_prefill(proxy, request_id, usage.prompt_tokens, cached, recomputed_total(proxy) - before)


def test_completions_n2(proxy):
    reply = client(proxy).completions.create(model="default_model", prompt="Once upon a time", max_tokens=6, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text


def test_logit_bias_forces_its_token(proxy):
    reply = client(proxy).chat.completions.create(
        model="default_model", messages=messages("lakes"), max_tokens=MAX_TOKENS, logit_bias={"300": 100}, logprobs=True
    )
    tokens = [t.token for t in reply.choices[0].logprobs.content]
    assert len(tokens) == MAX_TOKENS and len(set(tokens)) == 1, tokens


SETTINGS = [
    dict(presence_penalty=-2.0),  # a reply of no repeats: a positive one would change nothing
    dict(frequency_penalty=-2.0, presence_penalty=0.5),
    dict(logit_bias={"300": 5, "301": -100}, frequency_penalty=-0.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s))
def test_penalties_and_logit_bias_as_mlx_lm_server(proxy, mlx_lm_server, tiny_model, settings):
    """The same request, the same reply as mlx_lm.server's (and not the reply without the settings)."""
    def ask(server: Server, **extra) -> str:
        reply = client(server).chat.completions.create(
            model=str(tiny_model), messages=messages("lakes"), max_tokens=24, temperature=0, **extra
        )
        return reply.choices[0].message.content

    ours = ask(proxy, **settings)
    assert ours == ask(mlx_lm_server, **settings)
    assert ours != ask(proxy)


def test_a_client_leaving_aborts_every_choice(proxy):
    stream = client(proxy).chat.completions.create(
        model="default_model", messages=messages("forests"), max_tokens=400, n=3, stream=True
    )
    request_id = None
    for i, chunk in enumerate(stream):
        request_id = chunk.id
        if i == 8:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        statuses = re.findall(rf"request {re.escape(request_id)}-\d .*?status=(\S+)", proxy.log())
        if len(statuses) == 3:
            break
        time.sleep(0.2)
    assert statuses == ["client_gone"] * 3, statuses
    generated = [int(g) for g in re.findall(rf"request {re.escape(request_id)}-\d .*?generated=(\d+)", proxy.log())]
    assert max(generated) < 400, generated  # aborted, not run to the end
    after = client(proxy).chat.completions.create(model="default_model", messages=messages("x"), max_tokens=3, n=2)
    assert len(after.choices) == 2

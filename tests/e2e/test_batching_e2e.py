"""Concurrent clients through the real service: batched, cached, and the same replies as alone.

The `proxy` fixture runs with the default --max-batch; each client is a thread
with its own openai client. Replies are compared with the --no-cache proxy's,
asked one at a time.
"""

from __future__ import annotations

import re
import threading
import urllib.request

import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant for a team of agents. Answer briefly and plainly. " * 8


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def chat(server: Server, messages: list[dict], max_tokens: int = 12) -> tuple[str, int]:
    stream = client(server).chat.completions.create(
        model="default_model", messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
    )
    text, cached = "", -1
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return text, cached


def conversation(i: int) -> list[list[dict]]:
    system = SYSTEM if i % 2 else f"You are assistant number {i}. " * 20
    first = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: name a colour."}]
    return [first, first + [{"role": "assistant", "content": None}, {"role": "user", "content": "And another?"}]]


def run_two_turns(server: Server, i: int) -> list[tuple[str, int]]:
    turn1, turn2 = conversation(i)
    reply1 = chat(server, turn1)
    turn2[2]["content"] = reply1[0]
    return [reply1, chat(server, turn2)]


def test_concurrent_conversations_are_batched_cached_and_exact(proxy, nocache_proxy):
    n = 6
    results: dict[int, list[tuple[str, int]]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = run_two_turns(proxy, i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:1]
    assert len(results) == n

    for i in range(n):
        alone = run_two_turns(nocache_proxy, i)
        assert [text for text, _ in results[i]] == [text for text, _ in alone], i
        assert results[i][1][1] > 0, (i, results[i])  # the second turn restored the first from the pool

    # They ran together: the request log shows batches larger than one, and the metrics have the
    # per-token and per-step histograms.
    sizes = [int(m) for m in re.findall(r"\bbatch=(\d+)", proxy.log())]
    assert sizes and max(sizes) > 1, sizes[-20:]
    with urllib.request.urlopen(f"{proxy.root}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    for name in ("time_per_output_token_seconds_count", "decode_step_seconds_count", "pool_leases"):
        assert f"mlx_cache_proxy_{name}" in metrics, name


def test_an_abort_leaves_the_rest_of_the_batch_running(proxy, nocache_proxy):
    prompts = [[{"role": "user", "content": f"Tell a long story about item {i}."}] for i in range(4)]
    expected = [chat(nocache_proxy, p, max_tokens=24)[0] for p in prompts]
    got: dict[int, str] = {}

    def full(i: int) -> None:
        got[i] = chat(proxy, prompts[i], max_tokens=24)[0]

    def leaves(i: int) -> None:
        stream = client(proxy).chat.completions.create(
            model="default_model", messages=prompts[i], max_tokens=200, stream=True
        )
        for n, _ in enumerate(stream):
            if n >= 2:
                stream.close()  # the client goes away mid-stream
                return

    threads = [threading.Thread(target=leaves, args=(0,))] + [threading.Thread(target=full, args=(i,)) for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [got[i] for i in (1, 2, 3)] == expected[1:]

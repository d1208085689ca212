"""The whole service, driven by the `openai` client, as a user would.

The tiny model has random weights, so replies are gibberish, but greedy
decoding makes them deterministic: a cached run must say exactly what a cold
run says, and what mlx_lm.server says.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.e2e.conftest import Server, free_port, launch, post, running_proxy, stop, wait_healthy

pytestmark = pytest.mark.slow

CANDIDATES = ["what is 2+2", "count to ten", "say something", "go on", "write a poem", "x", "list", "hi"]
PROBE_TOKENS = 400


@pytest.fixture(scope="session")
def long_running(nocache_proxy) -> list[dict]:
    """Messages whose greedy reply runs at least PROBE_TOKENS tokens without an end-of-sequence.

    Found by asking, since the random tiny model decides where it stops; the
    cache must not change the reply, so this holds on every proxy.
    """
    c = client(nocache_proxy)
    for content in CANDIDATES:
        messages = [{"role": "user", "content": content}]
        reply = c.chat.completions.create(model=model_id(nocache_proxy), messages=messages, max_tokens=PROBE_TOKENS)
        if reply.choices[0].finish_reason == "length":
            return messages
    pytest.fail("no candidate prompt runs long on this tiny model")


def client(server: Server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60, **kwargs)


def model_id(server: Server) -> str:
    return client(server).models.list().data[0].id


def sse_lines(server: Server, body: dict) -> list[str]:
    """The raw lines of a streamed response, SSE comments included."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        return [line for line in response.read().decode().split("\n") if line]
    finally:
        connection.close()


def health(server: Server) -> dict:
    try:
        with urllib.request.urlopen(f"{server.root}/health", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


# ----------------------------------------------------------------- basics


def test_models_lists_the_exact_model_value(proxy, tiny_model):
    assert [m.id for m in client(proxy).models.list().data] == [str(tiny_model)]


def test_chat_non_streamed(proxy, tiny_model):
    reply = client(proxy).chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == str(tiny_model)
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_streamed_equals_non_streamed(proxy):
    c = client(proxy)
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = c.chat.completions.create(model="default_model", messages=messages, max_tokens=16)
    chunks = list(
        c.chat.completions.create(
            model="default_model", messages=messages, max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == (whole.choices[0].message.content or "")
    assert finish == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    # The second identical prompt found the first one's prefix.
    assert usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 4


def test_completions_text_and_token_ids(proxy, tiny_model):
    c = client(proxy)
    by_text = c.completions.create(model=str(tiny_model), prompt="once upon a time", max_tokens=8)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].finish_reason in ("stop", "length")
    assert by_text.usage.completion_tokens <= 8
    by_ids = c.completions.create(model=str(tiny_model), prompt=[5, 6, 7, 8], max_tokens=4)
    assert by_ids.usage.prompt_tokens == 4


def test_stop_string_ends_the_text(proxy):
    c = client(proxy)
    full = c.completions.create(model="default_model", prompt="once upon a time", max_tokens=12).choices[0].text
    cut = full[3:6]
    assert cut and cut in full
    stopped = c.completions.create(model="default_model", prompt="once upon a time", max_tokens=12, stop=[cut])
    assert stopped.choices[0].text == full[: full.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs(proxy):
    reply = client(proxy).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


# ----------------------------------------------------------------- the cache


def test_four_turn_conversation_reuses_the_cache_and_matches_a_cold_run(proxy, nocache_proxy):
    cached_client, cold_client = client(proxy), client(nocache_proxy)
    cold_model = model_id(nocache_proxy)
    messages = [{"role": "system", "content": "You are terse."}]
    previous_prompt = 0
    for turn, question in enumerate(["hi there", "what can you do?", "tell me more", "thanks, bye"]):
        messages.append({"role": "user", "content": question})
        warm = cached_client.chat.completions.create(model="default_model", messages=messages, max_tokens=12, temperature=0)
        cold = cold_client.chat.completions.create(model=cold_model, messages=messages, max_tokens=12, temperature=0)
        assert warm.choices[0].message.content == cold.choices[0].message.content, f"turn {turn + 1}"
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        if turn > 0:
            cached = warm.usage.prompt_tokens_details.cached_tokens
            assert cached >= previous_prompt - 4, f"turn {turn + 1}: cached {cached} of {warm.usage.prompt_tokens}"
        previous_prompt = warm.usage.prompt_tokens
        messages.append({"role": "assistant", "content": warm.choices[0].message.content or ""})


# ----------------------------------------------------------------- load and lifecycle


def test_client_disconnect_aborts_so_the_next_request_starts_quickly(proxy, long_running):
    c = client(proxy)
    stream = c.chat.completions.create(model="default_model", messages=long_running, max_tokens=20000, stream=True)
    seen = 0
    for chunk in stream:
        assert not (chunk.choices and chunk.choices[0].finish_reason), "generation ended before the disconnect"
        seen += 1
        if seen == 5:
            break
    request_id = chunk.id
    stream.close()  # a minute of decoding left, unless the proxy aborts it
    started = time.monotonic()
    reply = c.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "quick"}], max_tokens=4, timeout=20
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 5.0
    log = proxy.log()
    assert f"request {request_id}: abort" in log  # the worker's line: it stopped on our Abort
    assert f"request {request_id} model=default_model status=client_gone" in log


def test_twenty_concurrent_clients_are_all_answered(proxy):
    def ask(i: int) -> str:
        reply = client(proxy).chat.completions.create(
            model="default_model", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=6
        )
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=20) as pool:
        reasons = list(pool.map(ask, range(20)))
    assert len(reasons) == 20 and set(reasons) <= {"stop", "length"}


def test_bad_json_is_a_400_openai_error(proxy):
    status, body = post(proxy, "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(proxy, "/chat/completions", json.dumps({"messages": [], "model": "default_model"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client(proxy).chat.completions.create(model="default_model", messages=[{"role": "user", "content": "x"}], temperature=-1)


def test_unknown_model_without_upstream_is_404(nocache_proxy):
    with pytest.raises(openai.NotFoundError) as info:
        client(nocache_proxy).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_unknown_model_is_forwarded_to_the_upstream(proxy, nocache_proxy):
    upstream_model = model_id(nocache_proxy)
    c = client(proxy)
    reply = c.chat.completions.create(model=upstream_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.model == upstream_model
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # the no-cache proxy answered
    chunks = list(
        c.chat.completions.create(model=upstream_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):  # the upstream's own 404 comes back as it is
        c.chat.completions.create(model="nowhere", messages=[{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def tuned_proxy(tiny_model, log_dir):
    # One at a time, so that requests queue: the queue's limits are what this proxy tests.
    args = ("--max-queue", "1", "--keepalive-interval", "0.2", "--max-batch", "1")
    with running_proxy(tiny_model, log_dir, *args, name="tuned") as server:
        yield server


def test_max_queue_1_gives_429s_not_crashes(tuned_proxy, long_running):
    def ask(_: int) -> object:
        try:
            return client(tuned_proxy).chat.completions.create(
                model="default_model", messages=long_running, max_tokens=300
            )
        except openai.RateLimitError as error:
            return error

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    answered = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert refused and len(answered) >= 2
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.body["code"] == "queue_full" for r in refused)
    assert health(tuned_proxy)["status"] == "ok"
    client(tuned_proxy).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )


def test_sse_comments_while_queued_and_prefilling(tuned_proxy, long_running):
    c = client(tuned_proxy)
    with ThreadPoolExecutor(max_workers=1) as pool:
        blocker = pool.submit(
            c.chat.completions.create, model="default_model", messages=long_running, max_tokens=PROBE_TOKENS
        )
        time.sleep(0.3)  # the blocker holds the worker; the next request waits in the queue
        long_prompt = " ".join(f"word{i}" for i in range(1500))
        lines = sse_lines(
            tuned_proxy,
            {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2, "stream": True},
        )
        assert blocker.result().choices[0].finish_reason == "length"
    assert ": keep-alive queued 1" in lines
    assert any(re.fullmatch(r": prefill \d+/\d+", line) for line in lines), lines[:20]
    assert lines[-1] == "data: [DONE]"
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_non_streamed_client_that_gives_up_aborts_its_generation(proxy, long_running):
    gone_before = proxy.log().count("status=client_gone")
    # The client gives up and closes its connection (a client left to the garbage collector keeps
    # the socket open, and nothing on the wire says it went away).
    with client(proxy) as quitter, pytest.raises(openai.APITimeoutError):
        # 0.3s: the reply runs >= PROBE_TOKENS tokens, which an idle machine decodes in under a second.
        quitter.chat.completions.create(model="default_model", messages=long_running, max_tokens=20000, timeout=0.3)
    started = time.monotonic()
    client(proxy).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "next"}], max_tokens=2
    )
    assert time.monotonic() - started < 5.0
    deadline = time.monotonic() + 5.0  # the log line follows the worker's last message for the aborted one
    while proxy.log().count("status=client_gone") < gone_before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.log().count("status=client_gone") == gone_before + 1


def test_remote_worker_is_used_and_left_running(tiny_model, log_dir):
    worker_port, port = free_port(), free_port()
    worker_argv = [sys.executable, "-m", "proxy.cli", "worker", "--model", str(tiny_model),
                   "--endpoint", f"tcp://127.0.0.1:{worker_port}"]  # fmt: skip
    worker = launch(worker_argv, worker_port, log_dir / "remote-worker.log")
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--worker", f"{tiny_model}=tcp://127.0.0.1:{worker_port}",
            "--port", str(port)]  # fmt: skip
    server = launch(argv, port, log_dir / "remote-proxy.log")
    try:
        wait_healthy(server)
        reply = client(server).chat.completions.create(
            model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        status = health(server)["workers"][0]
        assert status["local"] is False and status["pid"] == worker.process.pid
        assert stop(server) == 0
        assert worker.process.poll() is None  # not the proxy's to stop
    finally:
        stop(server)
        stop(worker)


def test_sigterm_lets_the_running_request_finish(tiny_model, log_dir, long_running):
    with running_proxy(tiny_model, log_dir, name="sigterm") as server:
        stream = client(server).chat.completions.create(
            model="default_model", messages=long_running, max_tokens=PROBE_TOKENS, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        server.process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # all PROBE_TOKENS tokens arrived
        assert server.process.wait(30) == 0
        assert stop(server) == 0


# ----------------------------------------------------------------- drop-in for mlx_lm.server


def same_client_code(base_url: str, model: str) -> dict:
    """What an application does; only base_url changes between the two servers."""
    c = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    ids = [m.id for m in c.models.list().data]
    chat = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=30, temperature=0
    )
    streamed = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "tell me a story"}], max_tokens=30, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    text = c.completions.create(model=model, prompt="once upon a time", max_tokens=20, temperature=0)
    return {
        "listed": model in ids,
        "chat": chat.choices[0].message.content,
        "chat_usage": (chat.usage.prompt_tokens, chat.usage.completion_tokens),
        "stream": "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
        "stream_usage": (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens),
        "completion": text.choices[0].text,
    }


def test_same_client_code_against_mlx_lm_server(proxy, mlx_lm_server, tiny_model):
    ours = same_client_code(proxy.base_url, str(tiny_model))
    theirs = same_client_code(mlx_lm_server.base_url, str(tiny_model))
    assert ours["listed"] and theirs["listed"]
    assert ours == theirs

"""Faults: a worker killed or hung under a running request, a remote worker that goes away, SIGTERM.

The running request gets a typed error; the requests queued behind it run on
the restarted worker and say exactly what a cold run says; a graceful stop
finishes the running request, answers the queued ones with a clean 503, exits 0
and leaves no worker behind.

To have a request reliably *in flight* when the fault strikes, the worker is
frozen with SIGSTOP first (the proxy is not), requests are queued behind it,
and only then is it killed (or left frozen for the heartbeat watchdog).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import openai
import pytest

from tests.e2e.conftest import REPO, Server, free_port, launch, running_proxy, stop, wait_healthy

pytestmark = pytest.mark.slow

LONG = 300  # tokens of the in-flight request: long enough to be frozen mid-way
SHORT = 6
QUESTIONS = [f"question number {i}" for i in range(5)]
CANDIDATES = ["write a poem", "what is 2+2", "count to ten", "say something", "go on", "x", "list", "hi"]


# ----------------------------------------------------------------- helpers


def client(server: Server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60, **kwargs)


def health(server: Server) -> dict:
    try:
        with urllib.request.urlopen(f"{server.root}/health", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def worker(server: Server) -> dict:
    return health(server)["workers"][0]


def restarts(server: Server) -> float:
    with urllib.request.urlopen(f"{server.root}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^mlx_cache_proxy_worker_restarts_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def ask(server: Server, content: str, model: str = "default_model") -> str:
    reply = client(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=SHORT
    )
    return reply.choices[0].message.content or ""


def queue_behind(server: Server, pool: ThreadPoolExecutor, questions: list[str], **kwargs) -> list[Future]:
    """Send `questions` and wait until all of them are queued behind the frozen worker."""
    futures = [pool.submit(ask, server, q, **kwargs) for q in questions]
    wait_until(lambda: worker(server)["queue"]["waiting"] == len(questions), 20, f"{len(questions)} queued requests")
    return futures


def first_content(chunks: Iterator) -> str:
    """Read a stream until the model has produced text: the generation is running."""
    text = ""
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            return text
    raise AssertionError("the stream ended before any content")


# ----------------------------------------------------------------- references (a cold, cache-free run)


@pytest.fixture(scope="module")
def reference(nocache_proxy) -> dict:
    """Cold replies: the long in-flight prompt's whole text, and each queued question's reply."""
    c = client(nocache_proxy)
    model = c.models.list().data[0].id
    long_messages = None
    for content in CANDIDATES:
        messages = [{"role": "user", "content": content}]
        reply = c.chat.completions.create(model=model, messages=messages, max_tokens=LONG)
        if reply.choices[0].finish_reason == "length":
            long_messages, long_text = messages, reply.choices[0].message.content
            break
    if long_messages is None:
        pytest.fail(f"no candidate prompt runs {LONG} tokens on this tiny model")
    return {
        "long_messages": long_messages,
        "long_text": long_text,
        "answers": [ask(nocache_proxy, q, model) for q in QUESTIONS],
    }


# ----------------------------------------------------------------- a killed worker


def test_kill_9_fails_the_running_request_and_the_queued_ones_run_on_the_restarted_worker(
    tiny_model, log_dir, reference
):
    # One request in flight, the rest queued in the proxy (batching's own kill test is in test_soak).
    with running_proxy(tiny_model, log_dir, "--keepalive-interval", "0.2", "--max-batch", "1", name="kill9") as server:
        c = client(server)
        first_pid = worker(server)["pid"]
        pids = [first_pid]

        # Streamed: the in-flight request ends with an error event; five queued requests run on the new worker.
        chunks = iter(c.chat.completions.create(
            model="default_model", messages=reference["long_messages"], max_tokens=LONG, stream=True
        ))  # fmt: skip
        first_content(chunks)
        os.kill(first_pid, signal.SIGSTOP)
        with ThreadPoolExecutor(max_workers=5) as pool:
            queued = queue_behind(server, pool, QUESTIONS)
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(openai.APIError) as info:
                for _ in chunks:
                    pass
            assert info.value.code == "worker_unavailable"
            assert "exited with code -9" in info.value.message
            answers = [f.result(timeout=60) for f in queued]
        assert answers == reference["answers"]  # nothing lost, and exactly what a cold run says
        status = worker(server)
        assert status["alive"] and status["pid"] not in pids
        assert process_gone(first_pid)
        assert restarts(server) == 1
        pids.append(status["pid"])

        # Not streamed: the in-flight request gets a 503.
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(
                c.chat.completions.create,
                model="default_model", messages=reference["long_messages"], max_tokens=LONG,
            )  # fmt: skip
            wait_until(lambda: worker(server)["queue"]["running"], 20, "the request to run")
            os.kill(pids[-1], signal.SIGSTOP)
            assert not running.done() and worker(server)["queue"]["running"]  # frozen in flight
            os.kill(pids[-1], signal.SIGKILL)
            with pytest.raises(openai.InternalServerError) as info:
                running.result(timeout=30)
        assert info.value.status_code == 503 and info.value.code == "worker_unavailable"
        assert info.value.response.headers["retry-after"] == "1"  # the SDK's own retry would land on the new worker
        wait_until(lambda: worker(server)["alive"], 30, "the second restart")
        assert ask(server, QUESTIONS[0]) == reference["answers"][0]
        assert restarts(server) == 2
        pids.append(worker(server)["pid"])
        assert len(set(pids)) == 3
    assert server.process.returncode == 0
    assert all(process_gone(pid) for pid in pids)  # no worker left behind


# ----------------------------------------------------------------- a hung worker


def test_hung_worker_is_detected_by_missed_heartbeats_and_restarted(tiny_model, log_dir, reference):
    with running_proxy(tiny_model, log_dir, "--heartbeat-timeout", "3", "--max-batch", "1", name="hung") as server:
        hung_pid = worker(server)["pid"]
        chunks = iter(client(server).chat.completions.create(
            model="default_model", messages=reference["long_messages"], max_tokens=LONG, stream=True
        ))  # fmt: skip
        first_content(chunks)
        os.kill(hung_pid, signal.SIGSTOP)  # alive but silent: no heartbeat, no tokens
        frozen_at = time.monotonic()
        with ThreadPoolExecutor(max_workers=3) as pool:
            queued = queue_behind(server, pool, QUESTIONS[:3])
            with pytest.raises(openai.APIError) as info:
                for _ in chunks:
                    pass
            detected_after = time.monotonic() - frozen_at
            assert info.value.code == "worker_unavailable" and "heartbeat" in info.value.message
            assert 2.5 < detected_after < 15
            answers = [f.result(timeout=60) for f in queued]
        assert answers == reference["answers"][:3]
        assert process_gone(hung_pid)  # the proxy killed the hung worker, and reaped it
        status = worker(server)
        assert status["alive"] and status["pid"] != hung_pid
        assert restarts(server) == 1
        new_pid = status["pid"]
    assert server.process.returncode == 0
    assert process_gone(new_pid)


# ----------------------------------------------------------------- a remote worker


def test_remote_worker_that_comes_back_is_reconnected_and_queued_requests_complete(
    tiny_model, log_dir, reference
):
    worker_port, port = free_port(), free_port()
    worker_argv = [sys.executable, "-m", "proxy.cli", "worker", "--model", str(tiny_model),
                   "--endpoint", f"tcp://127.0.0.1:{worker_port}", "--heartbeat-interval", "0.5",
                   "--max-batch", "1"]  # fmt: skip
    remote = launch(worker_argv, worker_port, log_dir / "remote-worker-1.log")
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--worker", f"{tiny_model}=tcp://127.0.0.1:{worker_port}",
            "--port", str(port), "--heartbeat-timeout", "2"]  # fmt: skip
    server = launch(argv, port, log_dir / "remote-reconnect-proxy.log")
    replacement = None
    try:
        wait_healthy(server)
        model = str(tiny_model)
        assert ask(server, QUESTIONS[0], model) == reference["answers"][0]
        remote.process.kill()
        remote.process.wait(10)
        wait_until(lambda: not worker(server)["alive"], 15, "the proxy to notice the silence")
        with ThreadPoolExecutor(max_workers=2) as pool:
            queued = [pool.submit(ask, server, q, model) for q in QUESTIONS[1:3]]
            wait_until(lambda: worker(server)["queue"]["waiting"] == 2, 20, "2 queued requests")
            replacement = launch(worker_argv, worker_port, log_dir / "remote-worker-2.log")
            answers = [f.result(timeout=120) for f in queued]
        assert answers == reference["answers"][1:3]
        status = worker(server)
        assert status["alive"] and status["pid"] == replacement.process.pid and not status["local"]
        assert restarts(server) == 1
        assert stop(server) == 0
        assert replacement.process.poll() is None  # a remote worker is not the proxy's to stop
    finally:
        stop(server)
        stop(remote)
        if replacement is not None:
            stop(replacement)


# ----------------------------------------------------------------- graceful shutdown


def test_sigterm_finishes_the_running_request_answers_the_queued_with_503_and_exits_0(
    tiny_model, log_dir, reference
):
    with running_proxy(tiny_model, log_dir, "--max-batch", "1", name="drain") as server:
        pid = worker(server)["pid"]
        c = client(server)
        chunks = iter(c.chat.completions.create(
            model="default_model", messages=reference["long_messages"], max_tokens=LONG, stream=True
        ))  # fmt: skip
        text = first_content(chunks)
        os.kill(pid, signal.SIGSTOP)  # hold the running request in flight while the others queue
        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                queued = queue_behind(server, pool, QUESTIONS[:3])
                streamed = pool.submit(lambda: list(c.chat.completions.create(
                    model="default_model", messages=[{"role": "user", "content": "queued stream"}],
                    max_tokens=SHORT, stream=True,
                )))  # fmt: skip
                wait_until(lambda: worker(server)["queue"]["waiting"] == 4, 20, "the queued stream")
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                for future in queued:
                    with pytest.raises(openai.InternalServerError) as info:
                        future.result(timeout=10)
                    error = info.value
                    assert error.status_code == 503 and error.code == "shutting_down"
                    assert set(error.body) == {"message", "type", "param", "code"}
                with pytest.raises(openai.APIError) as info:  # the stream had opened: an error event
                    streamed.result(timeout=10)
                assert info.value.code == "shutting_down"
                with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
                    ask(server, "too late")  # not accepted any more
        finally:
            os.kill(pid, signal.SIGCONT)
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or None
        assert text == reference["long_text"] and finish == "length"  # the running request finished whole
        assert server.process.wait(20) == 0
        assert time.monotonic() - signalled < 15  # --shutdown-timeout 10, plus stopping the worker
    assert process_gone(pid)


def test_ctrl_c_in_the_terminal_lets_the_running_request_finish(tiny_model, log_dir, reference):
    """A Ctrl-C signals the whole process group: the workers, in their own session, must not hear it."""
    port = free_port()
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--model", str(tiny_model), "--port", str(port)]
    log_path = log_dir / "ctrl-c.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    server = Server(process, port, log_path)
    try:
        wait_healthy(server)
        pid = worker(server)["pid"]
        chunks = iter(client(server).chat.completions.create(
            model="default_model", messages=reference["long_messages"], max_tokens=LONG, stream=True
        ))  # fmt: skip
        text = first_content(chunks)
        os.killpg(process.pid, signal.SIGINT)
        text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reference["long_text"]
        assert process.wait(20) == 0
        assert process_gone(pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

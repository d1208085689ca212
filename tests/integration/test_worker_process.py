"""A real worker process over a real ZeroMQ socket, driven with `protocol.codec`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    CacheEvents,
    Connect,
    Error,
    ErrorCode,
    Evict,
    FinishReason,
    Generate,
    Hello,
    Message,
    Ping,
    Result,
    SamplingParams,
    Shutdown,
    Stats,
    Tokens,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "tiny-qwen3-next"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LONG = 20000  # max_tokens of a generation that only ends by abort


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from worker.tiny_models import make_model

    return make_model("qwen3_next", tmp_path_factory.mktemp("model") / "qwen3_next", seed=0)


@pytest.fixture(scope="module")
def socket_dir():
    # ipc paths must stay short (about 100 bytes), so not under pytest's tmp_path.
    path = tempfile.mkdtemp(prefix="mcp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


class Worker:
    def __init__(self, model: Path, socket_dir: str, *extra: str):
        self.endpoint = f"ipc://{socket_dir}/{uuid.uuid4().hex[:8]}.sock"
        command = [sys.executable, "-m", "proxy.cli", "worker", "--model", str(model), "--endpoint", self.endpoint]
        command += ["--model-id", MODEL_ID, "--cache-bytes", "64M", "--log-level", "DEBUG", *extra]
        self.proc = subprocess.Popen(command, cwd=REPO)
        self.context = zmq.Context()
        self.clients: list[Client] = []

    def client(self) -> "Client":
        client = Client(self.context, self.endpoint)
        self.clients.append(client)
        return client

    def connected(self) -> tuple["Client", Hello]:
        """A new proxy-side client through the handshake; the earlier ones are closed (one peer at a time)."""
        for old in self.clients:
            old.socket.close(linger=0)
        self.clients = []
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # as the proxy does: Connect again until the worker has seen the old peer go
            client.send(Connect())
            try:
                hello = client.recv(timeout=0.5, skip_hello=False)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no Hello"
        assert isinstance(hello, Hello), hello
        return client, hello

    def close(self) -> None:
        for client in self.clients:
            client.socket.close(linger=0)
        self.context.term()
        _stop(self.proc)


class Client:
    """The proxy's side: a DEALER."""

    def __init__(self, context: zmq.Context, endpoint: str):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, message: Message) -> None:
        self.socket.send(encode(message))

    def send_raw(self, data: bytes) -> None:
        self.socket.send(data)

    def recv(self, timeout: float = 10.0, skip_stats: bool = True, skip_hello: bool = True) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(left * 1000):
                raise TimeoutError("no message from the worker")
            message = decode(self.socket.recv())
            # A repeated Connect may be answered twice: Hello is read only by the handshake. CacheEvents
            # report the pool, like Stats, whenever it changes (and whole to a new session).
            if not (skip_stats and isinstance(message, (Stats, CacheEvents))) and not (
                skip_hello and isinstance(message, Hello)
            ):
                return message

    def run(self, request: Generate, timeout: float = 30.0) -> tuple[list[Tokens], Message]:
        """Send `request`; its Tokens and its last message (Result or Error)."""
        self.send(request)
        return self.finish(request.request_id, timeout)

    def finish(self, request_id: str, timeout: float = 30.0) -> tuple[list[Tokens], Message]:
        chunks = []
        while True:
            message = self.recv(timeout)
            assert getattr(message, "request_id", None) == request_id, message
            if isinstance(message, Tokens):
                chunks.append(message)
            else:
                return chunks, message


def _tokens(chunks: list[Tokens]) -> list[int]:
    return [t for chunk in chunks for t in chunk.tokens]


def _prompt(seed: int, length: int = 60) -> list[int]:
    return [(seed * 131 + i * 37) % 990 + 3 for i in range(length)]


def _generate(rid: str, prompt: list[int], max_tokens: int = 6, **sampling) -> Generate:
    return Generate(request_id=rid, prompt_tokens=prompt, sampling=SamplingParams(max_tokens=max_tokens, **sampling))


@pytest.fixture(scope="module")
def worker(tiny_model, socket_dir):
    w = Worker(tiny_model, socket_dir, "--heartbeat-interval", "0.3")
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def client(worker) -> Client:
    client, _ = worker.connected()
    return client


@pytest.fixture
def own_worker(tiny_model, socket_dir):
    started: list[Worker] = []

    def start(*extra: str) -> Worker:
        started.append(Worker(tiny_model, socket_dir, *extra))
        return started[-1]

    try:
        yield start
    finally:
        for w in started:
            w.close()


# ----------------------------------------------------------------- handshake


def test_hello_describes_the_model(worker):
    _, hello = worker.connected()
    assert hello.protocol_version == PROTOCOL_VERSION
    assert hello.model_id == MODEL_ID
    assert hello.pid == worker.proc.pid
    assert hello.vocab_size == 1000
    assert hello.context_limit >= 1024
    assert hello.layout.layer_kinds.count("KVCache") == 1
    assert hello.layout.layer_kinds.count("ArraysCache") == 3
    assert hello.layout.cacheable and hello.layout.kv_bytes_per_token > 0 and hello.layout.snapshot_bytes > 0
    assert hello.cache_enabled is True
    assert hello.pool_capacity_bytes == 64 << 20
    assert hello.memory.device_total > 0 and hello.memory.active > 0


def test_connect_with_another_version_is_refused(worker):
    client = worker.client()
    other = PROTOCOL_VERSION + 1
    client.send_raw(msgpack.packb({"v": other, "kind": "connect", "body": {"protocol_version": other}}))
    error = client.recv()
    assert isinstance(error, Error) and error.code is ErrorCode.VERSION_MISMATCH
    # The right frame version but another version inside Connect: refused the same way.
    client.send(Connect(protocol_version=other))
    error = client.recv()
    assert isinstance(error, Error) and error.code is ErrorCode.VERSION_MISMATCH


def test_garbage_gets_bad_request_and_the_worker_carries_on(client):
    client.send_raw(b"\xc1 not msgpack")
    error = client.recv()
    assert isinstance(error, Error) and error.code is ErrorCode.BAD_REQUEST and error.request_id is None
    # A Generate with a wrong field type: the error names the request so it does not hang.
    client.send_raw(
        msgpack.packb({"v": PROTOCOL_VERSION, "kind": "generate", "body": {"request_id": "bad", "prompt_tokens": "x"}})
    )
    error = client.recv()
    assert isinstance(error, Error) and error.code is ErrorCode.BAD_REQUEST and error.request_id == "bad"
    client.send(Ping())
    assert isinstance(client.recv(skip_stats=False), Stats)


def test_frames_before_connect_are_dropped_unanswered(worker):
    client = worker.client()
    client.send(_generate("early", _prompt(1)))
    client.send(Ping())
    with pytest.raises(TimeoutError):
        client.recv(timeout=1.5, skip_stats=False)


# ----------------------------------------------------------------- generation


def test_generate_streams_tokens_then_result(client):
    prompt = _prompt(2, 60)
    chunks, result = client.run(_generate("gen-1", prompt, max_tokens=6))
    assert isinstance(result, Result), result
    assert result.finish_reason is FinishReason.LENGTH
    assert result.generated_tokens == 6 == len(_tokens(chunks))
    assert result.facts.prompt_tokens == 60
    assert result.facts.cached_tokens + result.facts.recomputed_tokens == 60
    assert chunks[0].first_cache_facts is not None and chunks[0].first_cache_facts.prompt_tokens == 60
    assert all(chunk.first_cache_facts is None for chunk in chunks[1:])
    assert result.timings.total_s > 0 and result.memory.active > 0


def test_a_stored_prompt_is_told_as_prefix_blocks(client):
    from protocol.prefix_hash import block_hashes

    prompt = _prompt(9, 200)
    _, result = client.run(_generate("blocks-1", prompt, max_tokens=4))
    assert isinstance(result, Result), result
    stored: set[int] = set()
    deadline = time.monotonic() + 10
    want = set(block_hashes(prompt))  # the prompt's 3 whole blocks: its sequence covers them
    while not want <= stored and time.monotonic() < deadline:
        message = client.recv(skip_stats=False)
        if isinstance(message, CacheEvents):
            stored |= set(message.stored)
    assert want <= stored


def test_stop_token_ends_generation(client):
    prompt = _prompt(3, 50)
    cold, _ = client.run(_generate("stop-1", prompt, max_tokens=8))
    tokens = _tokens(cold)
    i = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    chunks, result = client.run(_generate("stop-2", prompt, max_tokens=8, stop_token_ids=[tokens[i]]))
    assert result.finish_reason is FinishReason.STOP
    assert _tokens(chunks) == tokens[:i] and result.generated_tokens == i


def test_same_prompt_twice_is_served_from_the_cache(client):
    prompt = _prompt(4, 80)
    first_chunks, first = client.run(_generate("twice-1", prompt))
    second_chunks, second = client.run(_generate("twice-2", prompt))
    assert first.facts.cached_tokens == 0
    assert second.facts.cached_tokens > 0
    assert second.facts.cached_tokens + second.facts.recomputed_tokens == 80
    assert _tokens(second_chunks) == _tokens(first_chunks)


def test_bad_token_id_is_a_bad_request(client):
    chunks, error = client.run(_generate("oov", [5, 6, 1_000_000]))
    assert chunks == []
    assert isinstance(error, Error) and error.code is ErrorCode.BAD_REQUEST and error.request_id == "oov"
    _, result = client.run(_generate("after-oov", _prompt(5, 30), max_tokens=2))
    assert isinstance(result, Result) and result.generated_tokens == 2


def test_abort_mid_generation(client):
    client.send(_generate("long", _prompt(6, 40), max_tokens=LONG))
    first = client.recv()
    assert isinstance(first, Tokens) and first.request_id == "long"
    client.send(Abort("long"))
    aborted_at = time.monotonic()
    chunks, result = client.finish("long")
    assert isinstance(result, Result) and result.finish_reason is FinishReason.ABORT
    assert time.monotonic() - aborted_at < 2.0
    assert 1 <= result.generated_tokens < LONG
    assert result.generated_tokens == 1 + len(_tokens(chunks))
    _, after = client.run(_generate("after-abort", _prompt(7, 30), max_tokens=3))
    assert isinstance(after, Result) and after.finish_reason is FinishReason.LENGTH and after.generated_tokens == 3


def test_abort_of_a_queued_request_answers_at_once(client):
    client.send(_generate("running", _prompt(8, 40), max_tokens=LONG))
    assert isinstance(client.recv(), Tokens)
    client.send(_generate("queued", _prompt(9, 33), max_tokens=4))
    client.send(Abort("queued"))
    # The queued request's Result overtakes the running request's tokens.
    while True:
        message = client.recv()
        if message.request_id == "queued":
            break
        assert isinstance(message, Tokens) and message.request_id == "running"
    assert isinstance(message, Result) and message.finish_reason is FinishReason.ABORT
    assert message.generated_tokens == 0 and message.facts.prompt_tokens == 33 and message.facts.cached_tokens == 0
    client.send(Abort("running"))
    _, result = client.finish("running")
    assert result.finish_reason is FinishReason.ABORT
    _, after = client.run(_generate("after-queued", _prompt(10, 30), max_tokens=2))
    assert isinstance(after, Result) and after.generated_tokens == 2


def test_ping_and_heartbeat_send_stats(client):
    client.send(Ping())
    stats = client.recv(skip_stats=False)
    assert isinstance(stats, Stats)
    assert stats.pool.capacity_bytes == 64 << 20 and stats.memory.device_total > 0
    assert stats.running_requests == []
    # Heartbeats come unasked (every 0.3 s here).
    assert isinstance(client.recv(timeout=2.0, skip_stats=False), Stats)


def test_prompt_over_the_context_limit(worker):
    client, hello = worker.connected()
    chunks, error = client.run(_generate("huge", [5] * hello.context_limit))
    assert chunks == []
    assert isinstance(error, Error) and error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and error.request_id == "huge"


def test_evict_empties_the_pool(client):
    prompt = _prompt(13, 50)
    client.run(_generate("evict-1", prompt))
    client.send(Evict(target_bytes=0))
    deadline = time.monotonic() + 5.0
    while True:  # heartbeats may come first; the Evict answers with a Stats of the emptied pool
        stats = client.recv(timeout=deadline - time.monotonic(), skip_stats=False)
        if isinstance(stats, Stats) and stats.pool.bytes == 0:
            break
    assert stats.pool.sequences == 0 and stats.pool.evictions > 0
    _, again = client.run(_generate("evict-2", prompt))
    assert again.facts.cached_tokens == 0


def test_no_cache_worker_recomputes_everything(own_worker):
    w = own_worker("--no-cache")
    client, hello = w.connected()
    assert hello.cache_enabled is False
    prompt = _prompt(14, 40)
    first_chunks, _ = client.run(_generate("nc-1", prompt))
    second_chunks, second = client.run(_generate("nc-2", prompt))
    assert second.facts.cached_tokens == 0 and second.facts.recomputed_tokens == 40
    assert _tokens(second_chunks) == _tokens(first_chunks)


# ----------------------------------------------------------------- lifetime


def test_worker_exits_when_its_parent_dies(own_worker):
    parent = subprocess.Popen(["sleep", "600"])
    try:
        w = own_worker("--parent-pid", str(parent.pid))
        w.connected()
        parent.kill()  # not reaped yet: the worker must see a zombie as dead too
        w.proc.wait(timeout=5.0)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(timeout=STOP_TIMEOUT_S)


def test_sigterm_mid_generation_exits_zero_quickly(own_worker):
    w = own_worker()
    client, _ = w.connected()
    client.send(_generate("busy", _prompt(11, 40), max_tokens=LONG))
    assert isinstance(client.recv(), Tokens)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=3.0) == 0
    assert not os.path.exists(w.endpoint[len("ipc://"):])


def test_shutdown_aborts_the_running_request_and_exits(own_worker):
    w = own_worker()
    client, _ = w.connected()
    client.send(_generate("busy", _prompt(12, 40), max_tokens=LONG))
    assert isinstance(client.recv(), Tokens)
    client.send(Shutdown())
    _, result = client.finish("busy")
    assert isinstance(result, Result) and result.finish_reason is FinishReason.ABORT
    assert w.proc.wait(timeout=5.0) == 0

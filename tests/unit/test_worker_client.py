"""The proxy's socket end against a scripted ROUTER: handshake, dispatch, death."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio

from protocol.codec import decode, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    CacheFacts,
    CacheLayout,
    Connect,
    Error,
    ErrorCode,
    FinishReason,
    Generate,
    Hello,
    MemoryStats,
    PoolStats,
    Progress,
    RestoreKind,
    Result,
    SamplingParams,
    Stats,
    Timings,
    TokenFrame,
    Tokens,
)
from proxy.errors import ContextLengthExceeded, WorkerUnavailable
from proxy.worker_client import WorkerClient, WorkerStartError, WorkerVersionMismatch

HELLO = Hello(
    protocol_version=PROTOCOL_VERSION,
    model_id="m",
    context_limit=1024,
    vocab_size=100,
    layout=CacheLayout(layer_kinds=["KVCache"], kv_bytes_per_token=8, snapshot_bytes=0, cacheable=True),
    memory=MemoryStats(),
    cache_enabled=True,
    pool_capacity_bytes=1 << 20,
    pid=4242,
)
FACTS = CacheFacts(3, 0, 3, 0, RestoreKind.NONE, PoolStats())


@pytest.fixture
async def zmq_context():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def router(zmq_context):
    socket = zmq_context.socket(zmq.ROUTER)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)


def make_client(context, endpoint, *, timeout=5.0) -> WorkerClient:
    return WorkerClient("m", endpoint, context=context, heartbeat_interval=0.05, heartbeat_timeout=timeout)


async def answer_connect(socket, reply: bytes) -> bytes:
    envelope, frame = await socket.recv_multipart()
    assert isinstance(decode(frame), Connect)
    await socket.send_multipart([envelope, reply])
    return envelope


async def test_handshake_keeps_hello(zmq_context, router):
    socket, endpoint = router
    client = make_client(zmq_context, endpoint)
    server = asyncio.create_task(answer_connect(socket, encode(HELLO)))
    hello = await client.connect(timeout=5)
    await server
    assert hello == HELLO and client.alive
    await client.close(shutdown=False)
    assert not client.alive


async def test_version_mismatch_error_is_refused(zmq_context, router):
    socket, endpoint = router
    client = make_client(zmq_context, endpoint)
    refusal = encode(Error(ErrorCode.VERSION_MISMATCH, "worker speaks 2"))
    asyncio.create_task(answer_connect(socket, refusal))
    with pytest.raises(WorkerVersionMismatch, match="refused protocol version"):
        await client.connect(timeout=5)
    await client.close(shutdown=False)


async def test_frame_of_another_version_is_refused(zmq_context, router):
    socket, endpoint = router
    client = make_client(zmq_context, endpoint)
    future_frame = msgpack.packb({"v": 99, "kind": "hello", "body": {}})
    asyncio.create_task(answer_connect(socket, future_frame))
    with pytest.raises(WorkerVersionMismatch, match="version 99"):
        await client.connect(timeout=5)
    await client.close(shutdown=False)


async def test_worker_exit_during_start_is_reported(zmq_context, router):
    _, endpoint = router
    client = make_client(zmq_context, endpoint)
    exited = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, exited.set_result, 3)
    with pytest.raises(WorkerStartError, match="exited with code 3"):
        await client.connect(timeout=5, exited=exited)
    await client.close(shutdown=False)


async def test_handshake_timeout(zmq_context, router):
    _, endpoint = router
    client = make_client(zmq_context, endpoint)
    with pytest.raises(WorkerStartError, match="did not complete the handshake"):
        await client.connect(timeout=0.1)
    await client.close(shutdown=False)


async def connected(zmq_context, router, **kwargs):
    socket, endpoint = router
    client = make_client(zmq_context, endpoint, **kwargs)
    server = asyncio.create_task(answer_connect(socket, encode(HELLO)))
    await client.connect(timeout=5)
    return client, await server


def generate(request_id: str) -> Generate:
    return Generate(request_id=request_id, prompt_tokens=[1, 2, 3], sampling=SamplingParams(max_tokens=2))


async def test_messages_reach_their_request_in_order(zmq_context, router):
    socket, _ = router
    client, envelope = await connected(zmq_context, router)
    first, second = client.submit(generate("a")), client.submit(generate("b"))
    for _ in range(2):
        _, frame = await socket.recv_multipart()
        assert isinstance(decode(frame), Generate)
    result = Result("a", FinishReason.LENGTH, 2, FACTS, Timings(), MemoryStats())
    for message in (
        Progress("a", 3, 3),
        Stats(memory=MemoryStats(), pool=PoolStats(bytes=7)),
        Tokens("a", [5, 6], first_cache_facts=FACTS),
        Error(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "too long", "b"),
        result,
    ):
        await socket.send_multipart([envelope, encode(message)])
    assert isinstance(await first.get(1), Progress)
    tokens = await first.get(1)
    assert isinstance(tokens, Tokens) and tokens.tokens == [5, 6]
    assert await first.get(1) == result and first.finished
    with pytest.raises(ContextLengthExceeded):
        await second.get(1)
    assert client.stats is not None and client.stats.pool.bytes == 7
    await client.close(shutdown=False)


async def test_token_frame_parts_reach_their_requests_as_lone_tokens_would(zmq_context, router):
    socket, _ = router
    client, envelope = await connected(zmq_context, router)
    a, b, c = client.submit(generate("a")), client.submit(generate("b")), client.submit(generate("c"))
    for _ in range(3):
        await socket.recv_multipart()
    for message in (
        TokenFrame([Tokens("a", [1], first_cache_facts=FACTS), Tokens("b", [2]), Tokens("gone", [9])]),
        Result("c", FinishReason.STOP, 0, FACTS, Timings(), MemoryStats()),
        TokenFrame([Tokens("b", [3]), Tokens("c", [4]), Tokens("a", [5, 6])]),  # c finished: its part is dropped
        Tokens("b", [7]),
        Result("a", FinishReason.LENGTH, 3, FACTS, Timings(decode_steps=2, batch_size_max=2), MemoryStats()),
    ):
        await socket.send_multipart([envelope, encode(message)])
    first = await a.get(1)
    assert first.tokens == [1] and first.first_cache_facts == FACTS
    assert (await a.get(1)).tokens == [5, 6]
    result = await a.get(1)
    assert isinstance(result, Result) and result.timings.batch_size_max == 2 and a.finished
    assert [(await b.get(1)).tokens for _ in range(3)] == [[2], [3], [7]]
    assert isinstance(await c.get(1), Result) and await c.get(0.1) is None
    assert client.alive and set(client._channels) == {"b"}
    await client.close(shutdown=False)


async def test_abort_is_sent(zmq_context, router):
    socket, _ = router
    client, _ = await connected(zmq_context, router)
    client.abort("x")
    _, frame = await socket.recv_multipart()
    assert decode(frame).request_id == "x"
    await client.close(shutdown=False)


async def test_silent_worker_is_declared_dead_and_fails_requests(zmq_context, router):
    client, _ = await connected(zmq_context, router, timeout=0.2)
    channel = client.submit(generate("a"))
    with pytest.raises(WorkerUnavailable, match="heartbeat"):
        while True:
            await channel.get(2)
    assert not client.alive and channel.finished
    with pytest.raises(WorkerUnavailable):
        client.submit(generate("b"))
    await client.close(shutdown=False)


async def test_fail_from_the_process_watch(zmq_context, router):
    client, _ = await connected(zmq_context, router)
    channel = client.submit(generate("a"))
    client.fail("worker process exited with code -9")
    with pytest.raises(WorkerUnavailable, match="exited with code -9"):
        await channel.get(1)
    await client.close(shutdown=False)

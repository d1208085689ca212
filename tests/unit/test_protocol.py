"""The wire codec: every message round-trips; every malformed frame is a ProtocolError."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from protocol.codec import ProtocolError, decode, encode, frame_version
from protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    CacheEvents,
    Abort,
    CacheFacts,
    CacheLayout,
    Connect,
    Error,
    ErrorCode,
    Evict,
    FinishReason,
    Generate,
    Hello,
    MemoryStats,
    Ping,
    PoolStats,
    Progress,
    RestoreKind,
    Result,
    SamplingParams,
    Shutdown,
    Stats,
    Timings,
    TokenFrame,
    TokenLogprob,
    Tokens,
    TopLogprob,
)

MEMORY = MemoryStats(active=11, peak=22, cache=33, device_total=44 << 30, recommended_working_set=40 << 30, pool_bytes=55)
POOL = PoolStats(
    bytes=1000, capacity_bytes=8 << 30, sequences=3, checkpoints=7, evictions=2,
    leases=2, pinned_sequences=1, pinned_checkpoints=4,
)
LAYOUT = CacheLayout(
    layer_kinds=["ArraysCache", "ArraysCache", "KVCache"],
    kv_bytes_per_token=256,
    snapshot_bytes=16896,
    cacheable=False,
    uncached_reason="no adapter for FancyCache",
)
FACTS = CacheFacts(
    prompt_tokens=120,
    cached_tokens=100,
    recomputed_tokens=20,
    restore_point=100,
    restore_kind=RestoreKind.LATTICE,
    pool=POOL,
)

# At least one instance per message type, with fields away from their defaults;
# optional fields both None and set.
SAMPLES = [
    Connect(protocol_version=PROTOCOL_VERSION),
    Hello(
        protocol_version=PROTOCOL_VERSION,
        model_id="tiny-qwen3-next",
        context_limit=32768,
        vocab_size=1000,
        layout=LAYOUT,
        memory=MEMORY,
        cache_enabled=False,
        pool_capacity_bytes=512 << 20,
        pid=4242,
        max_batch=8,
    ),
    Generate(
        request_id="req-1",
        prompt_tokens=[1, 2, 3, 999],
        sampling=SamplingParams(
            max_tokens=7,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            seed=1234,
            stop_token_ids=[2, 5],
            top_logprobs=3,
            presence_penalty=0.5,
            frequency_penalty=-1.25,
            frequency_context_size=64,
            logit_bias_ids=[3, 17],
            logit_bias_values=[-100.0, 2.5],
        ),
        checkpoint_hints=[2, 4],
        progress_every=64,
    ),
    Generate(request_id="req-2", prompt_tokens=[7], sampling=SamplingParams(seed=None)),
    Progress(request_id="req-1", processed=512, total=1024),
    Tokens(
        request_id="req-1",
        tokens=[17, 18],
        logprobs=[
            TokenLogprob(token=17, logprob=-0.25, top=[TopLogprob(17, -0.25), TopLogprob(3, -1.5)]),
            TokenLogprob(token=18, logprob=-2.0),
        ],
        first_cache_facts=FACTS,
    ),
    Tokens(request_id="req-1", tokens=[19], first_cache_facts=None),
    TokenFrame(parts=[Tokens(request_id="req-1", tokens=[20]), Tokens(request_id="req-2", tokens=[3, 4])]),
    TokenFrame(parts=[]),
    Result(
        request_id="req-1",
        finish_reason=FinishReason.ABORT,
        generated_tokens=5,
        facts=FACTS,
        timings=Timings(
            restore_s=0.001, prefill_s=0.5, ttft_s=0.6, decode_s=1.25, total_s=1.9,
            decode_steps=4, batch_size_max=3, batch_size_mean=2.5,
        ),
        memory=MEMORY,
    ),
    Abort(request_id="req-1"),
    Error(code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long", request_id="req-1"),
    Error(code=ErrorCode.WORKER_DIED, message="gone", request_id=None),
    Ping(),
    Stats(memory=MEMORY, pool=POOL, running_requests=["req-1", "req-2"]),
    Stats(memory=MEMORY, pool=POOL, running_requests=[]),
    CacheEvents(64, stored=[1, (1 << 63) - 1], removed=[7], reset=True),
    CacheEvents(64),
    Evict(target_bytes=1 << 20),
    Shutdown(),
]


def _frame(kind: str, body, version=PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": version, "kind": kind, "body": body}, use_bin_type=True)


def _body(message) -> dict:
    return msgpack.unpackb(encode(message), raw=False)["body"]


def test_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    decoded = decode(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_round_trip_keeps_types_of_nested_records_and_enums():
    result = decode(encode(next(m for m in SAMPLES if isinstance(m, Result))))
    assert type(result.finish_reason) is FinishReason
    assert type(result.facts) is CacheFacts and type(result.facts.pool) is PoolStats
    assert type(result.facts.restore_kind) is RestoreKind
    tokens = decode(encode(SAMPLES[5]))
    assert type(tokens.logprobs[0].top[0]) is TopLogprob
    frame = decode(encode(next(m for m in SAMPLES if isinstance(m, TokenFrame))))
    assert [type(part) for part in frame.parts] == [Tokens, Tokens]


def test_integer_is_accepted_for_a_float_field():
    body = _body(SAMPLES[2])
    body["sampling"]["temperature"] = 1
    message = decode(_frame("generate", body))
    assert message.sampling.temperature == 1.0 and type(message.sampling.temperature) is float


def test_unknown_kind():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(_frame("teleport", {}))


def test_other_version():
    data = _frame("connect", {"protocol_version": PROTOCOL_VERSION + 1}, version=PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolError, match="version"):
        decode(data)
    assert frame_version(data) == PROTOCOL_VERSION + 1


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([PROTOCOL_VERSION, "ping", {}]),
        msgpack.packb("ping"),
        msgpack.packb({"v": PROTOCOL_VERSION, "kind": "ping"}),  # no body
        _frame("ping", [1, 2]),  # body is not a map
    ],
    ids=["list", "string", "no-body", "body-list"],
)
def test_not_a_frame_map(data):
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x82\xa1v", b"not msgpack at all \xff\xfe"])
def test_garbage_bytes(data):
    with pytest.raises(ProtocolError):
        decode(data)
    assert frame_version(data) is None


@pytest.mark.parametrize(
    "kind, body",
    [
        ("abort", {"request_id": 5}),
        ("evict", {"target_bytes": "lots"}),
        ("evict", {"target_bytes": True}),  # a bool is not an int on the wire
        ("evict", {"target_bytes": 1.5}),
        ("generate", {"request_id": "r", "prompt_tokens": "1 2 3", "sampling": {}}),
        ("generate", {"request_id": "r", "prompt_tokens": [1, "2"], "sampling": {}}),
        ("generate", {"request_id": "r", "prompt_tokens": [1], "sampling": [256]}),
        ("generate", {"request_id": "r", "prompt_tokens": [1], "sampling": {"temperature": "hot"}}),
        ("error", {"code": "no_such_code", "message": "x"}),
        ("error", {"code": "internal_error", "message": "x", "request_id": 7}),
        ("token_frame", {"parts": {"request_id": "r", "tokens": [1]}}),  # not a list
        ("token_frame", {"parts": [{"request_id": "r", "tokens": ["1"]}]}),
        ("token_frame", {"parts": [{"tokens": [1]}]}),  # a part without its request id
        ("stats", {"memory": {}, "pool": {}, "running_requests": "req-1"}),
    ],
)
def test_wrong_field_type(kind, body):
    with pytest.raises(ProtocolError):
        decode(_frame(kind, body))


def test_unknown_field():
    with pytest.raises(ProtocolError, match="unknown fields"):
        decode(_frame("abort", {"request_id": "r", "priority": 1}))


def test_unknown_field_in_a_nested_record():
    body = _body(SAMPLES[2])
    body["sampling"]["beam_width"] = 4
    with pytest.raises(ProtocolError, match="unknown fields"):
        decode(_frame("generate", body))


def test_kind_tag_is_not_a_field():
    with pytest.raises(ProtocolError):
        decode(_frame("abort", {"request_id": "r", "KIND": "abort"}))


def test_missing_required_field():
    with pytest.raises(ProtocolError):
        decode(_frame("abort", {}))


def test_missing_required_field_in_a_nested_record():
    body = _body(SAMPLES[1])
    del body["layout"]["kv_bytes_per_token"]
    with pytest.raises(ProtocolError):
        decode(_frame("hello", body))


def test_encode_refuses_a_non_message():
    with pytest.raises(ProtocolError):
        encode(POOL)


def test_protocol_imports_no_mlx():
    code = (
        "import sys, protocol.messages, protocol.codec\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

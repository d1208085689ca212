"""Every message that crosses the proxy <-> worker boundary, and nothing else.

Each message is a frozen dataclass with a `KIND` tag; nested records (sampling
parameters, cache facts, memory figures) are plain frozen dataclasses too.
`protocol.codec` turns them into msgpack and back; nothing here imports MLX.

Conversation shape (the worker binds a ROUTER socket, the proxy connects a DEALER):

    proxy  -> worker   Connect                      (handshake opens)
    worker -> proxy    Hello | Error(version_mismatch)
    proxy  -> worker   Generate / Abort / Ping / Shutdown / Evict
    worker -> proxy    Progress*, Tokens* | TokenFrame*, Result | Error   (per request; a
                       TokenFrame carries several running requests' Tokens at once)
    worker -> proxy    Stats                        (heartbeat, and the answer to Ping)
    worker -> proxy    CacheEvents                  (which prefix blocks its pool can restore: changes)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import ClassVar, Optional

PROTOCOL_VERSION = 5  # 5: CacheEvents (prefix blocks stored / removed, for routing among replicas)

# Split points (structural boundaries the proxy finds inside long messages) are sent for the last
# this many tokens of a prompt, at most MAX_SPLIT_POINTS of them: the worker's ladder of checkpoints
# back from a prompt's end reaches no further (worker/placement.py).
SPLIT_POINTS_REACH = 4096
MAX_SPLIT_POINTS = 512


class SplitKind(IntEnum):
    """What a split point starts (Generate.split_kinds): stronger boundaries are preferred."""

    SENTENCE = 0  # one of a long message's last sentences
    LINE = 1
    PARAGRAPH = 2  # after an empty line


class FinishReason(str, Enum):
    STOP = "stop"  # an end-of-sequence or stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the proxy asked to stop (client disconnect)


class ErrorCode(str, Enum):
    VERSION_MISMATCH = "version_mismatch"
    BAD_REQUEST = "bad_request"
    BUSY = "busy"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INTERNAL = "internal_error"
    WORKER_DIED = "worker_died"


class RestoreKind(str, Enum):
    """Why a restore point existed where the lookup found it."""

    NONE = "none"  # nothing restored: a cold prefill
    TRIM = "trim"  # every layer trimmable: KV cut back to the common prefix
    HINT = "hint"  # a message boundary the proxy hinted
    PROMPT_END = "prompt_end"
    GENERATION_END = "generation_end"
    LATTICE = "lattice"  # the every-N-tokens lattice
    FORK = "fork"  # where an earlier prompt diverged from a stored sequence
    TAIL = "tail"  # a little before a prompt's end, where the next prompt often diverges


# ----------------------------------------------------------------- records


class GrammarKind(str, Enum):
    """The form of a Grammar's text."""

    LLGUIDANCE = "llguidance"  # llguidance's grammar JSON (what its grammar_from_* functions return)


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match (constrained decoding); the proxy has checked that it compiles."""

    kind: GrammarKind
    text: str


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, already validated by the proxy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: list[int] = field(default_factory=list)
    top_logprobs: int = -1  # -1: no logprobs; 0: chosen token only; n: also n alternatives
    # mlx-lm's logits processors (mlx_lm.sample_utils.make_logits_processors), as mlx_lm.server applies
    # them: each penalty looks at the last *_context_size tokens of prompt + output; 0 / empty: off.
    repetition_context_size: int = 20
    presence_penalty: float = 0.0  # minus this for a token seen in the context
    presence_context_size: int = 20
    frequency_penalty: float = 0.0  # minus this for each time a token occurs in the context
    frequency_context_size: int = 20
    logit_bias_ids: list[int] = field(default_factory=list)  # logit_bias_values[i] is added to token logit_bias_ids[i]
    logit_bias_values: list[float] = field(default_factory=list)
    grammar: Optional[Grammar] = None  # None: unconstrained


@dataclass(frozen=True)
class MemoryStats:
    """Memory figures of the worker process, in bytes."""

    active: int = 0  # MLX active memory
    peak: int = 0  # MLX peak memory since start
    cache: int = 0  # MLX buffer cache
    device_total: int = 0  # device memory size
    recommended_working_set: int = 0  # device recommended working set (0: unknown)
    pool_bytes: int = 0


@dataclass(frozen=True)
class CacheLayout:
    """What the model's cache looks like, so the proxy can reason about memory."""

    layer_kinds: list[str]  # one cache class name per layer, e.g. "KVCache", "ArraysCache"
    kv_bytes_per_token: int  # bytes of full-attention KV one token adds
    snapshot_bytes: int  # bytes one checkpoint snapshot holds (0 for KV-only models)
    cacheable: bool  # False when some layer kind has no snapshot adapter
    uncached_reason: str = ""


@dataclass(frozen=True)
class PoolStats:
    bytes: int = 0
    capacity_bytes: int = 0
    sequences: int = 0
    checkpoints: int = 0
    evictions: int = 0
    disk: DiskStats | None = None  # None when the disk tier is off
    leases: int = 0  # caches checked out to running requests
    pinned_sequences: int = 0  # stored sequences a running request holds (never evicted)
    pinned_checkpoints: int = 0  # checkpoints a running request holds


@dataclass(frozen=True)
class DiskStats:
    """The disk tier's figures, cumulative since the worker started (bytes, entries now)."""

    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    load_seconds: float = 0.0
    corrupt: int = 0
    write_failures: int = 0  # writes that failed (full disk, I/O error): dropped, their memory freed
    pending_bytes: int = 0  # bytes waiting in memory for the writer


@dataclass(frozen=True)
class CacheFacts:
    """What the pool did for one request."""

    prompt_tokens: int
    cached_tokens: int  # restored from the pool, not computed
    recomputed_tokens: int  # prompt tokens computed by this request
    restore_point: int  # token position the cache was restored to
    restore_kind: RestoreKind
    pool: PoolStats
    restored_from_disk: bool = False


@dataclass(frozen=True)
class Timings:
    """Seconds spent in the worker on one request."""

    restore_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the worker receiving Generate to the first token
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0  # batched decode steps this request took part in
    batch_size_max: int = 1  # the largest decode batch it ran in
    batch_size_mean: float = 1.0  # mean decode batch size over its steps


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class TopLogprob:
    token: int
    logprob: float


# ----------------------------------------------------------------- messages


class Message:
    """Base of every wire message; `KIND` is the tag on the wire."""

    KIND: ClassVar[str] = ""


@dataclass(frozen=True)
class Connect(Message):
    """The proxy opens the handshake."""

    KIND: ClassVar[str] = "connect"
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Hello(Message):
    """The worker's answer to Connect: what it serves."""

    KIND: ClassVar[str] = "hello"
    protocol_version: int
    model_id: str
    context_limit: int
    vocab_size: int
    layout: CacheLayout
    memory: MemoryStats
    cache_enabled: bool
    pool_capacity_bytes: int
    pid: int
    memory_limit: int = 0  # the worker's memory budget (bytes); 0: none known
    activation_bytes: int = 0  # measured peak of one prefill chunk
    max_batch: int = 1  # requests the worker runs at once; the proxy keeps this many in flight


@dataclass(frozen=True)
class Generate(Message):
    """Run one generation: prefill `prompt_tokens`, then decode."""

    KIND: ClassVar[str] = "generate"
    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    checkpoint_hints: list[int] = field(default_factory=list)  # token offsets of message ends
    split_points: list[int] = field(default_factory=list)  # line / paragraph / sentence starts near the end
    split_kinds: list[int] = field(default_factory=list)  # a SplitKind per split point
    progress_every: int = 0  # send Progress every N prefilled tokens (0: never)
    # The cache namespace: prefixes are stored and restored only inside one. A digest the proxy
    # derives from the client's API key and cache_salt (never the key itself); "" is the shared one.
    namespace: str = ""


@dataclass(frozen=True)
class Progress(Message):
    """Prefill progress of a running request."""

    KIND: ClassVar[str] = "progress"
    request_id: str
    processed: int  # prompt tokens done, restored ones included
    total: int


@dataclass(frozen=True)
class Tokens(Message):
    """Newly generated tokens of a running request."""

    KIND: ClassVar[str] = "tokens"
    request_id: str
    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_cache_facts: Optional[CacheFacts] = None  # sent with the first chunk only


@dataclass(frozen=True)
class TokenFrame(Message):
    """The Tokens of several running requests, sent together after one batched decode step."""

    KIND: ClassVar[str] = "token_frame"
    parts: list[Tokens]


@dataclass(frozen=True)
class Result(Message):
    """A request finished; the last message for its id."""

    KIND: ClassVar[str] = "result"
    request_id: str
    finish_reason: FinishReason
    generated_tokens: int
    facts: CacheFacts
    timings: Timings
    memory: MemoryStats


@dataclass(frozen=True)
class Abort(Message):
    """Stop a request (queued or running) as soon as possible."""

    KIND: ClassVar[str] = "abort"
    request_id: str


@dataclass(frozen=True)
class Error(Message):
    """A typed failure, of one request (request_id set) or of the worker."""

    KIND: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    request_id: Optional[str] = None


@dataclass(frozen=True)
class Ping(Message):
    KIND: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Stats(Message):
    """Heartbeat: the worker is alive, and how it is doing."""

    KIND: ClassVar[str] = "stats"
    memory: MemoryStats
    pool: PoolStats
    running_requests: list[str] = field(default_factory=list)  # ids the engine is running now


@dataclass(frozen=True)
class CacheEvents(Message):
    """Prefix blocks that became restorable in the worker's pool (stored) or stopped being (removed).

    A block is PREFIX_BLOCK_TOKENS tokens at a block boundary, named by its chained hash
    (`protocol.prefix_hash`, the namespace in the seed). `reset`: `stored` is the whole set,
    forget every earlier block (a new proxy session); a large change comes in several messages,
    only the first of them a reset. The proxy routes requests by these (proxy/routing.py).
    """

    KIND: ClassVar[str] = "cache_events"
    block_tokens: int
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    reset: bool = False


@dataclass(frozen=True)
class Evict(Message):
    """Ask the worker to shrink its pool to at most `target_bytes`."""

    KIND: ClassVar[str] = "evict"
    target_bytes: int


@dataclass(frozen=True)
class Shutdown(Message):
    """Abort the running and queued requests (each still gets its Result) and exit."""

    KIND: ClassVar[str] = "shutdown"


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Connect,
    Hello,
    Generate,
    Progress,
    Tokens,
    TokenFrame,
    Result,
    Abort,
    Error,
    Ping,
    Stats,
    CacheEvents,
    Evict,
    Shutdown,
)

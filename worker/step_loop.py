"""The engine loop: several requests at once, one small step at a time.

    loop = StepLoop(engine, max_batch=8)
    loop.submit(request, emit, should_abort)      # any number; they wait in arrival order
    while loop.busy:
        loop.step()

A step: admit waiting requests (arrival order, up to `max_batch` running, only
when the whole batch fits in memory), run one prefill chunk of the oldest
prefilling request, then one batched decode step of every decoding request,
then send what came out (several requests' tokens in one TokenFrame) and retire
what finished (its cache goes back to the pool). A newcomer's TTFT never waits
for others to finish; the decoding ones stall at most one chunk per step.
Aborts are read between steps, never inside one.

A request whose prompt shares a prefix, not yet stored, with a request that is
prefilling waits for that request to pass the shared part (a FORK checkpoint is
added to its prefill) and then forks from it, so a shared system prompt is
prefilled once, as a radix-aware scheduler does. A running request's prefix is
forked from its live cache while it prefills, or from its row of the batch.
A request whose whole prompt is a running one's (its twin: the n choices of one
OpenAI request) waits for the twin's prompt end and forks there with its logits,
so it computes no prompt token at all.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import make_sampler

from protocol.messages import (
    CacheFacts,
    Error,
    ErrorCode,
    FinishReason,
    Generate,
    Message,
    Progress,
    RestoreKind,
    Result,
    SplitKind,
    Timings,
    TokenLogprob,
)
from worker.decode_batch import DecodeBatch, Member
from worker.memory import memory_stats
from worker.memory_guard import InsufficientMemory
from worker.pool import Checkpoint, Lease, TakenCheckpoint
from worker.sampling import mlx_lm_processors
from worker.token_frames import TokenFrames
from worker.trie import common_prefix_length

log = logging.getLogger("mlx_cache_proxy.worker")

# A request waits for a running prefill only when that saves at least this many tokens.
MIN_JOIN_TOKENS = 64
# A long prefill says how far it is at most this often (one INFO line), so its minutes are not silent.
PREFILL_LOG_INTERVAL_S = 5.0
MAX_SAMPLERS = 64  # distinct sampling settings kept, each one sampler object


class Phase(str, Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"


@dataclass
class Running:
    """One request's state in the loop."""

    request: Generate
    emit: Callable[[Message], None]
    should_abort: Callable[[], bool]
    received_at: float
    phase: Phase = Phase.WAITING
    lease: Optional[Lease] = None
    position: int = 0  # prompt tokens the cache has consumed
    stops: list[int] = field(default_factory=list)  # prefill positions to stop at (checkpoints)
    taken: list[TakenCheckpoint] = field(default_factory=list)
    facts: Optional[CacheFacts] = None
    generated: int = 0
    admitted_at: float = 0.0
    prefill_s: float = 0.0
    first_token_at: Optional[float] = None
    steps: int = 0
    batch_sum: int = 0
    batch_max: int = 1
    waiting_for: Optional["Running"] = None
    prefill_from: int = 0  # the restore point: where prefilling began
    progress_logged_at: float = 0.0
    grammar: Optional[Callable] = None  # the request's grammar mask (a logits processor), if it has one

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def rid(self) -> str:
        return self.request.request_id

    @property
    def namespace(self) -> str:
        return self.request.namespace

    @property
    def splits(self) -> list[tuple[int, int]]:
        """(position, SplitKind) of the split points the proxy sent (a line start when it sent no kinds)."""
        kinds = self.request.split_kinds or [SplitKind.LINE] * len(self.request.split_points)
        return list(zip(self.request.split_points, kinds))


class StepLoop:
    def __init__(self, engine: Any, max_batch: int = 1):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.waiting: deque[Running] = deque()
        self.prefilling: list[Running] = []
        self.decoding: dict[str, Running] = {}
        self.batch = DecodeBatch(engine.model, engine.batchable)
        self.frames = TokenFrames()
        self._samplers: dict[tuple, Callable] = {}
        self.results: dict[str, Result] = {}  # the last Result per request (for in-process callers)

    # ------------------------------------------------------------- public

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def running_ids(self) -> list[str]:
        return [r.rid for r in self.prefilling] + list(self.decoding)

    def submit(self, request: Generate, emit: Callable[[Message], None], should_abort: Callable[[], bool]) -> None:
        """Queue a request; a prompt that can never run raises ValueError (ContextLengthExceeded) here."""
        self.engine.validate(list(request.prompt_tokens), request.sampling)
        grammar = self.engine.grammar_processor(request.sampling.grammar)  # GrammarError is a ValueError
        self.waiting.append(Running(request, emit, should_abort, time.perf_counter(), grammar=grammar))

    def step(self) -> None:
        with mx.stream(generation_stream):
            self._abort_waiting()
            self._admit()
            self._prefill_one_chunk()
            self._abort_decoding()
            self._decode()
            self.frames.flush_due()

    def abort_all(self) -> None:
        """Finish everything now as aborted (shutdown): running requests keep what they computed."""
        with mx.stream(generation_stream):
            for r in list(self.waiting):
                self._finish_unstarted(r)
            self.waiting.clear()
            prefilling, self.prefilling = self.prefilling, []
            for r in prefilling:
                self._retire_prefill(r, FinishReason.ABORT)
            for rid in list(self.decoding):
                self._retire_decoding(rid, FinishReason.ABORT, removed=True)

    def fail_all(self, code: ErrorCode, message: str) -> None:
        """A step failed: every request in the loop gets `code`; leases go back without their caches."""
        for r in [*self.waiting, *self.prefilling, *self.decoding.values()]:
            if r.lease is not None:
                self.engine.discard(r.lease)
            self._fail(r, code, message)
        self.waiting.clear()
        self.prefilling.clear()
        self.decoding.clear()
        self.batch = DecodeBatch(self.engine.model, self.engine.batchable)
        self.frames = TokenFrames()
        mx.clear_cache()

    # ------------------------------------------------------------- admission

    def _abort_waiting(self) -> None:
        for r in [r for r in self.waiting if r.should_abort()]:
            self.waiting.remove(r)
            self._finish_unstarted(r)

    def _admit(self) -> None:
        reserved = 0  # requests waiting for a running prefill keep their place in the batch
        for r in list(self.waiting):
            if self.running + reserved >= self.max_batch:
                return
            donor = self._donor(r)
            if donor == "wait":
                reserved += 1
                continue
            try:
                lease = self._lease(r, donor)
            except InsufficientMemory as exc:
                if self.running:
                    return  # the batch is full for memory: wait for someone to finish
                self.waiting.remove(r)
                self._fail(r, ErrorCode.INSUFFICIENT_MEMORY, str(exc))
                continue
            except Exception as exc:
                log.exception("request %s: restore failed", r.rid)
                self.waiting.remove(r)
                self._fail(r, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                continue
            self.waiting.remove(r)
            self._start(r, lease)

    def _donor(self, r: Running):
        """A running request to fork `r` from: (donor, position, snapshot, logits), "wait", or None.

        Logits come only with a twin's prompt end: nothing is left to compute.
        """
        if not self.engine.cache_enabled or not (self.prefilling or self.decoding):
            return None
        twin = self._twin(r)
        if twin is not None:
            return twin
        floor = self.engine.restore_point(r.prompt, r.namespace)
        best = None
        wait_for = None
        for other in [*self.prefilling, *self.decoding.values()]:
            if other.namespace != r.namespace:
                continue  # prefixes are shared only inside a cache namespace
            shared = min(common_prefix_length(r.prompt, other.prompt), len(r.prompt) - 1)
            if shared <= floor:
                continue
            if self.engine.needs_snapshots:
                ready = [t for t in other.taken if t.position <= shared and t.snapshot is not None]
                point = max(ready, key=lambda t: t.position, default=None)
                depth = point.position if point is not None else 0
            else:
                point, depth = None, min(shared, other.position)
            # Prefills run one at a time, oldest first: waiting for an older prefill to pass the
            # shared part costs no time, and saves computing it twice.
            if other.phase is Phase.PREFILLING and other.position < shared and shared - floor >= MIN_JOIN_TOKENS:
                if wait_for is None or shared > wait_for[1]:
                    wait_for = (other, shared)
            elif depth > floor and (best is None or depth > best[1]):
                best = (other, depth, point.snapshot if point is not None else None, None)
        if wait_for is not None and (best is None or wait_for[1] > best[1]):
            other, shared = wait_for
            self._add_stop(other, shared)
            if r.waiting_for is not other:
                r.waiting_for = other
                log.info("request %s: waits for %s to prefill the %d tokens they share", r.rid, other.rid, shared)
            return "wait"
        r.waiting_for = None
        return best

    def _twin(self, r: Running):
        """A running request with the very same prompt to fork from at its end: (twin, n, snapshot, logits) or "wait".

        A prompt end is always a checkpoint, with its logits, so waiting for a twin's prefill
        adds no stop to it (MIN_JOIN_TOKENS does not apply).
        """
        for other in [*self.prefilling, *self.decoding.values()]:
            if other.namespace != r.namespace or other.prompt != r.prompt:
                continue
            if other.phase is Phase.PREFILLING:
                if r.waiting_for is not other:
                    r.waiting_for = other
                    log.info("request %s: waits for %s, which prefills the same prompt", r.rid, other.rid)
                return "wait"
            end = self._prompt_end(other)
            if end is not None:
                r.waiting_for = None
                return (other, len(r.prompt), *end)
        return None

    def _prompt_end(self, r: Running):
        """(snapshot, logits) of a decoding request's prompt end, taken in its prefill or restored with it."""
        n = len(r.prompt)
        for point in [*r.taken, r.lease.plan.checkpoint]:
            if point is None or point.position != n or point.logits is None:
                continue
            if self.engine.needs_snapshots and point.snapshot is None:
                continue
            return point.snapshot, point.logits
        return None

    def _add_stop(self, r: Running, position: int) -> None:
        if position not in r.stops:
            r.stops = sorted({*r.stops, position})
        if self.engine.needs_snapshots:
            r.lease.plan.checkpoints_to_take.setdefault(position, RestoreKind.FORK)

    def _lease(self, r: Running, donor) -> Lease:
        extra = self._batch_growth_bytes(r)
        if donor is None:
            return self.engine.acquire(
                r.prompt, r.request.checkpoint_hints, r.request.sampling.max_tokens, extra, r.splits, r.namespace
            )
        other, depth, snapshot, logits = donor
        source = other.lease.cache if other.phase is Phase.PREFILLING else self.batch.view(other.rid)
        cache = self.engine.ops.fork(source, depth, snapshot)
        nbytes = logits.nbytes if logits is not None else 0
        checkpoint = Checkpoint(depth, RestoreKind.FORK, snapshot, logits, nbytes)
        return self.engine.acquire_forked(
            r.prompt, r.request.checkpoint_hints, r.request.sampling.max_tokens, extra, cache, checkpoint,
            r.splits, r.namespace,
        )

    def _batch_growth_bytes(self, r: Running) -> int:
        """What the running requests may still add, and the padding of a batch `r` joins."""
        layout = self.engine.layout
        running = [*self.prefilling, *self.decoding.values()]
        if not running:
            return 0
        remaining = sum(len(o.prompt) - o.position + o.request.sampling.max_tokens - o.generated for o in running)
        final = [len(o.prompt) + o.request.sampling.max_tokens for o in running]
        final.append(len(r.prompt) + r.request.sampling.max_tokens)
        padding = len(final) * max(final) - sum(final)
        return (remaining + padding) * layout.kv_bytes_per_token

    def _start(self, r: Running, lease: Lease) -> None:
        plan = lease.plan
        r.lease, r.admitted_at = lease, time.perf_counter()
        r.position = plan.restore_point
        r.stops = sorted(p for p in plan.checkpoints_to_take if r.position < p <= len(r.prompt))
        if lease.from_disk:  # keep the loaded point in memory too
            c = plan.checkpoint
            r.taken.append(TakenCheckpoint(c.position, c.kind, c.snapshot, c.logits, c.logits_nbytes))
        r.facts = self.engine.facts(plan, r.prompt, lease.from_disk)
        if r.request.sampling.seed is not None:
            mx.random.seed(r.request.sampling.seed)
        if plan.logits is not None:
            self._begin_decoding(r, plan.logits)
        else:
            r.phase = Phase.PREFILLING
            r.prefill_from, r.progress_logged_at = r.position, r.admitted_at
            self.prefilling.append(r)

    # ------------------------------------------------------------- prefill

    def _prefill_one_chunk(self) -> None:
        if not self.prefilling:
            return
        r = self.prefilling[0]
        started = time.perf_counter()
        n, pos = len(r.prompt), r.position
        cache = r.lease.cache
        end = min(n, pos + self.engine.config.prefill_step, *[p for p in r.stops if p > pos][:1])
        if end == n and end - pos > 1:
            end = n - 1  # the last token alone: logits (vocab-wide) for one position, not a chunk
        out = self.engine.model(mx.array(r.prompt[pos:end])[None], cache=cache)
        logits = None
        if end == n:
            logits = out[0, -1].astype(mx.float32)
            mx.eval(logits, [c.state for c in cache])
        else:
            mx.eval([c.state for c in cache])
        r.position = end
        kind = r.lease.plan.checkpoints_to_take.get(end)
        self._take(r, kind, logits if end == n else None)
        r.prefill_s += time.perf_counter() - started
        self.engine.note_prefill(end - pos, time.perf_counter() - started)
        self._log_progress(r)
        if r.request.progress_every > 0:
            r.emit(Progress(request_id=r.rid, processed=end, total=n))
        if logits is not None:
            self.prefilling.remove(r)
            try:
                self._begin_decoding(r, logits)
            except Exception as exc:  # its own settings (processors, sampler): it alone fails, in no list now
                log.exception("request %s: its first token failed", r.rid)
                self.engine.discard(r.lease)
                self._fail(r, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        elif r.should_abort():
            self._take(r, RestoreKind.PROMPT_END, None)
            self.prefilling.remove(r)
            self._retire_prefill(r, FinishReason.ABORT)
        mx.clear_cache()

    def _log_progress(self, r: Running) -> None:
        now = time.perf_counter()
        if r.position >= len(r.prompt) or now - r.progress_logged_at < PREFILL_LOG_INTERVAL_S:
            return
        r.progress_logged_at = now
        done, total = r.position - r.prefill_from, len(r.prompt) - r.prefill_from
        log.info("request %s: prefilled %d of %d tokens (%.0f tok/s)", r.rid, done, total,
                 done / max(now - r.admitted_at, 1e-9))  # fmt: skip

    def _take(self, r: Running, kind: Optional[RestoreKind], logits: Any) -> None:
        if kind is None or not self.engine.cache_enabled:
            return
        if any(t.position == r.position for t in r.taken):
            return
        r.taken.append(self.engine.checkpoint(r.lease.cache, r.position, kind, logits))

    def _retire_prefill(self, r: Running, finish: FinishReason) -> None:
        self._store(r, r.lease.cache, r.prompt[: r.position])
        self._result(r, finish)

    # ------------------------------------------------------------- decode

    def _begin_decoding(self, r: Running, logits: Any) -> None:
        """Sample the first token from the prompt's logits; join the batch if more are wanted."""
        sampling = r.request.sampling
        budget = min(sampling.max_tokens, self.engine.context_limit - len(r.prompt))
        if budget <= 0:
            self._store(r, r.lease.cache, list(r.prompt))
            self._result(r, FinishReason.LENGTH)
            return
        sampler = self._sampler(sampling)
        processors = self._processors(sampling) + ([r.grammar] if r.grammar is not None else [])
        row = logits.reshape(1, -1)
        if processors:
            history = mx.array(r.prompt)
            for processor in processors:
                row = processor(history, row)
        logprobs = row - mx.logsumexp(row, keepdims=True)
        token = int(sampler(logprobs).item())
        r.first_token_at = time.perf_counter()
        if token in sampling.stop_token_ids:
            self._store(r, r.lease.cache, list(r.prompt))
            self._result(r, FinishReason.STOP)
            return
        self._emit_token(r, token, logprobs[0])
        if budget == 1:
            self._store(r, r.lease.cache, list(r.prompt))
            self._result(r, FinishReason.LENGTH)
            return
        member = Member(r.rid, r.lease.cache, list(r.prompt), token, sampler, processors, sampling.stop_token_ids, budget - 1)
        r.lease.cache = None  # from here on the batch holds it
        r.phase = Phase.DECODING
        self.decoding[r.rid] = r
        self.batch.add(member)

    def _abort_decoding(self) -> None:
        for rid in [rid for rid, r in self.decoding.items() if r.should_abort()]:
            self._retire_decoding(rid, FinishReason.ABORT, removed=True)

    def _decode(self) -> None:
        if not self.decoding:
            return
        size = len(self.decoding)
        for out in self.batch.step():
            r = self.decoding[out.uid]
            r.steps += 1
            r.batch_sum += size
            r.batch_max = max(r.batch_max, size)
            if out.finish_reason == "stop":
                self._retire_decoding(out.uid, FinishReason.STOP)
                continue
            self._emit_token(r, out.token, out.logprobs)
            if out.finish_reason == "length":
                self._retire_decoding(out.uid, FinishReason.LENGTH)

    def _retire_decoding(self, rid: str, finish: FinishReason, removed: bool = False) -> None:
        r = self.decoding.pop(rid)
        cache, tokens = self.batch.remove(rid) if removed else self.batch.take_finished(rid)
        self._store(r, cache, tokens)
        self._result(r, finish)

    def _emit_token(self, r: Running, token: int, logprobs: Any) -> None:
        r.generated += 1
        entry = self._logprobs(r, token, logprobs)
        self.frames.add(r.rid, token, entry, r.facts if r.generated == 1 else None, r.emit)

    def _logprobs(self, r: Running, token: int, row: Any) -> list[TokenLogprob]:
        k = r.request.sampling.top_logprobs
        if k < 0:
            return []
        return [self.engine.token_logprob(token, row, k)]

    def _sampler(self, sampling) -> Callable:
        key = (sampling.temperature, sampling.top_p, sampling.min_p, sampling.top_k)
        if key not in self._samplers:  # one object per setting, so a batch samples in one call
            if len(self._samplers) >= MAX_SAMPLERS:  # settings are the clients' floats: keep a bounded few
                self._samplers.pop(next(iter(self._samplers)))
            self._samplers[key] = make_sampler(
                temp=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=sampling.top_k
            )
        return self._samplers[key]

    @staticmethod
    def _processors(sampling) -> list:
        return mlx_lm_processors(sampling)

    # ------------------------------------------------------------- the end

    def _store(self, r: Running, cache: list, tokens: list[int]) -> None:
        prompt_end = min(len(tokens), len(r.prompt))  # an aborted prefill stored only what it consumed
        try:
            self.engine.store(r.lease, cache, tokens, prompt_end, r.taken)
        except Exception:
            log.exception("request %s: storing its cache failed", r.rid)
            self.engine.discard(r.lease)

    def _result(self, r: Running, finish: FinishReason) -> None:
        self.frames.flush(r.rid)
        r.phase = Phase.DONE
        finished = time.perf_counter()
        first = r.first_token_at or finished
        timings = Timings(
            restore_s=r.admitted_at - r.received_at,
            prefill_s=r.prefill_s,
            ttft_s=first - r.received_at,
            decode_s=finished - first,
            total_s=finished - r.received_at,
            decode_steps=r.steps,
            batch_size_max=r.batch_max,
            batch_size_mean=r.batch_sum / r.steps if r.steps else 1.0,
        )
        pool = self.engine.pool_stats()
        facts = replace(r.facts, pool=pool)
        result = Result(
            request_id=r.rid,
            finish_reason=finish,
            generated_tokens=r.generated,
            facts=facts,
            timings=timings,
            memory=memory_stats(pool.bytes),
        )
        self.results[r.rid] = result
        r.emit(result)

    def _finish_unstarted(self, r: Running) -> None:
        r.facts = CacheFacts(len(r.prompt), 0, 0, 0, RestoreKind.NONE, self.engine.pool_stats())
        r.admitted_at = time.perf_counter()
        self._result(r, FinishReason.ABORT)

    def _fail(self, r: Running, code: ErrorCode, message: str) -> None:
        log.warning("request %s rejected: %s", r.rid, message)
        r.phase = Phase.DONE
        r.emit(Error(code, message, r.rid))

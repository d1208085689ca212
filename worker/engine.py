"""The engine: restore from the pool, prefill what is new, decode, store the result.

Runs on the one thread that owns the model. `generate` is synchronous; it talks
back only through `emit` (Progress, Tokens) and learns of aborts by polling
`should_abort` between prefill chunks and decode steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from protocol.messages import (
    CacheFacts,
    CacheLayout,
    FinishReason,
    Generate,
    Message,
    PoolStats,
    Progress,
    RestoreKind,
    Result,
    SamplingParams,
    Timings,
    TokenLogprob,
    Tokens,
    TopLogprob,
)
from worker.cache_adapters import ModelCacheOps, UnsupportedCache, kind_name, measure_layout
from worker.memory import memory_stats
from worker.memory_guard import InsufficientMemory, default_memory_limit, estimate_need
from worker.disk_tier import DiskTier
from worker.fingerprint import model_fingerprint
from worker.pool import Checkpoint, CheckpointPool, Lease, RestorePlan, Sequence, TakenCheckpoint
from worker.state_codec import SavedPoint

log = logging.getLogger("mlx_cache_proxy.worker")

DEFAULT_CONTEXT_LIMIT = 32768


class ContextLengthExceeded(ValueError):
    """The prompt leaves no room for a token within the context limit."""


@dataclass
class EngineConfig:
    cache_bytes: int = 8 << 30
    # Default picked by measurement (tests/benchmarks/bench_checkpoint_interval.py).
    checkpoint_interval: int = 256
    prefill_step: int = 512
    cache_enabled: bool = True
    max_lattice_points: int = 16
    memory_limit: int = 0  # bytes MLX may use in all; 0: the device's recommended working set
    max_kv_size: int = 0  # cap on prompt + generated tokens; 0: the model's context limit
    disk_dir: str = ""  # the disk tier's directory ("" turns it off)
    disk_cache_bytes: int = 16 << 30


@dataclass
class _Prefill:
    logits: Any  # logits after the last prompt token, or None when aborted
    position: int  # prompt tokens the cache has consumed
    seconds: float


class Engine:
    def __init__(
        self,
        model: Any,
        model_id: str,
        config: EngineConfig,
        context_limit: int,
        vocab_size: int,
        fingerprint: str = "",
    ):
        self.model = model
        self.model_id = model_id
        self.config = config
        self.context_limit = context_limit
        self.vocab_size = vocab_size
        self.ops, uncached_reason = _cache_ops(model)
        self.pool: CheckpointPool | None = None
        if self.ops is not None and config.cache_enabled:
            self.pool = CheckpointPool(
                self.ops, config.cache_bytes, config.checkpoint_interval, config.max_lattice_points
            )
        self.disk: DiskTier | None = None
        if self.pool is not None and config.disk_dir and config.disk_cache_bytes > 0 and fingerprint:
            self.disk = DiskTier(Path(config.disk_dir) / fingerprint, config.disk_cache_bytes, self.ops)
            self.pool.on_evict = self._save_to_disk
        self.prefill_tokens_per_s = 1000.0  # refined by every prefill; decides disk load vs recompute
        self.layout = self._layout(uncached_reason)
        self.memory_limit = config.memory_limit or default_memory_limit(memory_stats(0))
        if config.max_kv_size:
            self.context_limit = min(self.context_limit, config.max_kv_size)
        self.activation_bytes = self._measure_activations()

    # ------------------------------------------------------------- public

    def generate(self, request: Generate, emit: Callable[[Message], None], should_abort: Callable[[], bool]) -> Result:
        started = time.perf_counter()
        prompt = list(request.prompt_tokens)
        self._validate(prompt, request.sampling)
        lease = self._checkout(prompt, request.checkpoint_hints, request.sampling.max_tokens)
        plan = lease.plan
        restored = time.perf_counter()
        taken: list[TakenCheckpoint] = []
        if lease.from_disk:  # keep the loaded point in memory too
            c = plan.checkpoint
            taken.append(TakenCheckpoint(c.position, c.kind, c.snapshot, c.logits, c.logits_nbytes))
        try:
            with mx.stream(generation_stream):
                if plan.logits is not None:
                    prefill = _Prefill(plan.logits, len(prompt), 0.0)
                else:
                    prefill = self._prefill(lease.cache, prompt, plan, taken, request, emit, should_abort)
                facts = self._facts(plan, prompt, lease.from_disk)
                if prefill.logits is None:
                    finish, cache_tokens, generated, decode = FinishReason.ABORT, prompt[: prefill.position], [], None
                else:
                    finish, cache_tokens, generated, decode = self._decode(
                        lease.cache, prompt, prefill.logits, request, facts, emit, should_abort
                    )
                self._store(lease, cache_tokens, prefill.position, taken)
        except BaseException:
            if self.pool is not None:
                self.pool.discard(lease)
            raise
        finished = time.perf_counter()
        first = decode.first_token_at if decode is not None and decode.first_token_at else finished
        timings = Timings(
            restore_s=restored - started,
            prefill_s=prefill.seconds,
            ttft_s=first - started,
            decode_s=finished - first,
            total_s=finished - started,
        )
        pool = self.pool_stats()
        facts = CacheFacts(**{**facts.__dict__, "pool": pool})
        return Result(
            request_id=request.request_id,
            finish_reason=finish,
            generated_tokens=len(generated),
            facts=facts,
            timings=timings,
            memory=memory_stats(pool.bytes),
        )

    def pool_stats(self) -> PoolStats:
        if self.pool is None:
            return PoolStats()
        stats = self.pool.stats()
        if self.disk is None:
            return stats
        disk = self.disk.stats()
        return PoolStats(**{**stats.__dict__, "disk": disk})

    def close(self) -> None:
        """At shutdown: write the pool to the disk tier and wait for the writes."""
        if self.disk is None:
            return
        for seq in list(self.pool.sequences.values()):
            self._save_to_disk(seq, self.pool.checkpoints_on_path(seq))
        self.disk.close()

    def _save_to_disk(self, seq: Sequence, checkpoints: list[Checkpoint]) -> None:
        end = len(seq.tokens)
        points = [
            SavedPoint(c.position, c.kind.value, c.snapshot, c.logits) for c in checkpoints if c.position <= end
        ]
        if self.ops.needs_snapshots and not points:
            return  # nowhere to restore it exactly
        self.disk.save(seq.tokens, seq.cache, points)

    def evict_to(self, target_bytes: int) -> None:
        if self.pool is not None:
            self.pool.evict_to(target_bytes)
            mx.clear_cache()

    # ------------------------------------------------------------- steps

    def _validate(self, prompt: list[int], sampling: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt has no tokens")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if len(prompt) >= self.context_limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens, which leaves no room to generate "
                f"within the context limit of {self.context_limit} tokens"
            )
        if sampling.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")

    def _checkout(self, prompt: list[int], hints: list[int], max_tokens: int) -> Lease:
        if self.pool is None:
            cold = RestorePlan(prompt)
            self._guard_memory(cold, max_tokens)
            return Lease(self.model.make_cache(), None, cold)
        plan = self.pool.plan(prompt, hints)
        if not self._fits(plan, max_tokens):
            # Give back pool memory, oldest first, then plan again on what is left.
            excess = mx.get_active_memory() + self._need(plan, max_tokens) - self.memory_limit
            self.pool.evict_to(max(0, self.pool.nbytes - excess))
            mx.clear_cache()
            plan = self.pool.plan(prompt, hints)
            self._guard_memory(plan, max_tokens)
        return self._from_disk(plan, hints) or self.pool.checkout(plan)

    def _from_disk(self, plan: RestorePlan, hints: list[int]) -> Lease | None:
        """A lease restored from the disk tier, when it goes deeper and loads faster than recomputing."""
        if self.disk is None:
            return None
        hit = self.disk.lookup(plan.prompt)
        if hit is None or hit.position <= plan.restore_point:
            return None
        recompute_s = (hit.position - plan.restore_point) / self.prefill_tokens_per_s
        if self.disk.load_seconds_estimate(hit) >= recompute_s:
            return None
        loaded = self.disk.load(hit)
        if loaded is None:
            return None
        cache, logits, snapshot = loaded
        checkpoint = Checkpoint(hit.position, RestoreKind(hit.kind), snapshot, logits, logits.nbytes if logits is not None else 0)
        return Lease(cache, None, self.pool.plan_restored(plan.prompt, hints, checkpoint), from_disk=True)

    def _need(self, plan: RestorePlan, max_tokens: int) -> int:
        copied = plan.restore_point if plan.source is not None and not plan.in_place else 0
        need = estimate_need(
            self.layout,
            tokens_to_compute=len(plan.prompt) - plan.restore_point,
            max_tokens=max_tokens,
            copied_prefix_tokens=copied,
            checkpoints=len(plan.checkpoints_to_take),
            activation_bytes=self.activation_bytes,
        )
        return need.total

    def _fits(self, plan: RestorePlan, max_tokens: int) -> bool:
        return mx.get_active_memory() + self._need(plan, max_tokens) <= self.memory_limit

    def _guard_memory(self, plan: RestorePlan, max_tokens: int) -> None:
        if not self._fits(plan, max_tokens):
            active = mx.get_active_memory()
            raise InsufficientMemory(self._need(plan, max_tokens), self.memory_limit - active, self.memory_limit)

    def _prefill(self, cache, prompt, plan: RestorePlan, taken, request, emit, should_abort) -> _Prefill:
        start = time.perf_counter()
        n, pos = len(prompt), plan.restore_point
        stops = sorted(p for p in plan.checkpoints_to_take if pos < p <= n)
        logits = None
        while pos < n:
            end = min(n, pos + self.config.prefill_step, *[p for p in stops if p > pos][:1])
            if end == n and end - pos > 1:
                end = n - 1  # the last token alone: logits (vocab-wide) for one position, not a chunk
            out = self.model(mx.array(prompt[pos:end])[None], cache=cache)
            if end == n:
                logits = out[0, -1].astype(mx.float32)
                mx.eval(logits, [c.state for c in cache])
            else:
                mx.eval([c.state for c in cache])
            pos = end
            self._maybe_take(cache, pos, plan.checkpoints_to_take.get(pos), logits if pos == n else None, taken)
            if request.progress_every > 0:
                emit(Progress(request_id=request.request_id, processed=pos, total=n))
            if pos < n and should_abort():
                self._maybe_take(cache, pos, RestoreKind.PROMPT_END, None, taken)
                break
            mx.clear_cache()
        seconds = time.perf_counter() - start
        computed = pos - plan.restore_point
        if computed >= 32 and seconds > 0:
            self.prefill_tokens_per_s = 0.5 * self.prefill_tokens_per_s + 0.5 * computed / seconds
        return _Prefill(logits, pos, seconds)

    def _maybe_take(self, cache, position: int, kind: RestoreKind | None, logits, taken: list) -> None:
        if self.pool is None or kind is None:
            return
        snapshot = self.ops.snapshot(cache, position) if self.ops.needs_snapshots else None
        logits_nbytes = logits.nbytes if logits is not None else 0
        taken.append(TakenCheckpoint(position, kind, snapshot, logits, logits_nbytes))

    def _decode(self, cache, prompt, logits, request: Generate, facts: CacheFacts, emit, should_abort):
        sampling = request.sampling
        decode = _Decoder(self.model, cache, prompt, sampling)
        out = _TokenStream(request.request_id, facts, emit)
        cache_tokens = list(prompt)
        generated: list[int] = []
        stop_ids = set(sampling.stop_token_ids)
        budget = min(sampling.max_tokens, self.context_limit - len(prompt))
        if budget <= 0:
            return FinishReason.LENGTH, cache_tokens, generated, decode
        y, logprobs = decode.sample(logits, generated)
        finish = None
        while finish is None:
            more = len(generated) + 1 < budget
            if more:  # queue the next step before reading this token: keeps the device busy
                next_y, next_logprobs = decode.step(y, generated)
            token = y.item()
            if decode.first_token_at is None:
                decode.first_token_at = time.perf_counter()
            if more:
                cache_tokens.append(token)
            if token in stop_ids:
                finish = FinishReason.STOP
                break
            generated.append(token)
            out.add(token, decode.logprobs(token, logprobs))
            if not more:
                finish = FinishReason.LENGTH
            elif should_abort():
                finish = FinishReason.ABORT
            else:
                y, logprobs = next_y, next_logprobs
        out.flush()
        return finish, cache_tokens, generated, decode

    def _store(self, lease: Lease, cache_tokens: list[int], prompt_end: int, taken: list[TakenCheckpoint]) -> None:
        if self.pool is None:
            return
        mx.eval([c.state for c in lease.cache])
        end = len(cache_tokens)
        if end > prompt_end:
            self._maybe_take(lease.cache, end, RestoreKind.GENERATION_END, None, taken)
        self.pool.commit(lease, cache_tokens, prompt_end, taken)

    def _facts(self, plan: RestorePlan, prompt: list[int], from_disk: bool) -> CacheFacts:
        p = plan.restore_point
        return CacheFacts(
            restored_from_disk=from_disk,
            prompt_tokens=len(prompt),
            cached_tokens=p,
            recomputed_tokens=len(prompt) - p,
            restore_point=p,
            restore_kind=plan.kind,
            pool=self.pool_stats(),
        )

    def _measure_activations(self) -> int:
        """Peak memory of one full prefill chunk, measured once at start-up."""
        cache = self.model.make_cache()
        mx.eval([c.state for c in cache])
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        self.model(mx.zeros((1, self.config.prefill_step), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
        peak = mx.get_peak_memory() - before
        del cache
        mx.clear_cache()
        return max(0, peak)

    def _layout(self, uncached_reason: str) -> CacheLayout:
        cache = self.model.make_cache()
        self.model(mx.array([[0]]), cache=cache)
        mx.eval([c.state for c in cache])
        kv_per_token, snapshot_bytes = measure_layout(cache)
        return CacheLayout(
            layer_kinds=[kind_name(c) for c in cache],
            kv_bytes_per_token=kv_per_token,
            snapshot_bytes=snapshot_bytes,
            cacheable=self.ops is not None,
            uncached_reason=uncached_reason,
        )


class _TokenStream:
    """Tokens leave in small batches: the first at once, then what accumulated over FLUSH_S.

    A model at 20-50 tokens/s still streams every token; a fast one sends a
    message per few tokens instead of one each, which would cost the worker, the
    proxy and the client more than the decode itself.
    """

    FLUSH_S = 0.02

    def __init__(self, request_id: str, facts: CacheFacts, emit: Callable[[Message], None]):
        self.request_id, self.facts, self.emit = request_id, facts, emit
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.sent = 0
        self.last_flush = 0.0

    def add(self, token: int, logprobs: list[TokenLogprob]) -> None:
        self.tokens.append(token)
        self.logprobs.extend(logprobs)
        if self.sent == 0 or time.perf_counter() - self.last_flush >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self.tokens:
            return
        first = self.sent == 0
        self.emit(
            Tokens(
                request_id=self.request_id,
                tokens=self.tokens,
                logprobs=self.logprobs,
                first_cache_facts=self.facts if first else None,
            )
        )
        self.sent += len(self.tokens)
        self.tokens, self.logprobs = [], []
        self.last_flush = time.perf_counter()


class _Decoder:
    """Sampling state of one generation."""

    def __init__(self, model, cache, prompt: list[int], sampling: SamplingParams):
        self.model, self.cache, self.prompt = model, cache, prompt
        self.sampler = make_sampler(
            temp=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=sampling.top_k
        )
        penalty = sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None
        self.processors = make_logits_processors(repetition_penalty=penalty)
        self.top_logprobs = sampling.top_logprobs
        self.first_token_at: float | None = None
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)

    def sample(self, logits, generated: list[int]):
        logits = logits.reshape(1, -1)
        if self.processors:
            history = mx.array(self.prompt + generated)
            for processor in self.processors:
                logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = self.sampler(logprobs)
        mx.async_eval(y, logprobs)
        return y, logprobs

    def step(self, y, generated: list[int]):
        out = self.model(y.reshape(1, 1), cache=self.cache)
        # `generated` does not hold y yet: the processors see it once appended.
        return self.sample(out[0, -1], generated + [int(y.item())] if self.processors else generated)

    def logprobs(self, token: int, logprobs) -> list[TokenLogprob]:
        if self.top_logprobs < 0:
            return []
        row = logprobs[0]
        top: list[TopLogprob] = []
        if self.top_logprobs > 0:
            k = min(self.top_logprobs, row.shape[0])
            ids = mx.argpartition(-row, k - 1)[:k]
            values = row[ids]
            pairs = sorted(zip(ids.tolist(), values.tolist()), key=lambda p: -p[1])
            top = [TopLogprob(token=int(i), logprob=float(v)) for i, v in pairs]
        return [TokenLogprob(token=token, logprob=float(row[token].item()), top=top)]


def _cache_ops(model) -> tuple[ModelCacheOps | None, str]:
    try:
        return ModelCacheOps(model), ""
    except UnsupportedCache as exc:
        reason = f"no snapshot adapter for cache kind {exc.args[0]}; serving this model uncached"
        log.warning(reason)
        return None, reason


def _read_config(model_path: Path) -> dict:
    try:
        return json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _context_limit(config: dict) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length"):
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return DEFAULT_CONTEXT_LIMIT


def load_engine(model_path: str, config: EngineConfig, model_id: str | None = None) -> Engine:
    from mlx_lm.utils import _download, load_model

    path = _download(model_path)
    model, model_config = load_model(path)
    vocab_size = int(model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size") or 0)
    if vocab_size <= 0:
        vocab_size = model.model.embed_tokens.weight.shape[0]  # every mlx-lm LM we serve names it so
    limit = _context_limit(model_config or _read_config(path))
    return Engine(model, model_id or model_path, config, limit, vocab_size, model_fingerprint(path))

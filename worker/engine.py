"""The engine: the model, its checkpoint pool and disk tier, and the verbs the step loop uses.

Runs on the one thread that owns the model. `worker.step_loop.StepLoop` drives
requests through it (admit -> lease, prefill chunks -> checkpoints, batched
decode, store); `generate` runs one request alone through the same loop, for
in-process callers and tests.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from protocol.messages import (
    CacheFacts,
    CacheLayout,
    Error,
    ErrorCode,
    Generate,
    Grammar,
    GrammarKind,
    Message,
    PoolStats,
    RestoreKind,
    Result,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from worker.cache_adapters import ModelCacheOps, UnsupportedCache, kind_name, measure_layout
from worker.memory import memory_stats
from worker.memory_guard import InsufficientMemory, default_cache_bytes, default_memory_limit, estimate_need
from worker.decode_batch import can_merge
from worker.disk_tier import DiskTier
from worker.fingerprint import model_fingerprint
from worker.grammar import GrammarError, ModelGrammars
from worker.placement import DEFAULT_CHECKPOINT_INTERVAL
from worker.prefix_events import StoredSequence
from worker.pool import Checkpoint, CheckpointPool, Lease, RestorePlan, Sequence, TakenCheckpoint
from worker.state_codec import SavedPoint

log = logging.getLogger("mlx_cache_proxy.worker")

DEFAULT_CONTEXT_LIMIT = 32768


class ContextLengthExceeded(ValueError):
    """The prompt leaves no room for a token within the context limit."""


@dataclass
class EngineConfig:
    cache_bytes: int | None = None  # None: default_cache_bytes (worker/memory_guard.py)
    # None: worker.placement.DEFAULT_CHECKPOINT_INTERVAL, the lattice budgeted by the model's snapshot size;
    # a chosen interval is kept (up to max_lattice_points).
    checkpoint_interval: int | None = None
    prefill_step: int = 512
    cache_enabled: bool = True
    max_lattice_points: int = 16
    memory_limit: int = 0  # bytes MLX may use in all; 0: the device's recommended working set
    max_kv_size: int = 0  # cap on prompt + generated tokens; 0: the model's context limit
    disk_dir: str = ""  # the disk tier's directory ("" turns it off)
    disk_cache_bytes: int = 16 << 30


class Engine:
    def __init__(
        self,
        model: Any,
        model_id: str,
        config: EngineConfig,
        context_limit: int,
        vocab_size: int,
        fingerprint: str = "",
        ranks: Any = None,
    ):
        self.ranks = ranks  # a sharded worker's worker.sharded.Ranks: memory figures agreed by all ranks
        self.model = model
        self.model_id = model_id
        self.config = config
        self.context_limit = context_limit
        self.vocab_size = vocab_size
        self.ops, uncached_reason = _cache_ops(model)
        self.layout = self._layout(uncached_reason)
        self.memory_limit = self._agreed(min, config.memory_limit or default_memory_limit(memory_stats(0)))
        cache_bytes = config.cache_bytes
        if cache_bytes is None:
            cache_bytes = self._agreed(min, default_cache_bytes(self.memory_limit, self._active_memory()))
        self.pool: CheckpointPool | None = None
        if self.ops is not None and config.cache_enabled:
            self.pool = CheckpointPool(
                self.ops, cache_bytes, config.checkpoint_interval or DEFAULT_CHECKPOINT_INTERVAL,
                config.max_lattice_points,
                snapshot_sizes=(self.layout.kv_bytes_per_token, self.layout.snapshot_bytes),
                lattice_by_bytes=config.checkpoint_interval is None,
            )
        self.disk: DiskTier | None = None
        if self.pool is not None and config.disk_dir and config.disk_cache_bytes > 0 and fingerprint and not ranks:
            self.disk = DiskTier(Path(config.disk_dir) / fingerprint, config.disk_cache_bytes, self.ops)
            self.pool.on_evict = self._save_to_disk
        self.prefill_tokens_per_s = 1000.0  # refined by every prefill; decides disk load vs recompute
        if config.max_kv_size:
            self.context_limit = min(self.context_limit, config.max_kv_size)
        self.activation_bytes = self._agreed(max, self._measure_activations())
        self.batchable = can_merge(model.make_cache())
        self.grammars: ModelGrammars | None = None  # set by load_engine, which knows the model's directory

    # ------------------------------------------------------------- facts

    @property
    def cache_enabled(self) -> bool:
        return self.pool is not None

    @property
    def needs_snapshots(self) -> bool:
        return self.ops is not None and self.ops.needs_snapshots

    def generate(self, request: Generate, emit: Callable[[Message], None], should_abort: Callable[[], bool]) -> Result:
        """Run one request to its end, alone (an in-process client of the step loop)."""
        from worker.step_loop import StepLoop

        loop = StepLoop(self, max_batch=1)
        errors: list[Error] = []

        def sink(message: Message) -> None:
            if isinstance(message, Error):
                errors.append(message)
            else:
                emit(message)

        loop.submit(request, sink, should_abort)
        while loop.busy:
            loop.step()
        if errors:
            raise _as_exception(errors[0])
        return loop.results[request.request_id]

    def stored_sequences(self) -> list[StoredSequence]:
        """The pool's stored sequences, for the prefix events the proxy routes by."""
        if self.pool is None:
            return []
        return [StoredSequence(s.key, s.tokens, s.namespace) for s in self.pool.sequences.values() if s.tokens]

    def pool_stats(self) -> PoolStats:
        if self.pool is None:
            return PoolStats()
        stats = self.pool.stats()
        if self.disk is None:
            return stats
        disk = self.disk.stats()
        return PoolStats(**{**stats.__dict__, "disk": disk})

    def close(self, timeout_s: float | None = None) -> None:
        """At shutdown: write the pool to the disk tier, most recently used first, within `timeout_s`.

        One file and one index row per sequence, so the time is linear in the pool; what
        the deadline cuts off is the least recently used part, and the log says how much.
        """
        if self.disk is None:
            return
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        before = self.disk.progress()
        sequences = sorted(self.pool.sequences.values(), key=lambda s: s.last_used, reverse=True)
        queued = unrestorable = 0
        for seq in sequences:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if self._save_to_disk(seq, self.pool.checkpoints_on_path(seq)):
                queued += 1
            else:
                unrestorable += 1
        self.disk.close(deadline)
        after = self.disk.progress()
        total = len(sequences) + before.pending
        log.info(
            "disk tier: saved %d of %d sequences (%.1f MB) in %.1fs; not saved: %d at the deadline, %d failed "
            "writes, %d with no restore point",
            after.written - before.written, total, (after.written_bytes - before.written_bytes) / 1e6,
            time.monotonic() - start, len(sequences) - queued - unrestorable + after.skipped - before.skipped,
            after.failed - before.failed, unrestorable,
        )  # fmt: skip

    def _save_to_disk(self, seq: Sequence, checkpoints: list[Checkpoint]) -> bool:
        end = len(seq.tokens)
        points = [
            SavedPoint(c.position, c.kind.value, c.snapshot, c.logits) for c in checkpoints if c.position <= end
        ]
        if self.ops.needs_snapshots and end > seq.prompt_end and not any(p.position == end for p in points):
            # In memory the live cache is the state at its end; on disk it needs a snapshot of its own.
            points.append(SavedPoint(end, RestoreKind.GENERATION_END.value, self.ops.snapshot(seq.cache, end), None))
        if self.ops.needs_snapshots and not points:
            return False  # nowhere to restore it exactly
        return self.disk.save(seq.tokens, seq.cache, points, seq.namespace)

    def evict_to(self, target_bytes: int) -> None:
        if self.pool is not None:
            self.pool.evict_to(target_bytes)
            mx.clear_cache()

    # ------------------------------------------------------------- the step loop's verbs

    def validate(self, prompt: list[int], sampling: SamplingParams) -> None:
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
        if len(sampling.logit_bias_ids) != len(sampling.logit_bias_values):
            raise ValueError("logit_bias needs one value per token id")
        bad = next((t for t in sampling.logit_bias_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def grammar_processor(self, grammar: Grammar | None) -> Callable | None:
        """The logits mask of a request's grammar (None without one); raises GrammarError (a ValueError)."""
        if grammar is None:
            return None
        if self.grammars is None or grammar.kind is not GrammarKind.LLGUIDANCE:
            raise GrammarError(f"this worker cannot decode with a {grammar.kind.value} grammar")
        return self.grammars.processor(grammar.text)

    def restore_point(self, prompt: list[int], namespace: str = "") -> int:
        """How deep the pool would restore `prompt` now (a look, nothing checked out)."""
        return self.pool.plan(prompt, namespace=namespace).restore_point if self.pool is not None else 0

    def acquire(
        self,
        prompt: list[int],
        hints: list[int],
        max_tokens: int,
        extra_bytes: int = 0,
        splits: list[tuple[int, int]] = (),
        namespace: str = "",
    ) -> Lease:
        """A lease for `prompt` if it fits beside `extra_bytes` more (the running batch); else InsufficientMemory."""
        if self.pool is None:
            cold = RestorePlan(prompt)
            self._guard_memory(cold, max_tokens, extra_bytes)
            return Lease(self.model.make_cache(), None, cold)
        plan = self.pool.plan(prompt, hints, splits, namespace)
        if not self._fits(plan, max_tokens, extra_bytes):
            # Give back pool memory, oldest first, then plan again on what is left.
            excess = self._active_memory() + self._need(plan, max_tokens) + extra_bytes - self.memory_limit
            self.pool.evict_to(max(0, self.pool.nbytes - excess))
            mx.clear_cache()
            plan = self.pool.plan(prompt, hints, splits, namespace)
            self._guard_memory(plan, max_tokens, extra_bytes)
        return self._from_disk(plan, hints, splits) or self.pool.checkout(plan)

    def acquire_forked(
        self,
        prompt,
        hints,
        max_tokens,
        extra_bytes,
        cache,
        checkpoint: Checkpoint,
        splits: list[tuple[int, int]] = (),
        namespace: str = "",
    ) -> Lease:
        """A lease over `cache`, forked from a running request's prefix (same namespace) at `checkpoint.position`."""
        plan = self.pool.plan_restored(prompt, hints, checkpoint, splits, namespace)
        self._guard_memory(plan, max_tokens, extra_bytes + checkpoint.position * self.layout.kv_bytes_per_token)
        return self.pool.lease_restored(prompt, hints, cache, checkpoint, splits, namespace)

    def checkpoint(self, cache, position: int, kind: RestoreKind, logits) -> TakenCheckpoint:
        snapshot = self.ops.snapshot(cache, position) if self.ops.needs_snapshots else None
        return TakenCheckpoint(position, kind, snapshot, logits, logits.nbytes if logits is not None else 0)

    def store(self, lease: Lease, cache, tokens: list[int], prompt_end: int, taken: list[TakenCheckpoint]) -> None:
        """Hand a finished request's cache (which has consumed `tokens`) back to the pool."""
        if self.pool is None:
            return
        mx.eval([c.state for c in cache])
        lease.cache = cache
        # No snapshot at the generation end: the stored cache is that state (CheckpointPool._continue_at_an_end).
        self.pool.commit(lease, list(tokens), prompt_end, taken)

    def discard(self, lease: Lease) -> None:
        if self.pool is not None and lease.open:
            self.pool.discard(lease)

    def note_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 32 and seconds > 0:
            self.prefill_tokens_per_s = 0.5 * self.prefill_tokens_per_s + 0.5 * tokens / seconds

    def token_logprob(self, token: int, row, top_k: int) -> TokenLogprob:
        top: list[TopLogprob] = []
        if top_k > 0:
            k = min(top_k, row.shape[-1])
            ids = mx.argpartition(-row, k - 1)[:k]
            values = row[ids]
            pairs = sorted(zip(ids.tolist(), values.tolist()), key=lambda p: -p[1])
            top = [TopLogprob(token=int(i), logprob=float(v)) for i, v in pairs]
        return TokenLogprob(token=token, logprob=float(row[token].item()), top=top)

    def facts(self, plan: RestorePlan, prompt: list[int], from_disk: bool) -> CacheFacts:
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

    # ------------------------------------------------------------- memory

    def _from_disk(self, plan: RestorePlan, hints: list[int], splits: list[tuple[int, int]] = ()) -> Lease | None:
        """A lease restored from the disk tier, when it goes deeper and loads faster than recomputing."""
        if self.disk is None:
            return None
        hit = self.disk.lookup(plan.prompt, plan.namespace)
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
        lease = self.pool.lease_restored(plan.prompt, hints, cache, checkpoint, splits, plan.namespace)
        lease.from_disk = True
        return lease

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

    def _fits(self, plan: RestorePlan, max_tokens: int, extra_bytes: int = 0) -> bool:
        return self._active_memory() + self._need(plan, max_tokens) + extra_bytes <= self.memory_limit

    def _guard_memory(self, plan: RestorePlan, max_tokens: int, extra_bytes: int = 0) -> None:
        active = self._active_memory()
        if active + self._need(plan, max_tokens) + extra_bytes > self.memory_limit:
            raise InsufficientMemory(self._need(plan, max_tokens) + extra_bytes, self.memory_limit - active, self.memory_limit)

    def _active_memory(self) -> int:
        # Sharded: the most any rank uses, so every rank's guard takes the same decision.
        return self._agreed(max, mx.get_active_memory())

    def _agreed(self, op, value: int) -> int:
        if self.ranks is None:
            return value
        return self.ranks.max(value) if op is max else self.ranks.min(value)

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
        if self.ranks is not None:  # equal shards keep the ranks' pools byte for byte alike
            self.ranks.require_equal("KV bytes per token", kv_per_token)
            self.ranks.require_equal("snapshot bytes", snapshot_bytes)
        return CacheLayout(
            layer_kinds=[kind_name(c) for c in cache],
            kv_bytes_per_token=kv_per_token,
            snapshot_bytes=snapshot_bytes,
            cacheable=self.ops is not None,
            uncached_reason=uncached_reason,
        )


def _as_exception(error: Error) -> Exception:
    if error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED:
        return ContextLengthExceeded(error.message)
    if error.code is ErrorCode.INSUFFICIENT_MEMORY:
        return MemoryError(error.message)
    if error.code is ErrorCode.BAD_REQUEST:
        return ValueError(error.message)
    return RuntimeError(error.message)


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


def load_engine(model_path: str, config: EngineConfig, model_id: str | None = None, ranks: Any = None) -> Engine:
    """The engine of `model_path`; with `ranks` (a sharded worker), this rank's tensor-parallel shard of it."""
    from mlx_lm.utils import _download, load_model

    from worker.model_files import check_model_dir

    path = check_model_dir(Path(_download(model_path)), model_path)
    if ranks is None:
        model, model_config = load_model(path)
    else:  # as mlx_lm.utils.sharded_load: load lazily, keep this rank's part, then read it
        model, model_config = load_model(path, lazy=True)
        if not hasattr(model, "shard"):
            raise ValueError(f"{model_path}: mlx-lm has no tensor-parallel sharding for this architecture")
        model.shard(ranks.group)
        mx.eval(model.parameters())
    vocab_size = int(model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size") or 0)
    if vocab_size <= 0:
        vocab_size = model.model.embed_tokens.weight.shape[0]  # every mlx-lm LM we serve names it so
    limit = _context_limit(model_config or _read_config(path))
    engine = Engine(model, model_id or model_path, config, limit, vocab_size, model_fingerprint(path), ranks)
    engine.grammars = ModelGrammars(path, vocab_size)
    engine.grammars.load_in_background()
    return engine

"""Pool benchmarks: figures printed, nothing asserted (machines here are noisy).

    .venv/bin/python -m tests.benchmarks.bench_pool [--json FILE]

1. restore: continuing a stored sequence costs no copy proportional to its length
   (synthetic cache arrays in a real tiny qwen3_next cache, 1K..16K tokens);
2. lookup: plan() for a 100K-token prompt against a pool of 50 stored sequences;
3. memory: pool bytes after a 20-turn conversation against the KV of its longest sequence;
4. interval: recomputed tokens, snapshot bytes and snapshot overhead per checkpoint interval;
5. eviction: commit + evict per request with 50..5,000 stored sequences under a budget that
   forces eviction on every commit (the pool's own bookkeeping, over fake caches).

`--only eviction` runs one section.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from protocol.messages import Generate, RestoreKind, SamplingParams
from tests.unit.fake_cache_ops import FakeOps
from worker.cache_adapters import CacheListAdapter, ModelCacheOps
from worker.engine import EngineConfig, load_engine
from worker.pool import CheckpointPool, TakenCheckpoint
from worker.tiny_models import make_model


def synthetic_cache(ops: ModelCacheOps, length: int) -> list:
    """A real mlx-lm cache filled with random states, as if `length` tokens had been seen."""
    cache = ops.new_cache()
    for layer in cache:
        if hasattr(layer, "update_and_fetch"):
            keys = mx.random.normal((1, 2, length, 32))
            layer.update_and_fetch(keys, keys)
        else:
            layer.cache = [mx.random.normal((1, 3, 192)), mx.random.normal((1, 4, 32, 32))]
    mx.eval([c.state for c in cache])
    return cache


def bench_restore(model_dir: Path) -> list[dict]:
    engine = load_engine(str(model_dir), EngineConfig())
    ops = engine.ops
    rows = []
    for length in (1024, 2048, 4096, 8192, 16384):
        pool = CheckpointPool(ops, 1 << 34)
        tokens = [random.randrange(1000) for _ in range(length)]
        cache = synthetic_cache(ops, length)
        lease = pool.checkout(pool.plan(tokens))
        lease.cache = cache
        pool.commit(lease, tokens, length, [TakenCheckpoint(length, RestoreKind.PROMPT_END, ops.snapshot(cache, length))])
        lookups, restores = [], []
        for i in range(20):
            prompt = tokens + [7, i]
            start = time.perf_counter()
            plan = pool.plan(prompt)
            planned = time.perf_counter()
            lease = pool.checkout(plan)
            mx.eval([c.state for c in lease.cache])
            restores.append(time.perf_counter() - planned)
            lookups.append(planned - start)
            assert plan.in_place and plan.restore_point == length
            pool.commit(lease, tokens, length, [])  # put it back unchanged
        rows.append({
            "stored_tokens": length,
            "restore_ms_median": statistics.median(restores) * 1e3,
            "lookup_ms_median": statistics.median(lookups) * 1e3,
        })
    return rows


def bench_lookup() -> dict:
    rng = random.Random(0)
    pool = CheckpointPool(FakeOps(), 1 << 60, checkpoint_interval=256)
    base = [rng.randrange(150_000) for _ in range(100_000)]
    for i in range(50):
        cut = rng.randrange(1_000, 100_000)
        tokens = base[:cut] + [rng.randrange(150_000) for _ in range(2_000)]
        plan = pool.plan(tokens, hints=range(0, len(tokens), 4096))
        lease = pool.checkout(plan)
        lease.cache[:] = tokens
        taken = [TakenCheckpoint(p, k, pool.ops.snapshot(tokens[:p], p)) for p, k in plan.checkpoints_to_take.items()]
        pool.commit(lease, tokens, len(tokens), taken)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        plan = pool.plan(base, hints=range(0, len(base), 4096))
        times.append(time.perf_counter() - start)
    return {
        "prompt_tokens": len(base),
        "stored_sequences": len(pool.sequences),
        "checkpoints": pool.stats().checkpoints,
        "restore_point": plan.restore_point,
        "lookup_ms_median": statistics.median(times) * 1e3,
        "lookup_ms_max": max(times) * 1e3,
    }


def bench_conversation_memory(model_dir: Path, turns: int = 20) -> dict:
    engine = load_engine(str(model_dir), EngineConfig(checkpoint_interval=64))
    rng = random.Random(2)
    prompt: list[int] = []
    for turn in range(turns):
        prompt = prompt + [rng.randrange(20, 900) for _ in range(30)]
        out: list[int] = []
        engine.generate(
            Generate(f"t{turn}", prompt, SamplingParams(max_tokens=16), [len(prompt) - 30]),
            lambda m: out.extend(getattr(m, "tokens", [])),
            lambda: False,
        )
        prompt = prompt + out
    pool = engine.pool
    longest = max(len(s.tokens) for s in pool.sequences.values())
    kv_bytes = longest * engine.layout.kv_bytes_per_token
    pool_kv = sum(kv_nbytes(engine.ops, s.cache) for s in pool.sequences.values())
    # Everything that is not full-attention KV is state at some position: the
    # checkpoints, and the live recurrent state of each stored sequence.
    snapshot_bytes = pool.nbytes - pool_kv
    return {
        "turns": turns,
        "longest_sequence_tokens": longest,
        "kv_bytes_of_longest": kv_bytes,
        "pool_kv_bytes": pool_kv,
        "snapshot_bytes": snapshot_bytes,
        "pool_bytes": pool.nbytes,
        "bound_bytes": int(1.25 * kv_bytes) + snapshot_bytes,
        "pool_kv_over_kv_of_longest": pool_kv / kv_bytes,
        "sequences": len(pool.sequences),
        "checkpoints": pool.stats().checkpoints,
    }


def kv_nbytes(ops: ModelCacheOps, cache: list) -> int:
    def layer(adapter, c) -> int:
        if isinstance(adapter, CacheListAdapter):
            return sum(layer(a, child) for a, child in zip(adapter.children, c.caches))
        return adapter.nbytes(c) if adapter.rewindable else 0

    return sum(layer(a, c) for a, c in zip(ops.adapters, cache))


def bench_interval(model_dir: Path) -> list[dict]:
    """For each interval: questions diverging at random places in one long message."""
    rng = random.Random(3)
    message = [rng.randrange(20, 900) for _ in range(1024)]
    cuts = [rng.randrange(64, 1000) for _ in range(6)]
    rows = []
    cold = load_engine(str(model_dir), EngineConfig(cache_enabled=False))
    for interval in (64, 128, 256, 512, 1024):
        engine = load_engine(str(model_dir), EngineConfig(checkpoint_interval=interval))
        noop = lambda m: None
        with_ckpts, without = [], []
        for rep in range(3):  # interleaved, medians: this machine is noisy
            engine.pool.clear()
            start = time.perf_counter()
            engine.generate(Generate("doc", message, SamplingParams(max_tokens=1)), noop, lambda: False)
            with_ckpts.append(time.perf_counter() - start)
            start = time.perf_counter()
            cold.generate(Generate("doc", message, SamplingParams(max_tokens=1)), noop, lambda: False)
            without.append(time.perf_counter() - start)
        with_ckpts, without = statistics.median(with_ckpts), statistics.median(without)
        recomputed = []
        for i, cut in enumerate(cuts):
            question = message[:cut] + [rng.randrange(20, 900) for _ in range(8)]
            r = engine.generate(Generate(f"q{i}", question, SamplingParams(max_tokens=1)), noop, lambda: False)
            recomputed.append(r.facts.recomputed_tokens - 8)
        pool = engine.pool
        snap = sum(c.snapshot.nbytes for n in pool.trie.nodes() for c in n.checkpoints.values() if c.snapshot)
        rows.append({
            "interval": interval,
            "mean_recomputed_beyond_question": statistics.mean(recomputed),
            "snapshot_bytes": snap,
            "prefill_1k_with_checkpoints_s": with_ckpts,
            "prefill_1k_uncached_s": without,
        })
    return rows


def bench_eviction(sizes=(50, 200, 800, 1600, 5000), requests: int = 300) -> list[dict]:
    """Agents over one system prompt; the budget holds `n` of them, so every commit evicts."""
    rows = []
    rng = random.Random(3)
    system = list(range(1000, 1100))
    for n in sizes:
        per_sequence = 170 * 10 + 6 * 7  # FakeOps: 10 B a token, 7 B a snapshot
        pool = CheckpointPool(FakeOps(True), n * per_sequence, 64, 16)

        def one(i: int) -> float:
            prompt = system + [2000 + i % 97, 3000 + i] + [rng.randrange(10, 900) for _ in range(60)]
            started = time.perf_counter()
            lease = pool.lease(prompt, [len(system)])
            for token in prompt[lease.plan.restore_point:]:
                lease.cache.append(token)
            taken = [TakenCheckpoint(pos, kind, pool.ops.snapshot(lease.cache[:pos], pos))
                     for pos, kind in lease.plan.checkpoints_to_take.items()]
            pool.commit(lease, prompt, len(prompt), taken)
            return time.perf_counter() - started

        for i in range(int(n * 1.2)):  # fill past the budget
            one(i)
        times = [one(n * 2 + i) * 1000 for i in range(requests)]
        rows.append({
            "stored_sequences": len(pool.sequences),
            "budget_sequences": n,
            "commit_evict_ms_median": statistics.median(times),
            "commit_evict_ms_p95": sorted(times)[int(0.95 * len(times))],
            "evictions": pool.evictions,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["eviction"], default=None)
    args = parser.parse_args()
    if args.only == "eviction":
        results = {"eviction": bench_eviction()}
        print_eviction(results["eviction"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model("qwen3_next", Path(tmp) / "qwen3_next", seed=0)
        results = {
            "restore": bench_restore(model_dir),
            "lookup": bench_lookup(),
            "conversation_memory": bench_conversation_memory(model_dir),
            "interval": bench_interval(model_dir),
            "eviction": bench_eviction(),
        }
    print("restore (continue a stored sequence in place):")
    for row in results["restore"]:
        print(f"  {row['stored_tokens']:>6} stored tokens: restore {row['restore_ms_median']:.3f} ms, "
              f"lookup {row['lookup_ms_median']:.3f} ms")
    lk = results["lookup"]
    print(f"lookup: {lk['prompt_tokens']}-token prompt vs {lk['stored_sequences']} sequences, "
          f"{lk['checkpoints']} checkpoints: median {lk['lookup_ms_median']:.2f} ms, max {lk['lookup_ms_max']:.2f} ms")
    m = results["conversation_memory"]
    print(f"20-turn conversation ({m['longest_sequence_tokens']} tokens): pool {m['pool_bytes']} B vs bound "
          f"{m['bound_bytes']} B = 1.25 x KV of longest ({m['kv_bytes_of_longest']} B) + snapshots "
          f"({m['snapshot_bytes']} B); KV held = {m['pool_kv_over_kv_of_longest']:.3f} x KV of longest; "
          f"{m['sequences']} sequence(s), {m['checkpoints']} checkpoints")
    print("checkpoint interval:")
    for row in results["interval"]:
        print(f"  {row['interval']:>5}: recomputed beyond the question {row['mean_recomputed_beyond_question']:.0f} tok, "
              f"snapshots {row['snapshot_bytes']} B, 1K prefill {row['prefill_1k_with_checkpoints_s']:.2f} s "
              f"vs uncached {row['prefill_1k_uncached_s']:.2f} s")
    print_eviction(results["eviction"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_eviction(rows: list[dict]) -> None:
    print("commit + evict per request, budget forcing eviction:")
    for row in rows:
        print(f"  {row['stored_sequences']:>5} stored sequences: median {row['commit_evict_ms_median']:.2f} ms, "
              f"p95 {row['commit_evict_ms_p95']:.2f} ms ({row['evictions']} evictions)")


if __name__ == "__main__":
    main()

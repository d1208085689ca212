"""What routing a request among replicas costs the proxy: figures printed, the 1 ms target checked.

    .venv/bin/python -m tests.benchmarks.bench_routing [--replicas 16] [--sequences 256] [--tokens 8192]
                                                       [--requests 2000] [--json FILE]

Simulated, no model, no worker: each of `replicas` pools holds `sequences` conversations of up to
`tokens` tokens (agents sharing a system prompt, each with its own history), told to one
`proxy.routing.Router` as the workers' CacheEvents would (protocol.prefix_hash block hashes).
Between requests the pools churn (a sequence grows, one is evicted) as events. Per request:
hashing its prompt (`block_hashes`, PREFIX_BLOCK_TOKENS per block), then `Router.route` (the
longest held prefix on every replica, the policy, the pending entry). Medians and p99 printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Optional

from protocol.messages import CacheEvents
from protocol.prefix_hash import PREFIX_BLOCK_TOKENS, block_hashes
from proxy.routing import ReplicaLoad, RoutePolicy, Router

TARGET_MS = 1.0
SYSTEM_TOKENS = 1024


def conversation(rng: random.Random, system: list[int], tokens: int) -> list[int]:
    return system + [rng.randrange(150_000) for _ in range(rng.randrange(tokens // 4, tokens - len(system) + 1))]


def run(replicas: int = 16, sequences: int = 256, tokens: int = 8192, requests: int = 2000, seed: int = 0) -> dict:
    rng = random.Random(seed)
    system = [rng.randrange(150_000) for _ in range(min(SYSTEM_TOKENS, tokens // 4))]
    router = Router(RoutePolicy(prefill_tps=2000))
    pools: list[list[list[int]]] = []
    start = time.perf_counter()
    events = 0
    for replica in range(replicas):
        convs = [conversation(rng, system, tokens) for _ in range(sequences)]
        pools.append(convs)
        stored = sorted({h for c in convs for h in block_hashes(c)})
        router.index.apply(replica, CacheEvents(PREFIX_BLOCK_TOKENS, stored=stored, reset=True))
        events += len(stored)
    load_s = time.perf_counter() - start
    hash_ms, route_ms, apply_us = [], [], []
    for i in range(requests):
        replica = rng.randrange(replicas)
        conv = rng.choice(pools[replica])
        prompt = conv + [rng.randrange(150_000) for _ in range(200)]  # the agent's next turn
        t0 = time.perf_counter()
        hashes = block_hashes(prompt)
        t1 = time.perf_counter()
        loads = [ReplicaLoad(r, rng.randrange(3), rng.randrange(9), 8, 32, 2.0, 2000.0) for r in range(replicas)]
        router.route(loads, hashes, len(prompt))
        t2 = time.perf_counter()
        hash_ms.append((t1 - t0) * 1e3)
        route_ms.append((t2 - t1) * 1e3)
        # Churn: this conversation grows on its replica, another one there is evicted.
        old = block_hashes(pools[replica].pop(rng.randrange(len(pools[replica]))))
        new = block_hashes(prompt)
        pools[replica].append(prompt[:tokens])
        t3 = time.perf_counter()
        kept = set(new)
        gone = [h for h in old[len(system) // PREFIX_BLOCK_TOKENS :] if h not in kept]  # the system prompt stays
        router.index.apply(replica, CacheEvents(PREFIX_BLOCK_TOKENS, stored=new, removed=gone))
        apply_us.append((time.perf_counter() - t3) * 1e6)
    blocks = sum(router.index.blocks(r) for r in range(replicas))
    return {
        "replicas": replicas,
        "blocks_held": blocks,
        "initial_events": events,
        "initial_load_s": round(load_s, 2),
        "prompt_tokens_mean": tokens * 5 // 8 + 200,
        "hash_ms_median": round(statistics.median(hash_ms), 4),
        "route_ms_median": round(statistics.median(route_ms), 4),
        "route_ms_p99": round(sorted(route_ms)[int(0.99 * len(route_ms))], 4),
        "total_ms_median": round(statistics.median(h + r for h, r in zip(hash_ms, route_ms)), 4),
        "total_ms_p99": round(sorted(h + r for h, r in zip(hash_ms, route_ms))[int(0.99 * len(route_ms))], 4),
        "apply_event_message_us_median": round(statistics.median(apply_us), 1),
        "decisions": {reason.value: sum(n for (_, why), n in router.decisions.items() if why is reason)
                      for reason in {why for _, why in router.decisions}},  # fmt: skip
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=256, help="conversations per replica's pool")
    parser.add_argument("--tokens", type=int, default=8192, help="longest conversation")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.replicas, args.sequences, args.tokens, args.requests)
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    verdict = "meets" if figures["total_ms_median"] < TARGET_MS else "MISSES"
    print(f"routing overhead per request {figures['total_ms_median']:.3f} ms median "
          f"({figures['route_ms_median']:.3f} ms routing + {figures['hash_ms_median']:.3f} ms hashing): "
          f"{verdict} the {TARGET_MS} ms target")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the per-request checks of the HTTP edge cost: figures printed, the target checked, nothing asserted.

    .venv/bin/python -m tests.benchmarks.bench_edge [--rounds 7] [--iterations 20000] [--json FILE]

Each variant runs a real aiohttp request object (`make_mocked_request`, headers as a client
sends them) through a middleware to a handler that returns at once, `iterations` times in a
row, in one event loop; the variants are interleaved within each round, their order rotating,
and the per-request figure is the median over rounds, in microseconds. The baseline is the
same chain with a pass-through middleware, so "added" is what the check itself costs:

- auth, 1 key / 100 keys: `proxy.auth`'s middleware with a key that matches (Bearer);
- auth, wrong key: the 401 path (the exception the error middleware turns into the answer);
- identify: `ApiKeys.identify` alone, outside any middleware;
- namespace: `proxy.namespace.cache_namespace(client_id, cache_salt)`, with and without a salt.

Target: auth + namespace add < 0.1 ms a request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.auth import ApiKeys, auth_middleware, key_id
from proxy.errors import Unauthorized
from proxy.namespace import cache_namespace

TARGET_US = 100.0
KEY = "sk-bench-0123456789abcdef0123456789abcdef"

Variant = Callable[[int], Awaitable[float]]  # iterations -> seconds


def _request(key: str) -> web.Request:
    return make_mocked_request("POST", "/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "User-Agent": "OpenAI/Python 1.0"})


async def _ok(request: web.Request) -> web.StreamResponse:
    return _RESPONSE


_RESPONSE = web.Response()


@web.middleware
async def _passthrough(request: web.Request, handler: Callable) -> web.StreamResponse:
    return await handler(request)


def _through(middleware: Callable, key: str, catch: bool = False) -> Variant:
    request = _request(key)

    async def run(iterations: int) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            try:
                await middleware(request, _ok)
            except Unauthorized:
                if not catch:
                    raise
        return time.perf_counter() - start

    return run


def _identify(keys: ApiKeys) -> Variant:
    headers = _request(KEY).headers

    async def run(iterations: int) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            keys.identify(headers)
        return time.perf_counter() - start

    return run


def _namespace(salt: Optional[str]) -> Variant:
    ident = key_id(KEY)

    async def run(iterations: int) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            cache_namespace(ident, salt)
        return time.perf_counter() - start

    return run


def variants() -> dict[str, Variant]:
    one = ApiKeys([KEY])
    hundred = ApiKeys([KEY] + [f"sk-other-{i:04d}-{'x' * 32}" for i in range(99)])
    return {
        "baseline (pass-through middleware)": _through(_passthrough, KEY),
        "auth, 1 key": _through(auth_middleware(one, False), KEY),
        "auth, 100 keys": _through(auth_middleware(hundred, False), KEY),
        "auth, wrong key (401)": _through(auth_middleware(one, False), "sk-wrong", catch=True),
        "identify alone": _identify(one),
        "namespace, no salt": _namespace(None),
        "namespace, salt": _namespace("a-salt"),
    }


def measure(rounds: int, iterations: int) -> dict[str, Any]:
    runnable = variants()
    per_round: dict[str, list[float]] = {name: [] for name in runnable}

    async def go() -> None:
        names = list(runnable)
        for name in names:  # warm up
            await runnable[name](max(10, iterations // 10))
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                per_round[name].append(await runnable[name](iterations) / iterations * 1e6)

    asyncio.run(go())
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    base = medians["baseline (pass-through middleware)"]
    rows = []
    for name in runnable:
        added = None if name.startswith("baseline") else medians[name] - base if name.startswith("auth") else medians[name]
        rows.append({"variant": name, "us_per_request": medians[name], "added_us": added,
                     "min_us": min(per_round[name]), "max_us": max(per_round[name])})
    worst_auth = max(medians[n] - base for n in medians if n.startswith("auth,") and "wrong" not in n)
    worst_namespace = max(medians[n] for n in medians if n.startswith("namespace"))
    total = worst_auth + worst_namespace
    return {
        "rounds": rounds, "iterations": iterations, "rows": rows,
        "auth_plus_namespace_added_us": total, "target_us": TARGET_US, "met": total < TARGET_US,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.iterations)
    print(f"per request, median of {args.rounds} interleaved rounds of {args.iterations}:")
    print(f"  {'variant':<36} {'us':>8} {'added us':>9} {'min-max us':>14}")
    for row in result["rows"]:
        if row["us_per_request"] is None:
            print(f"  {row['variant']:<36} {'-':>8} {'-':>9}  ({row['note']})")
            continue
        spread = f"{row['min_us']:.2f}-{row['max_us']:.2f}"
        added = "-" if row["added_us"] is None else f"{row['added_us']:.2f}"
        print(f"  {row['variant']:<36} {row['us_per_request']:8.2f} {added:>9} {spread:>14}")
    print(f"auth + namespace add {result['auth_plus_namespace_added_us']:.2f} us a request: "
          f"{'meets' if result['met'] else 'MISSES'} the target of < {TARGET_US:.0f} us")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

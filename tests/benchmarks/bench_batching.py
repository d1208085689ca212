"""Concurrent clients: the proxy batching, the proxy one request at a time, mlx_lm.server. Figures, not assertions.

    .venv/bin/python -m tests.benchmarks.bench_batching [--archs qwen3_next,gemma3_text,llama] [--rounds 3]
        [--ns 1,2,4,8] [--servers proxy,proxy-mb1,mlx_lm.server] [--json FILE] [--logs DIR]

Workloads: greedy (temperature 0), streamed through the `openai` client, one thread per client, all
clients released together (a barrier), each client's turns one after the other:
- chat, N = 1, 2, 4, 8 clients: each an independent 3-turn chat (workloads.chat) with a ~300-word
  system prompt of its own, a short user message per turn, 64 tokens out (`max_tokens`; a reply that
  stops early is counted as it is), the reply appended for the next turn;
- shared, 4 agents: the same, but over ONE ~800-word system prompt, each agent its own user messages.

Servers, on the same tiny random-weight model per arch (worker/tiny_models.py, weights seed 1 by
default: with make_model's seed 0 the llama model ends most replies on EOS within a few tokens, which
leaves little decode to measure), started side by side once per arch and reused across rounds, each
warmed up by one short request pair first:
- proxy: `mlx-cache-proxy serve` with its default --max-batch (--proxy-args adds flags);
- proxy-mb1: `serve --max-batch 1` (--proxy-mb1-args replaces that);
- mlx_lm.server through bench_vs_upstream's shim, with its own default batching.
The caches as in bench_vs_upstream: no byte budget to speak of, no entry limit for mlx_lm.server,
the proxy's disk tier off.

Order: per round, per workload config, each server in turn; the server order rotates per round.

Cache state: neither server can be told over HTTP to empty its cache, and restarting per workload would
contradict reusing the servers, so every (round, workload config) gets prompts of its own, from a seed;
within a round all servers get the same prompts. Nothing an earlier run left warms a later one, apart
from the few opening tokens of the chat template (`<|im_start|>system\\n`) that every prompt shares.

Per (arch, workload, N, server, round): wall time (release to the last reply), aggregate generated
tokens/s (completion tokens / wall), decode tokens/s per stream (tokens after the first / time from the
first to the last text chunk, over all requests), mean and p95 (nearest rank) TTFT (first chunk carrying
generated text), prompt and cached tokens (`usage.prompt_tokens_details.cached_tokens`, summed over all
requests), and CPU seconds of the serving processes (the proxy and its worker, or mlx_lm.server).
Reported: medians over rounds with min-max; ratios computed per round (the same round's pair), then
their median and min-max; the target checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from tests.benchmarks import workloads as wl
from tests.benchmarks.bench_vs_upstream import (
    BIG, DEFAULT_ARCHS, PROXY, UPSTREAM, UPSTREAM_CACHE_SIZE, Sent, Server, command_line, free_port, openai_client,
    print_aligned, print_run, proxy_server, run_header, server_cpu, stream_chat, upstream_server,
)
from worker.tiny_models import ARCHITECTURES, make_model

PROXY_MB1 = "proxy-mb1"
SERVERS = (PROXY, PROXY_MB1, UPSTREAM)
CHAT, SHARED = "chat", "shared"


# ------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Config:
    """One workload at one number of concurrent clients; `index` (its place in the run) seeds its prompts."""

    workload: str  # CHAT or SHARED
    n: int
    index: int


def workload_configs(ns: list[int], shared_agents: int) -> list[Config]:
    configs = [(CHAT, n) for n in ns] + ([(SHARED, shared_agents)] if shared_agents else [])
    return [Config(workload, n, i) for i, (workload, n) in enumerate(configs)]


def prompt_seed(round_: int, config: Config) -> int:
    """Distinct per (round, config); round -1 is the warm-up. Clients add 1..99."""
    return 10_000 * (round_ + 1) + 100 * config.index


def client_scripts(config: Config, round_: int, turns: int, args: argparse.Namespace) -> list[wl.Script]:
    """One script per client: prompts of their own per (round, config), the same on every server."""
    seed = prompt_seed(round_, config)
    size = replace(wl.SIZES["small"], chat_system_words=args.system_words, chat_user_words=args.user_words)
    shared = wl.Prose(seed).text(args.shared_words) if config.workload == SHARED else None
    return [wl.chat(size, seed + 1 + client, turns, system=shared) for client in range(config.n)]


# ------------------------------------------------------------------ clients


def run_client(client, script: wl.Script, max_tokens: int, release: threading.Barrier) -> list[Sent]:
    """One client's conversation, request after request, once every client is ready."""
    release.wait(timeout=60)
    sent: list[Sent] = []
    try:
        step = next(script)
        while True:
            sent.append(stream_chat(client, step.messages, max_tokens=max_tokens))
            step = script.send(wl.Reply(sent[-1].content, sent[-1].reasoning))
    except StopIteration:
        return sent


def run_clients(server: Server, scripts: list[wl.Script], max_tokens: int) -> tuple[float, dict[str, float], list[Sent]]:
    """Each script in a thread of its own, released together. Returns the wall seconds from the release
    to the last reply, the CPU seconds by role over that time (server_cpu), and every request's figures."""
    clients = [openai_client(server) for _ in scripts]
    release = threading.Barrier(len(scripts) + 1)
    try:
        with ThreadPoolExecutor(len(scripts)) as pool:
            futures = [pool.submit(run_client, c, s, max_tokens, release) for c, s in zip(clients, scripts)]
            cpu_before = server_cpu(server)
            release.wait(timeout=60)
            start = time.perf_counter()
            sent = [s for f in futures for s in f.result()]
            wall = time.perf_counter() - start
            cpu_after = server_cpu(server)
    finally:
        for client in clients:
            client.close()
    return wall, {role: cpu_after[role] - cpu_before[role] for role in cpu_before}, sent


# ------------------------------------------------------------------ one measurement


@dataclass
class Row:
    arch: str
    workload: str
    n: int
    server: str
    round: int
    wall_s: Optional[float] = None
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    short_replies: int = 0  # stopped before max_tokens; what they generated is counted
    tok_s: Optional[float] = None  # completion tokens / wall, all clients together
    decode_tok_s: Optional[float] = None  # per stream, after its first token
    ttft_mean_ms: Optional[float] = None
    ttft_p95_ms: Optional[float] = None
    cpu_s: Optional[float] = None  # the serving processes: proxy + worker, or mlx_lm.server
    cpu_by_role: dict = field(default_factory=dict)  # server, worker, client (this process)
    error: Optional[str] = None
    ttfts_ms: list[float] = field(default_factory=list)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def fill_row(row: Row, wall: float, cpu: dict[str, float], sent: list[Sent], max_tokens: int) -> None:
    row.wall_s = wall
    row.requests = len(sent)
    row.prompt_tokens = sum(s.prompt_tokens for s in sent)
    row.cached_tokens = sum(s.cached_tokens or 0 for s in sent)
    row.completion_tokens = sum(s.completion_tokens for s in sent)
    row.short_replies = sum(s.completion_tokens < max_tokens for s in sent)
    row.tok_s = row.completion_tokens / wall
    streams = [s for s in sent if s.completion_tokens > 1 and s.last_text_s and s.last_text_s > s.first_text_s]
    decode_s = sum(s.last_text_s - s.first_text_s for s in streams)
    row.decode_tok_s = sum(s.completion_tokens - 1 for s in streams) / decode_s if decode_s else None
    row.ttfts_ms = [s.ttft_s * 1e3 for s in sent]
    row.ttft_mean_ms = statistics.fmean(row.ttfts_ms)
    row.ttft_p95_ms = p95(row.ttfts_ms)
    row.cpu_by_role = cpu
    row.cpu_s = cpu["server"] + cpu["worker"]


def measure(server: Server, arch: str, config: Config, round_: int, args: argparse.Namespace) -> Row:
    row = Row(arch, config.workload, config.n, server.kind, round_)
    scripts = client_scripts(config, round_, args.turns, args)
    try:
        fill_row(row, *run_clients(server, scripts, args.max_tokens), args.max_tokens)
    except Exception as exc:  # reported in the table and the JSON; the run goes on
        row.error = f"{type(exc).__name__}: {exc}\n--- {server.kind} log tail ---\n{server.log_tail(40)}"
        print(f"!! {arch} round {round_} {config.workload} N={config.n} {server.kind}: {row.error}", file=sys.stderr)
    return row


# ------------------------------------------------------------------ one arch


def start_server(kind: str, model_dir: Path, log: Path, args: argparse.Namespace) -> Server:
    if kind == UPSTREAM:
        return upstream_server(model_dir, free_port(), log, BIG, UPSTREAM_CACHE_SIZE)
    extra = args.proxy_args if kind == PROXY else args.proxy_mb1_args
    server = proxy_server(model_dir, free_port(), log, BIG, disk_tier=False, extra=extra)
    server.kind = kind
    return server


def rotated(servers: list[str], round_: int) -> list[str]:
    k = round_ % len(servers)
    return servers[k:] + servers[:k]


def run_arch(arch: str, model_dir: Path, configs: list[Config], args: argparse.Namespace, logs: Path) -> list[Row]:
    """Every server started once, warmed up, then the rounds; all stopped in `finally`."""
    rows: list[Row] = []
    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        for kind in args.servers:
            server = start_server(kind, model_dir, logs / f"{arch}.{kind}.log", args)
            stack.callback(server.stop)
            server.start()
            servers[kind] = server
        for server in servers.values():
            server.wait_ready(args.start_timeout)
        warm_up = Config(CHAT, 2, 0)
        for server in servers.values():  # first-request costs (loading, compiling) out of the figures
            try:
                run_clients(server, client_scripts(warm_up, -1, 1, args), 8)
            except Exception as exc:
                raise RuntimeError(f"{server.kind} warm-up: {exc}\n{server.log_tail()}") from exc
        for round_ in range(args.rounds):
            for config in configs:
                for kind in rotated(args.servers, round_):
                    row = measure(servers[kind], arch, config, round_, args)
                    rows.append(row)
                    print(progress(row), flush=True)
    return rows


def progress(r: Row) -> str:
    where = f"[{r.arch}] round {r.round} {r.workload} N={r.n} {r.server}"
    if r.error:
        return f"{where}: ERROR"
    short = f", {r.short_replies} short" if r.short_replies else ""
    return (f"{where}: wall {r.wall_s:.2f} s, {r.tok_s:.0f} tok/s, TTFT {r.ttft_mean_ms:.0f}/{r.ttft_p95_ms:.0f} ms, "
            f"cached {r.cached_tokens}/{r.prompt_tokens}, CPU {r.cpu_s:.1f} s{short}")


# ------------------------------------------------------------------ summary


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Optional[Spread]:
        return cls(statistics.median(values), min(values), max(values)) if values else None

    def fmt(self, digits: int) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


# (Row field, column, digits)
METRICS = (
    ("wall_s", "wall s", 2), ("tok_s", "tok/s", 0), ("decode_tok_s", "decode tok/s/stream", 0),
    ("ttft_mean_ms", "mean TTFT ms", 0), ("ttft_p95_ms", "p95 TTFT ms", 0), ("cached_tokens", "cached tok", 0),
    ("prompt_tokens", "prompt tok", 0), ("cpu_s", "CPU s", 1),
)
# (name, Row field, numerator server, denominator server, column); decode only at N=1
RATIOS = (
    ("wall_vs_upstream", "wall_s", PROXY, UPSTREAM, "wall proxy/mlx_lm"),
    ("wall_vs_mb1", "wall_s", PROXY, PROXY_MB1, "wall proxy/mb1"),
    ("cached_vs_mb1", "cached_tokens", PROXY, PROXY_MB1, "cached proxy/mb1"),
    ("decode_vs_mb1", "decode_tok_s", PROXY, PROXY_MB1, "decode proxy/mb1 (N=1)"),
)

Key = tuple[str, str, int]  # arch, workload, N


Summary = dict[tuple[str, str, int, str], dict]  # (arch, workload, N, server) -> rounds and each metric's Spread


def summarize(rows: list[Row]) -> Summary:
    """Per (arch, workload, N, server): the rounds that ran, each metric's median and min-max over them."""
    by: dict[tuple[str, str, int, str], list[Row]] = {}
    for r in rows:
        by.setdefault((r.arch, r.workload, r.n, r.server), []).append(r)
    out = {}
    for key, group in by.items():
        ok = [r for r in group if not r.error]
        out[key] = {"rounds": len(ok), **{name: Spread.of([getattr(r, name) for r in ok if getattr(r, name) is not None])
                                          for name, _, _ in METRICS}}
    return out


def ratios_of(rows: list[Row]) -> dict[Key, dict[str, Optional[Spread]]]:
    """Per (arch, workload, N): each ratio computed per round from that round's pair, then median and min-max."""
    by: dict[Key, dict[tuple[int, str], Row]] = {}
    for r in rows:
        if not r.error:
            by.setdefault((r.arch, r.workload, r.n), {})[(r.round, r.server)] = r
    out: dict[Key, dict[str, Optional[Spread]]] = {}
    for key, runs in by.items():
        rounds = sorted({round_ for round_, _ in runs})
        out[key] = {}
        for name, metric, top, bottom, _ in RATIOS:
            if name == "decode_vs_mb1" and key[2] != 1:
                continue
            values = []
            for round_ in rounds:
                a, b = runs.get((round_, top)), runs.get((round_, bottom))
                if a and b and getattr(a, metric) is not None and getattr(b, metric):
                    values.append(getattr(a, metric) / getattr(b, metric))
            out[key][name] = Spread.of(values)
    return out


@dataclass(frozen=True)
class Check:
    where: str
    ratio: str
    op: str  # "<=", "<" or ">="
    target: float
    value: Optional[Spread]
    every_round: bool  # judged on the worst round (counts); else on the median (times, noisy)

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        if self.op == ">=":
            return (self.value.low if self.every_round else self.value.median) >= self.target
        seen = self.value.high if self.every_round else self.value.median
        return seen < self.target if self.op == "<" else seen <= self.target

    def line(self) -> str:
        status = {True: "met   ", False: "MISSED", None: "n/a   "}[self.met]
        value = self.value.fmt(2) if self.value else "not measured"
        basis = "every round" if self.every_round else "median"
        return f"{status} {self.where}: {self.ratio} {value} {self.op} {self.target} ({basis})"


def check_targets(ratios: dict[Key, dict[str, Optional[Spread]]]) -> list[Check]:
    checks = []
    for (arch, workload, n), r in ratios.items():
        where = f"{arch}/{workload}/N={n}"
        if workload == CHAT and n in (4, 8):
            checks.append(Check(where, "wall proxy/mlx_lm.server", "<=", 1.0, r.get("wall_vs_upstream"), False))
            checks.append(Check(where, "wall proxy/max-batch-1", "<=", 0.5, r.get("wall_vs_mb1"), False))
        if workload == SHARED:
            checks.append(Check(where, "wall proxy/max-batch-1", "<", 1.0, r.get("wall_vs_mb1"), False))
        checks.append(Check(where, "cached proxy/max-batch-1", ">=", 1.0, r.get("cached_vs_mb1"), True))
        if workload == CHAT and n == 1:
            checks.append(Check(where, "decode tok/s proxy/max-batch-1", ">=", 0.95, r.get("decode_vs_mb1"), False))
    return checks


# ------------------------------------------------------------------ report


def fmt(spread: Optional[Spread], digits: int) -> str:
    return spread.fmt(digits) if spread is not None else "-"


def print_summary(summary: Summary) -> None:
    lines = [["arch", "workload", "N", "server", "rounds", *(column for _, column, _ in METRICS)]]
    for (arch, workload, n, server), figures in summary.items():
        lines.append([arch, workload, str(n), server, str(figures["rounds"]),
                      *(fmt(figures[name], digits) for name, _, digits in METRICS)])
    print_aligned(lines, left=4)


def print_ratios(ratios: dict[Key, dict[str, Optional[Spread]]]) -> None:
    lines = [["arch", "workload", "N", *(column for *_, column in RATIOS)]]
    for (arch, workload, n), r in ratios.items():
        lines.append([arch, workload, str(n), *(fmt(r.get(name), 2) for name, *_ in RATIOS)])
    print_aligned(lines, left=3)


def in_run_order(summary: Summary, args: argparse.Namespace, configs: list[Config]) -> Summary:
    """The summary sorted as the run is laid out: arch, then workload config, then server."""
    order = {(a, c.workload, c.n, s): i for i, (a, c, s) in enumerate(
        (a, c, s) for a in args.archs for c in configs for s in SERVERS)}
    return dict(sorted(summary.items(), key=lambda item: order.get(item[0], len(order))))


def write_json(args, command, runtime, load, rows, summary, ratios, checks) -> None:
    def spreads(figures: dict) -> dict:
        return {name: asdict(s) if isinstance(s, Spread) else s for name, s in figures.items()}

    data = {
        **run_header(args, command, runtime, load),
        "rows": [asdict(r) for r in rows],
        "summary": [{"arch": a, "workload": w, "n": n, "server": s, **spreads(f)} for (a, w, n, s), f in summary.items()],
        "ratios": [{"arch": a, "workload": w, "n": n, **spreads(r)} for (a, w, n), r in ratios.items()],
        "checks": [{**asdict(c), "met": c.met} for c in checks],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_batching", description=__doc__.split("\n")[0])
    p.add_argument("--archs", default=DEFAULT_ARCHS, help=f"comma-separated, from {','.join(ARCHITECTURES)}")
    p.add_argument("--model-seed", type=int, default=1, help="weights seed of the tiny models (see the docstring)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ns", default="1,2,4,8", help="comma-separated numbers of concurrent chat clients")
    p.add_argument("--shared-agents", type=int, default=4, help="agents over one shared system prompt; 0: skip")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, from {','.join(SERVERS)}")
    p.add_argument("--proxy-args", default="", help="extra `serve` arguments of the batching proxy")
    p.add_argument("--proxy-mb1-args", default="--max-batch 1", help="extra `serve` arguments of proxy-mb1")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--system-words", type=int, default=300, help="each chat client's own system prompt")
    p.add_argument("--shared-words", type=int, default=800, help="the agents' shared system prompt")
    p.add_argument("--user-words", type=int, default=12)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--logs", type=Path, help="keep the server logs in this directory")
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.ns = [int(n) for n in args.ns.split(",") if n]
    args.servers = [s for s in args.servers.split(",") if s]
    args.proxy_args, args.proxy_mb1_args = shlex.split(args.proxy_args), shlex.split(args.proxy_mb1_args)
    for arch in args.archs:
        if arch not in ARCHITECTURES:
            p.error(f"unknown arch {arch!r}")
    for server in args.servers:
        if server not in SERVERS:
            p.error(f"unknown server {server!r}")
    if args.rounds < 1 or not args.servers or any(n < 1 for n in args.ns) or args.shared_agents < 0:
        p.error("need at least one round, one server, and client counts >= 1")
    if args.shared_agents > 99 or any(n > 99 for n in args.ns):
        p.error("at most 99 clients (prompt_seed)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()
    command = command_line("tests.benchmarks.bench_batching", argv)
    configs = workload_configs(args.ns, args.shared_agents)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            model_dir = make_model(arch, Path(tmp) / arch, seed=args.model_seed)
            rows.extend(run_arch(arch, model_dir, configs, args, logs))
    runtime = time.perf_counter() - started
    summary = in_run_order(summarize(rows), args, configs)
    ratios = ratios_of(rows)
    checks = check_targets(ratios)
    print("\nmedian [min-max] over rounds")
    print_summary(summary)
    print("\nratios per round, median [min-max]")
    print_ratios(ratios)
    print("\ntargets (not asserted):")
    for check in checks:
        print(f"  {check.line()}")
    short = sum(r.short_replies for r in rows)
    if short:
        print(f"\n{short} of {sum(r.requests for r in rows)} replies stopped before --max-tokens (counted as generated)")
    load = {"before": load_before, "after": os.getloadavg()}
    print_run(command, runtime, load)
    if args.json:
        write_json(args, command, runtime, load, rows, summary, ratios, checks)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

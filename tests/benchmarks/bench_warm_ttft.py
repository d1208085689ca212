"""Time to first token of a warm turn over a long cached history: the proxy, mlx_lm.server, and the
prefill of the new tokens alone in-process. Figures, not assertions.

    .venv/bin/python -m tests.benchmarks.bench_warm_ttft [--arch qwen3_next] [--lengths 2048,8192,16384,32768]
        [--rounds 3] [--json FILE] [--logs DIR]

Both servers are started once, side by side on loopback, on the same tiny random-weight model
(worker/tiny_models.py, chatml template), with bench_vs_upstream's settings: the same byte budget for
both and none to speak of (1 TiB), no entry limit for mlx_lm.server (started through bench_vs_upstream's
shim), the proxy's disk tier off, a fresh MLX_CACHE_PROXY_HOME. The proxy's context limit is the model's
(MAX_POSITIONS = 32768 tokens for the tiny models): a history of L tokens is cut to the largest that
leaves room for the warm turn's new tokens and one generated token, and the table says so.

Per history length L and round:
- a conversation (system prompt, then user / assistant messages of `--turn-words` words each, about
  2 tokens a word, from workloads.Prose, seeded by round and length so that nothing is cached from
  another round or length) ending with a user message, its rendered prompt (the model's chat template,
  as both servers render it) fitted to L tokens;
- the history: that conversation sent once to each server (streamed, max_tokens=1) to warm its cache;
- the floor, in this process with mlx-lm on the same model: the history's prompt prefilled into a
  make_prompt_cache cache, then `--prefill-repeats` times, on a copy of that cache, the warm turn's new
  tokens run as mlx-lm's generate_step runs a prompt: all but the last prefilled in chunks evaluating
  only the cache states, then the last token's logits and the greedy token (.item()). Timed: that;
- the warm turn: the conversation + a scripted assistant reply (`--reply-words`) + a new user message
  (`--user-words`, about 120 tokens), streamed with max_tokens=1, to each server. TTFT: from the
  request to the first streamed chunk carrying generated text, or to the end of the stream if none
  does (bench_vs_upstream.stream_chat). Also recorded: usage.prompt_tokens_details.cached_tokens, and
  for the proxy its worker's log line for the request (restored, recomputed, prefill and ttft).
Order per round: for each length, the history to both servers, the floor, the warm turn to both; which
server goes first alternates by round. The servers are not restarted between rounds or lengths.

Reported per length: medians over rounds of each server's warm TTFT and of the floor (over rounds x
repeats), the proxy minus the floor (median of the per-round differences; the target is < 20 ms), the
same for mlx_lm.server, and the cached tokens each server reported against the tokens a perfect cache
holds (the warm prompt's common prefix with the history's prompt). For the proxy, where its time over the
floor goes (medians of per-round differences): its worker's logged TTFT over the floor, the proxy's
logged TTFT over its worker's (the proxy's own work between the request and the worker), and the client's
TTFT over the proxy's log (HTTP both ways, JSON, the client library).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tests.benchmarks import workloads as wl
from tests.benchmarks.bench_vs_upstream import (
    BIG, PROXY, UPSTREAM, UPSTREAM_CACHE_SIZE, Reference, Sent, Server, command_line, free_port, openai_client,
    print_aligned, print_run, proxy_server, run_header, stream_chat, upstream_server,
)
from worker.tiny_models import ARCHITECTURES, MAX_POSITIONS, make_model

DEFAULT_LENGTHS = "2048,8192,16384,32768"
TARGET_OVER_FLOOR_MS = 20.0
TARGET_CACHED_SHARE = 0.95  # the proxy's cached tokens against a perfect cache's
WORKER_LOG = re.compile(
    r"worker\[\d+\] INFO request (\S+): \S+; prompt (\d+), cached (\d+), recomputed (\d+), generated (\d+); "
    r"restored to (\d+) \((\S+)\); restore ([\d.]+)s, prefill ([\d.]+)s, ttft ([\d.]+)s")
PROXY_LOG = re.compile(r"mlx_cache_proxy: request (\S+) .* ttft=(\d+)ms total=(\d+)ms")


# ------------------------------------------------------------------ the conversations


class Renderer:
    """Prompt token ids as both servers compute them: the chat template with the generation prompt."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        # Fitting a history to the context limit renders a little past it; no need for the HF warning.
        self.tokenizer.model_max_length = 1 << 40

    def __call__(self, messages: list[dict]) -> list[int]:
        return [int(t) for t in self.tokenizer.apply_chat_template(
            wl.normalize_messages(messages), add_generation_prompt=True, tokenize=True)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def fitted_conversation(render: Renderer, prose: wl.Prose, target: int, system_words: int,
                        turn_words: int) -> list[dict]:
    """A system prompt, user / assistant messages of about `turn_words` words, and a last user message
    cut so that the rendered prompt is as long as possible but at most `target` tokens."""
    messages = [{"role": "system", "content": prose.text(system_words)}]
    while True:
        messages.append(user(prose.text(turn_words)))
        if len(render(messages)) >= target:
            break
        messages.append(assistant(prose.text(turn_words)))
        if len(render([*messages, user("x")])) >= target:  # no room for another user message
            messages.pop()
            break
    # The last user message, lengthened, then cut at the largest number of words that fits.
    words = messages[-1]["content"].split(" ") + prose.text(3 * turn_words).split(" ")
    low, high = 1, len(words)  # render(low words) <= target, by the loop above
    while low < high:
        mid = (low + high + 1) // 2
        if len(render([*messages[:-1], user(" ".join(words[:mid]))])) <= target:
            low = mid
        else:
            high = mid - 1
    messages[-1] = user(" ".join(words[:low]))
    return messages


@dataclass
class Case:
    """One length in one round: the history's messages, the warm turn's, and their token ids."""

    length: int  # as asked
    round: int
    history: list[dict]
    warm: list[dict]
    history_tokens: list[int]
    warm_tokens: list[int]

    @property
    def shared(self) -> int:
        """Tokens of the warm prompt that a perfect cache holds: its common prefix with the history's
        prompt, at most all but one of the warm prompt's."""
        return min(wl.common_prefix(self.warm_tokens, self.history_tokens), len(self.warm_tokens) - 1)

    @property
    def new(self) -> int:
        return len(self.warm_tokens) - self.shared


def make_case(render: Renderer, length: int, rnd: int, context_limit: int, args: argparse.Namespace) -> Case:
    """Fresh content for (length, round). The history is cut to leave room for the warm turn's new tokens
    and one generated token within the context limit."""
    prose = wl.Prose(1_000_003 * (rnd + 1) + length)
    reply, question = prose.text(args.reply_words), prose.text(args.user_words)
    # The new tokens' count does not depend on the history: no token spans a message boundary in chatml.
    probe = [{"role": "system", "content": "s"}, user("u")]
    extra = len(render([*probe, assistant(reply), user(question)])) - len(render(probe))
    target = min(length, context_limit - 1 - extra)
    history = fitted_conversation(render, prose, target, args.system_words, args.turn_words)
    warm = [*history, assistant(reply), user(question)]
    return Case(length, rnd, history, warm, render(history), render(warm))


# ------------------------------------------------------------------ the floor, in this process


def prefill(model, tokens: list[int], cache: list, step: int = 512) -> None:
    """Tokens into the cache, in chunks, as mlx-lm's generate_step prefills: only the cache states are
    evaluated, so no logits are computed (nor the last layer's output, which only logits need)."""
    import mlx.core as mx

    for i in range(0, len(tokens), step):
        model(mx.array([tokens[i:i + step]]), cache=cache)
        mx.eval([c.state for c in cache])


def first_token(model, tokens: list[int], cache: list) -> int:
    """The new tokens after the cached ones, as generate_step runs them: all but the last prefilled into
    the cache, then the last one's logits, then the greedy token."""
    import mlx.core as mx

    prefill(model, tokens[:-1], cache)
    logits = model(mx.array([tokens[-1:]]), cache=cache)
    return int(mx.argmax(logits[0, -1]).item())


def floor_s(reference: Reference, case: Case, repeats: int) -> tuple[float, list[float]]:
    """Seconds to prefill the history in-process (once), and per repeat the seconds to run the warm
    turn's new tokens over a copy of the history's cache up to the first token (first_token)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(reference.model)
    start = time.perf_counter()
    prefill(reference.model, case.warm_tokens[: case.shared], cache)
    history_s = time.perf_counter() - start
    suffix = case.warm_tokens[case.shared:]
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(cache)
        mx.eval([c.state for c in fresh])
        start = time.perf_counter()
        first_token(reference.model, suffix, fresh)
        times.append(time.perf_counter() - start)
        del fresh
    del cache
    mx.clear_cache()
    return history_s, times


# ------------------------------------------------------------------ the servers


@dataclass
class Measured:
    """One request to one server."""

    ttft_ms: float
    prompt_tokens: int
    cached_tokens: Optional[int]
    response_id: Optional[str]
    worker: dict = field(default_factory=dict)  # the proxy's worker's log line for it, when found


def send(server: Server, messages: list[dict]) -> Measured:
    sent: Sent = stream_chat(openai_client(server), messages, max_tokens=1)
    return Measured(sent.ttft_s * 1e3, sent.prompt_tokens, sent.cached_tokens, sent.response_id)


def worker_figures(server: Server, response_id: Optional[str]) -> dict:
    """The proxy's and its worker's own figures for one request, from the proxy's log."""
    if response_id is None:
        return {}
    text = server.log_text()
    out: dict = {}
    for m in WORKER_LOG.finditer(text):
        if m.group(1) == response_id:
            out.update(cached=int(m.group(3)), recomputed=int(m.group(4)), restored_to=int(m.group(6)),
                       restored_at=m.group(7), restore_ms=float(m.group(8)) * 1e3,
                       prefill_ms=float(m.group(9)) * 1e3, worker_ttft_ms=float(m.group(10)) * 1e3)
    for m in PROXY_LOG.finditer(text):
        if m.group(1) == response_id:
            out["proxy_log_ttft_ms"] = float(m.group(2))
    return out


# ------------------------------------------------------------------ one run


@dataclass
class Row:
    """One length in one round."""

    length: int
    round: int
    history_tokens: int
    warm_tokens: int
    shared_tokens: int  # a perfect cache's hit for the warm prompt
    new_tokens: int
    messages: int
    floor_history_s: float = 0.0
    floor_ms: list[float] = field(default_factory=list)
    transport_ms: list[float] = field(default_factory=list)  # the warm turn to the echo server (HTTP + client)
    history: dict[str, dict] = field(default_factory=dict)  # server -> Measured of the warming request
    warm: dict[str, dict] = field(default_factory=dict)  # server -> Measured of the warm turn
    errors: dict[str, str] = field(default_factory=dict)


def run_case(servers: dict[str, Server], reference: Reference, case: Case, args: argparse.Namespace,
             echo: Optional[Server] = None) -> Row:
    row = Row(case.length, case.round, len(case.history_tokens), len(case.warm_tokens), case.shared, case.new,
              len(case.warm))
    order = list(servers) if case.round % 2 == 0 else list(reversed(servers))
    for kind in order:
        try:
            m = send(servers[kind], case.history)
            row.history[kind] = asdict(m)
        except Exception as exc:  # reported; the run goes on
            row.errors[kind] = f"history: {type(exc).__name__}: {exc}"
    row.floor_history_s, row.floor_ms = floor_s(reference, case, args.prefill_repeats)
    row.floor_ms = [t * 1e3 for t in row.floor_ms]
    if echo is not None:
        row.transport_ms = [send(echo, case.warm).ttft_ms for _ in range(args.prefill_repeats)]
    for kind in order:
        if kind in row.errors:
            continue
        try:
            m = send(servers[kind], case.warm)
            row.warm[kind] = asdict(m)
        except Exception as exc:
            row.errors[kind] = f"warm turn: {type(exc).__name__}: {exc}"
    if PROXY in row.warm:
        time.sleep(0.3)  # the log lines of the last request
        row.warm[PROXY]["worker"] = worker_figures(servers[PROXY], row.warm[PROXY]["response_id"])
    for kind, error in row.errors.items():
        print(f"!! length {case.length} round {case.round} {kind}: {error}\n{servers[kind].log_tail(20)}",
              file=sys.stderr)
    return row


def warm_up(servers: dict[str, Server], reference: Reference) -> None:
    """One short request each, so that no measured request pays for first-use work."""
    from mlx_lm.models.cache import make_prompt_cache

    messages = [user("warm up " + " ".join(wl.Prose(9).words(20)))]
    for server in servers.values():
        for _ in range(2):
            send(server, messages)
    first_token(reference.model, reference.render(messages), make_prompt_cache(reference.model))


# ------------------------------------------------------------------ report


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def summarize(rows: list[Row], servers: list[str]) -> list[dict]:
    """Per length: medians over rounds, and the per-round differences to the floor."""
    out = []
    for length in sorted({r.length for r in rows}):
        mine = [r for r in rows if r.length == length]
        s: dict = {
            "length": length,
            "history_tokens": median([r.history_tokens for r in mine]),
            "shared_tokens": median([r.shared_tokens for r in mine]),
            "new_tokens": median([r.new_tokens for r in mine]),
            "floor_ms": median([t for r in mine for t in r.floor_ms]),
            "floor_history_s": median([r.floor_history_s for r in mine]),
            "transport_ms": median([t for r in mine for t in r.transport_ms]),
            "rounds": len(mine),
        }
        for kind in servers:
            done = [r for r in mine if kind in r.warm]
            s[kind] = {
                "warm_ttft_ms": median([r.warm[kind]["ttft_ms"] for r in done]),
                "warm_minus_floor_ms": median([r.warm[kind]["ttft_ms"] - median(r.floor_ms) for r in done]),
                # ... and less the HTTP round trip and client work on this request, as the echo server sees them
                "warm_minus_floor_and_transport_ms": median([
                    r.warm[kind]["ttft_ms"] - median(r.floor_ms) - median(r.transport_ms) for r in done if r.transport_ms
                ]),
                "history_ttft_ms": median([r.history[kind]["ttft_ms"] for r in done]),
                "cached_tokens": median([r.warm[kind]["cached_tokens"] or 0 for r in done]),
                "cached_share": median([(r.warm[kind]["cached_tokens"] or 0) / r.shared_tokens for r in done]),
                "prompt_token_mismatches": sum(r.warm[kind]["prompt_tokens"] != r.warm_tokens for r in done),
                "errors": [r.errors[kind] for r in mine if kind in r.errors],
            }
            workers = [r.warm[kind].get("worker") or {} for r in done]
            for key in ("proxy_log_ttft_ms", "worker_ttft_ms", "prefill_ms", "restore_ms", "recomputed"):
                if kind == PROXY and workers and all(key in w for w in workers):
                    s[kind][key] = median([w[key] for w in workers])
            if kind == PROXY and workers and all("proxy_log_ttft_ms" in w and "worker_ttft_ms" in w for w in workers):
                # Where the proxy's time over the floor goes, per round: its worker over the floor, the proxy's
                # own logged TTFT over its worker's, the client's over the proxy's log (HTTP both ways, JSON)
                s[kind]["split_ms"] = {
                    "worker_minus_floor": median([w["worker_ttft_ms"] - median(r.floor_ms)
                                                  for r, w in zip(done, workers)]),
                    "proxy_log_minus_worker": median([w["proxy_log_ttft_ms"] - w["worker_ttft_ms"] for w in workers]),
                    "client_minus_proxy_log": median([r.warm[kind]["ttft_ms"] - w["proxy_log_ttft_ms"]
                                                      for r, w in zip(done, workers)]),
                }
        out.append(s)
    return out


def ms(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def print_summary(summary: list[dict], servers: list[str], context_limit: int) -> None:
    short = {PROXY: "proxy", UPSTREAM: "upstream"}
    header = ["length", "history tok", "new tok", "floor ms", "http ms"]
    for kind in servers:
        header += [f"{short[kind]} TTFT ms", f"{short[kind]} - floor", f"{short[kind]} - floor - http"]
    for kind in servers:
        header += [f"{short[kind]} cached"]
    if PROXY in servers:
        header += ["proxy log ttft", "worker ttft", "worker prefill", "recomputed"]
    lines = [header]
    for s in summary:
        line = [str(s["length"]), f"{s['history_tokens']:.0f}", f"{s['new_tokens']:.0f}", ms(s["floor_ms"]),
                ms(s["transport_ms"])]
        for kind in servers:
            line += [ms(s[kind]["warm_ttft_ms"]), ms(s[kind]["warm_minus_floor_ms"], sign=True),
                     ms(s[kind]["warm_minus_floor_and_transport_ms"], sign=True)]
        for kind in servers:
            line += [f"{s[kind]['cached_tokens']:.0f}/{s['shared_tokens']:.0f}"
                     if s[kind]["cached_tokens"] is not None else "-"]
        if PROXY in servers:
            line += [ms(s[PROXY].get(key)) for key in ("proxy_log_ttft_ms", "worker_ttft_ms", "prefill_ms")]
            line += [f"{s[PROXY]['recomputed']:.0f}" if "recomputed" in s[PROXY] else "-"]
        lines.append(line)
    print_aligned(lines, left=1)
    print("medians over rounds (ms unless said). floor: the new tokens up to the first token in-process, over "
          "the history's cache; http: the same warm turn answered at once by an echo server (HTTP both ways, the "
          "client's own work on the request); X - floor (- http): median of the per-round differences; "
          "cached: reported / a perfect "
          "cache's hit; proxy log ttft, worker ttft / prefill, recomputed: the proxy's and its worker's log lines")
    for s in summary:
        if s["history_tokens"] < s["length"] - 64:
            print(f"length {s['length']}: the history is {s['history_tokens']:.0f} tokens, the most that leaves "
                  f"room for the warm turn's {s['new_tokens']:.0f} new tokens + 1 in the context limit of "
                  f"{context_limit}")
    splits = [(s["length"], s[PROXY]["split_ms"]) for s in summary if PROXY in servers and "split_ms" in s[PROXY]]
    if splits:
        print("proxy over the floor, medians of per-round differences (ms): " + "; ".join(
            f"{length}: worker - floor {x['worker_minus_floor']:+.1f}, proxy log - worker "
            f"{x['proxy_log_minus_worker']:+.1f}, client - proxy log {x['client_minus_proxy_log']:+.1f}"
            for length, x in splits))
    print("cold (history request) TTFT ms, median: " + "; ".join(
        f"{s['length']}: " + ", ".join(f"{short[k]} {ms(s[k]['history_ttft_ms'])}" for k in servers)
        + f", in-process prefill {1e3 * s['floor_history_s']:.0f}" for s in summary))


def check_targets(summary: list[dict], servers: list[str]) -> list[str]:
    misses = []
    if PROXY not in servers:
        return misses
    for s in summary:
        ours = s[PROXY]
        where = f"length {s['length']}"
        if ours["errors"]:
            misses.append(f"{where}: proxy failed: {ours['errors'][0].splitlines()[0][:120]}")
        net = ours["warm_minus_floor_and_transport_ms"]
        if net is not None and net >= TARGET_OVER_FLOOR_MS:
            misses.append(f"{where}: proxy warm TTFT {ours['warm_ttft_ms']:.1f} ms is {net:.1f} ms over the floor "
                          f"{s['floor_ms']:.1f} ms and the HTTP round trip {s['transport_ms']:.1f} ms "
                          f"(target < {TARGET_OVER_FLOOR_MS:.0f})")
        if UPSTREAM in servers and s["length"] >= 16384 and s[UPSTREAM]["warm_ttft_ms"] is not None \
                and ours["warm_ttft_ms"] is not None and ours["warm_ttft_ms"] > s[UPSTREAM]["warm_ttft_ms"]:
            misses.append(f"{where}: proxy warm TTFT {ours['warm_ttft_ms']:.1f} ms > mlx_lm.server's "
                          f"{s[UPSTREAM]['warm_ttft_ms']:.1f} ms")
        if ours["cached_share"] is not None and ours["cached_share"] < TARGET_CACHED_SHARE:
            misses.append(f"{where}: proxy cached {ours['cached_tokens']:.0f} of {s['shared_tokens']:.0f} "
                          f"history tokens (< {100 * TARGET_CACHED_SHARE:.0f}%)")
        if ours["prompt_token_mismatches"]:
            misses.append(f"{where}: {ours['prompt_token_mismatches']} prompt-token count(s) differ from ours")
    return misses


# ------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_warm_ttft", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen3_next", choices=ARCHITECTURES)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated history lengths in tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--servers", default=f"{PROXY},{UPSTREAM}", help="comma-separated: proxy, mlx_lm.server")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--logs", type=Path, help="keep the server logs in this directory")
    p.add_argument("--system-words", type=int, default=100)
    p.add_argument("--turn-words", type=int, default=150, help="words per history message (about 2 tokens each)")
    p.add_argument("--reply-words", type=int, default=25, help="words of the assistant reply in the warm turn")
    p.add_argument("--user-words", type=int, default=60, help="words of the warm turn's new user message")
    p.add_argument("--prefill-repeats", type=int, default=3, help="floor measurements per length and round")
    p.add_argument("--cache-bytes", type=int, default=BIG, help="both servers' cache budget (default: 1 TiB)")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `mlx-cache-proxy serve` (repeatable)")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.servers = [s for s in args.servers.split(",") if s]
    for server in args.servers:
        if server not in (PROXY, UPSTREAM):
            p.error(f"unknown server {server!r}")
    if not args.lengths or min(args.lengths) < 64:
        p.error("--lengths: history lengths of at least 64 tokens")
    return args


def context_limit_of(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    for source in (config, config.get("text_config") or {}):
        if isinstance(source.get("max_position_embeddings"), int):
            return source["max_position_embeddings"]
    return MAX_POSITIONS


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    command = command_line("tests.benchmarks.bench_warm_ttft", argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-warm-ttft-") as tmp, ExitStack() as stack:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        model_dir = make_model(args.arch, Path(tmp) / args.arch, template="chatml")
        limit = context_limit_of(model_dir)
        servers: dict[str, Server] = {}
        for kind in args.servers:
            log = logs / f"{args.arch}.warm-ttft.{kind}.log"
            if kind == PROXY:
                server = proxy_server(model_dir, free_port(), log, args.cache_bytes, False, args.proxy_arg)
            else:
                server = upstream_server(model_dir, free_port(), log, args.cache_bytes, UPSTREAM_CACHE_SIZE)
            stack.callback(server.stop)
            server.start()
            servers[kind] = server
        echo_port = free_port()
        echo = Server("echo", [sys.executable, "-m", "tests.benchmarks.echo_server", "--port", str(echo_port)],
                      echo_port, logs / "echo.log")
        stack.callback(echo.stop)
        echo.start()
        reference = Reference(model_dir)
        stack.callback(reference.close)
        for server in [*servers.values(), echo]:
            server.wait_ready(args.start_timeout)
        warm_up(servers, reference)
        render = Renderer(model_dir)
        for rnd in range(args.rounds):
            for length in args.lengths:
                t0 = time.perf_counter()
                case = make_case(render, length, rnd, limit, args)
                row = run_case(servers, reference, case, args, echo)
                rows.append(row)
                print(f"[round {rnd}] length {length}: history {row.history_tokens}, new {row.new_tokens}; "
                      f"floor {median(row.floor_ms):.1f} ms; " + "; ".join(
                          f"{kind} TTFT {row.warm[kind]['ttft_ms']:.1f} ms cached {row.warm[kind]['cached_tokens']}"
                          for kind in args.servers if kind in row.warm)
                      + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
        peak_rss = {kind: sum(server.peak_rss_bytes()) for kind, server in servers.items()}
    runtime = time.perf_counter() - started
    summary = summarize(rows, args.servers)
    print()
    print(f"warm-turn TTFT [{args.arch}], {args.rounds} round(s), max_tokens=1, streamed; context limit {limit}")
    print_summary(summary, args.servers, limit)
    misses = check_targets(summary, args.servers)
    print("\ntargets missed:" if misses else "\nall targets met")
    for miss in misses:
        print(f"  - {miss}")
    print("peak RSS: " + ", ".join(f"{kind} {b / 2**20:.0f} MB" for kind, b in peak_rss.items()))
    load = {"before": load_before, "after": os.getloadavg()}
    print_run(command, runtime, load)
    if args.json:
        data = {
            **run_header(args, command, runtime, load),
            "context_limit": limit,
            "summary": summary,
            "rows": [asdict(r) for r in rows],
            "peak_rss_bytes": peak_rss,
            "targets_missed": misses,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

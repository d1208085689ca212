"""This proxy and mlx_lm.server side by side: the same workloads, one run. Figures, not assertions.

    .venv/bin/python -m tests.benchmarks.bench_vs_upstream [--archs qwen3_next,gemma3_text,llama]
        [--size small|medium] [--workloads chat,repeat,...] [--json FILE] [--logs DIR]

For each architecture (tiny random-weight models from worker/tiny_models.py) and
each workload (tests/benchmarks/workloads.py), both servers are started fresh on
loopback, side by side, and the workload is replayed through the `openai`
client against one, then the other (greedy, streamed, `max_tokens` small). Per
workload x arch x server it records prompt tokens, cached tokens
(`usage.prompt_tokens_details.cached_tokens`, which both servers report), the
oracle (workloads.py; output tokens = the model's greedy tokens, computed here
in-process with mlx-lm), prefill tokens computed (prompt - cached), median TTFT
(first chunk carrying generated text), the bytes the cache holds at the end,
and the peak RSS (VmHWM) of the serving processes (the proxy and its worker).
Prompts are tokenized here as both servers do (`apply_chat_template` of the
model's tokenizer); every count is checked against the servers' prompt_tokens.

Then, per arch: decode tokens/s of a 200-token streamed generation through each
server against mlx-lm's `stream_generate` in this process, and the time of a
1-token request through each server against the same work in-process.

Choices, so that the comparison is fair and the figures mean what they say:
- mlx_lm.server gets the same byte budget as the proxy (`--prompt-cache-bytes`
  = `--cache-bytes`) and no limit on the number of entries
  (`--prompt-cache-size 100000`; its default of 10 would evict agents' entries).
  It trims its cache before it inserts a request's entries, so it can end a
  little above the budget; the proxy stays under it.
- No `seed` is sent by default (`--seed N` sends one to both): sampling is greedy,
  and a request with a seed makes mlx_lm.server leave its batch path for a
  sequential one that neither caches system-prompt segments nor enforces
  `--prompt-cache-bytes`.
- mlx_lm.server logs its prompt-cache size in GB with two decimals (0.00 for
  these models), so it is started through a two-line shim that also logs the
  exact `prompt_cache.nbytes`; nothing else changes. It logs when a request
  arrives, so after a workload one probe request makes it log the final figure.
- The proxy's disk tier is off (`--disk-cache-bytes 0`) unless --proxy-disk-tier:
  memory against memory. Each proxy gets a fresh MLX_CACHE_PROXY_HOME.
- The proxy's figure is `pool.bytes` from /health, once a heartbeat newer than
  the workload's last request has arrived.
- The mix runs under four budgets: 25%, 50%, 100% and 200% (workloads mix-0.25x,
  mix, mix-1x, mix-2x) of the bytes a perfectly shared cache needs to hold it
  whole (distinct tokens x KV bytes per token + the fixed states of each leaf,
  from a dry run), the same budget for both servers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tests.benchmarks import workloads as wl
from worker.tiny_models import ARCHITECTURES, make_model

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "default_model"  # both servers' name for the model given on the command line
DEFAULT_ARCHS = "qwen3_next,gemma3_text,llama"
PROXY, UPSTREAM = "proxy", "mlx_lm.server"
BIG = 1 << 40  # "no budget": the same for both servers
UPSTREAM_CACHE_SIZE = 100_000  # mlx_lm.server --prompt-cache-size: entries effectively unlimited, like the proxy

# mlx_lm.server, plus one log line with the exact prompt-cache bytes.
UPSTREAM_SHIM = """\
import logging, sys
import mlx_lm.server as server
_log_cache_stats = server.ResponseGenerator._log_cache_stats
def log_cache_stats(self):
    _log_cache_stats(self)
    logging.info("Prompt Cache exact: %d sequences, %d bytes", len(self.prompt_cache), self.prompt_cache.nbytes)
server.ResponseGenerator._log_cache_stats = log_cache_stats
sys.argv[0] = "mlx_lm.server"
server.main()
"""
UPSTREAM_BYTES = re.compile(r"Prompt Cache exact: (\d+) sequences, (\d+) bytes")
UPSTREAM_GB = re.compile(r"Prompt Cache: (\d+) sequences, ([\d.]+) GB")


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: Optional[dict] = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Server:
    """One serving process on loopback, its log in a file; stopped with a timeout, whatever happens."""

    def __init__(self, kind: str, cmd: list[str], port: int, log_path: Path, env: Optional[dict] = None) -> None:
        self.kind, self.cmd, self.port, self.log_path = kind, cmd, port, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            # Its own session, so the proxy's worker child can be found and, if need be, stopped with it.
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = http_json(self.base_url + "/health", timeout=2)
                if status == 200 and (body or {}).get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # The proxy stops its worker itself; anything of ours still running is killed.
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive():
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def pids(self) -> list[int]:
        """This process and its descendants (the proxy's worker)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    todo.extend(int(c) for c in children.read_text().split())
                except OSError:
                    pass
        return out

    def peak_rss_bytes(self) -> list[int]:
        """VmHWM of each serving process: this one first, then its descendants."""
        out = []
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out.append(int(line.split()[1]) * 1024)
            except OSError:
                pass
        return out

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def proxy_server(model_dir: Path, port: int, log_path: Path, cache_bytes: int, disk_tier: bool,
                 extra: list[str]) -> Server:
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--cache-bytes", str(cache_bytes)]
    if not disk_tier:  # memory against memory: mlx_lm.server has no disk tier
        cmd += ["--disk-cache-bytes", "0"]
    cmd += extra
    # A home of its own per session: nothing the proxy keeps on disk carries over to the next session.
    home = tempfile.mkdtemp(prefix="home-", dir=log_path.parent)
    return Server(PROXY, cmd, port, log_path, env={"MLX_CACHE_PROXY_HOME": home})


def upstream_server(model_dir: Path, port: int, log_path: Path, cache_bytes: int, cache_size: int) -> Server:
    cmd = [sys.executable, "-c", UPSTREAM_SHIM, "--model", str(model_dir), "--port", str(port),
           "--prompt-cache-size", str(cache_size), "--prompt-cache-bytes", str(cache_bytes)]
    return Server(UPSTREAM, cmd, port, log_path)


# ------------------------------------------------------------------ requests


@dataclass
class Sent:
    """One streamed request as the client saw it."""

    prompt_tokens: int
    cached_tokens: Optional[int]
    completion_tokens: int
    ttft_s: float
    total_s: float
    content: str
    reasoning: str
    finish_reason: Optional[str]
    first_text_s: Optional[float] = None  # None: no text came back (EOS first)
    last_text_s: Optional[float] = None
    response_id: Optional[str] = None  # the chunks' id (the proxy logs its requests under it)


def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def stream_chat(client, messages, *, max_tokens: int, tools=None, seed: Optional[int] = None) -> Sent:
    kwargs: dict[str, Any] = dict(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    if tools:
        kwargs["tools"] = tools
    if seed is not None:
        kwargs["seed"] = seed
    start = time.perf_counter()
    first = last = response_id = None
    content, reasoning, usage, finish = [], [], None, None
    for chunk in client.chat.completions.create(**kwargs):
        now = time.perf_counter() - start
        response_id = response_id or chunk.id
        for choice in chunk.choices:
            delta = choice.delta
            extra = delta.model_extra or {}
            thought = extra.get("reasoning") or extra.get("reasoning_content") or ""
            if delta.content or thought or delta.tool_calls:
                first = now if first is None else first
                last = now
            content.append(delta.content or "")
            reasoning.append(thought)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - start
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    details = usage.prompt_tokens_details
    return Sent(
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=details.cached_tokens if details is not None else None,
        completion_tokens=usage.completion_tokens,
        ttft_s=first if first is not None else total,
        total_s=total,
        content="".join(content),
        reasoning="".join(reasoning),
        finish_reason=finish,
        first_text_s=first,
        last_text_s=last,
        response_id=response_id,
    )


# ------------------------------------------------------------------ cache bytes


def proxy_pool(server: Server, since: float, timeout: float = 10.0) -> dict:
    """The worker's pool figures from /health (bytes, sequences, checkpoints, evictions), from a
    heartbeat that arrived after `since` (time.monotonic())."""
    deadline = time.monotonic() + timeout
    worker: dict = {}
    while time.monotonic() < deadline:
        asked = time.monotonic()
        _, body = http_json(server.base_url + "/health")
        worker = ((body or {}).get("workers") or [{}])[0]
        if asked - worker.get("seconds_since_heartbeat", 1e9) > since:
            break
        time.sleep(0.25)
    return worker.get("pool") or {}


def upstream_cache(server: Server) -> dict:
    """Its prompt cache at the end (one probe request makes it log the figures): exact bytes and
    sequences from the shim's line, and its own rounded GB figure."""
    http_json(server.base_url + "/v1/completions",
              {"model": MODEL_NAME, "prompt": "probe", "max_tokens": 1, "temperature": 0}, timeout=60)
    time.sleep(0.2)
    text = server.log_text()
    exact, stock = UPSTREAM_BYTES.findall(text), UPSTREAM_GB.findall(text)
    out: dict = {}
    if exact:
        out.update(sequences=int(exact[-1][0]), bytes=int(exact[-1][1]))
    if stock:
        out["logged_gb"] = float(stock[-1][1])
    return out


# ------------------------------------------------------------------ the model in this process


class Reference:
    """The model run by mlx-lm in this process: the greedy outputs the oracle counts, the
    cache-size estimates behind the mix's budget, and the baselines for decode and overhead."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))
        self.eos = set(self.tokenizer.eos_token_ids)
        self._greedy: dict[tuple[int, ...], list[int]] = {}  # (max_tokens, *prompt) -> tokens
        self._prompt_caches: list[tuple[list[int], list]] = []
        at_256, at_512 = self._cache_bytes(256), self._cache_bytes(512)
        self.cache_bytes_per_token = (at_512 - at_256) / 256
        self.cache_bytes_fixed = int(at_256 - 256 * self.cache_bytes_per_token)  # states of a sequence

    def close(self) -> None:
        import mlx.core as mx

        del self.model, self.tokenizer
        self._prompt_caches.clear()
        gc.collect()
        mx.clear_cache()

    def _cache_bytes(self, n: int) -> int:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        self._forward([i % 900 + 10 for i in range(n)], cache)
        return sum(c.nbytes for c in cache)

    def _forward(self, tokens: list[int], cache: list, step: int = 512):
        import mlx.core as mx

        logits = None
        for i in range(0, len(tokens), step):
            logits = self.model(mx.array([tokens[i:i + step]]), cache=cache)
            mx.eval(logits, [c.state for c in cache])
        return logits

    # ------------------------------------------------------------ the oracle's outputs

    def new_workload(self) -> None:
        self._prompt_caches.clear()

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The tokens a greedy server generates for `prompt`, the EOS token included if it stops on one.

        Prompt-end caches of earlier prompts are extended, never trimmed, so this
        works for every cache kind; it only saves time."""
        import copy

        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        key = (max_tokens, *prompt)
        if key in self._greedy:
            return self._greedy[key]
        start, stored = 0, None
        for tokens, cache in self._prompt_caches:
            if start < len(tokens) < len(prompt) and prompt[: len(tokens)] == tokens:
                start, stored = len(tokens), cache
        cache = copy.deepcopy(stored) if stored is not None else make_prompt_cache(self.model)
        logits = self._forward(prompt[start:], cache)
        self._prompt_caches.append((list(prompt), copy.deepcopy(cache)))
        out: list[int] = []
        while True:
            token = int(mx.argmax(logits[0, -1]).item())
            out.append(token)
            if token in self.eos or len(out) >= max_tokens:
                break
            logits = self._forward([token], cache)
        self._greedy[key] = out
        return out

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos])

    # ------------------------------------------------------------ baselines

    def render(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def generate_s(self, messages: list[dict], max_tokens: int) -> tuple[float, int]:
        """Seconds for chat template + mlx-lm `stream_generate` (a fresh cache), and tokens generated."""
        from mlx_lm import stream_generate

        start, n = time.perf_counter(), 0
        for n, _ in enumerate(stream_generate(self.model, self.tokenizer, self.render(messages), max_tokens=max_tokens), 1):
            pass
        return time.perf_counter() - start, n

    def decode_prompt(self, max_tokens: int) -> list[dict]:
        """A prompt whose greedy continuation runs the full length (random weights may stop early)."""
        prose = wl.Prose(7)
        for _ in range(20):
            messages = [{"role": "user", "content": prose.text(30)}]
            if self.generate_s(messages, max_tokens)[1] >= max_tokens:
                break
        return messages


# ------------------------------------------------------------------ one session


@dataclass
class Row:
    workload: str
    arch: str
    server: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    oracle_rendered_tokens: int = 0  # the looser oracle: replies as the next prompt renders them
    prefill_tokens: int = 0
    median_ttft_ms: Optional[float] = None
    cache_bytes: Optional[int] = None
    cache: dict = field(default_factory=dict)  # the server's own figures about its cache at the end
    peak_rss_bytes: Optional[int] = None  # summed over the serving processes
    peak_rss_parts: list[int] = field(default_factory=list)  # main process first, then children
    cache_budget_bytes: Optional[int] = None
    prompt_token_mismatches: int = 0  # our tokenization vs the server's usage.prompt_tokens
    over_oracle: int = 0  # requests with cached > oracle + 1 (more than a cache can hold)
    replies_as_in_process: int = 0  # replies equal to the in-process greedy text (a correctness check)
    error: Optional[str] = None
    turns: list[dict] = field(default_factory=list)

    @property
    def share(self) -> Optional[float]:
        return self.cached_tokens / self.oracle_tokens if self.oracle_tokens else None


def run_workload(server: Server, workload: wl.Workload, size: wl.Size, renderer: wl.ChatRenderer,
                 reference: Reference, args: argparse.Namespace, row: Row) -> None:
    client = openai_client(server)

    def replier(step: wl.Step):
        try:
            sent = stream_chat(client, step.messages, max_tokens=args.max_tokens, tools=step.tools, seed=args.seed)
        except Exception as exc:
            raise RuntimeError(f"request {step.label}: {type(exc).__name__}: {exc}") from exc
        return wl.Reply(sent.content, sent.reasoning), sent

    turns = wl.replay(workload.script(size), renderer, replier)
    # The oracle: earlier prompts + the tokens a greedy server generated for them (workloads.py).
    reference.new_workload()
    generated = [reference.greedy(t.prompt, args.max_tokens) for t in turns]
    oracle = wl.oracle_cached([t.prompt for t in turns], [t.prompt + g for t, g in zip(turns, generated)])
    for turn, gen, best in zip(turns, generated, oracle):
        sent: Sent = turn.result
        cached = sent.cached_tokens or 0
        row.requests += 1
        row.prompt_tokens += sent.prompt_tokens
        row.cached_tokens += cached
        row.oracle_tokens += best
        row.oracle_rendered_tokens += turn.oracle
        row.prefill_tokens += sent.prompt_tokens - cached
        row.prompt_token_mismatches += sent.prompt_tokens != len(turn.prompt)
        row.over_oracle += cached > best + 1
        # Servers' streaming detokenizers drop the first token's leading space.
        same = reference.text(gen).strip() == sent.content.strip() and not sent.reasoning
        row.replies_as_in_process += same
        row.turns.append({
            "label": turn.label, "prompt_tokens": sent.prompt_tokens, "prompt_tokens_ours": len(turn.prompt),
            "cached_tokens": sent.cached_tokens, "oracle": best, "oracle_rendered": turn.oracle,
            "ttft_ms": sent.ttft_s * 1e3, "total_ms": sent.total_s * 1e3,
            "completion_tokens": sent.completion_tokens, "finish_reason": sent.finish_reason,
            "reply": sent.content, "reasoning": sent.reasoning, "reply_as_in_process": same,
        })
    row.median_ttft_ms = statistics.median(t["ttft_ms"] for t in row.turns)


def stream_s(server: Server, messages: list[dict], max_tokens: int, seed: Optional[int]) -> tuple[float, int]:
    sent = stream_chat(openai_client(server), messages, max_tokens=max_tokens, seed=seed)
    return sent.total_s, sent.completion_tokens


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process, from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def server_cpu(server: Server) -> dict[str, float]:
    """CPU seconds so far of the server's main process ("server"), its children ("worker", summed),
    and this process, the client ("client")."""
    main = server.proc.pid
    by_pid = cpu_seconds(server.pids())
    return {
        "server": by_pid.get(main, 0.0),
        "worker": sum(v for pid, v in by_pid.items() if pid != main),
        "client": time.process_time(),
    }


PROXY_LOG_TOTAL = re.compile(r"mlx_cache_proxy: request (\S+) .* total=(\d+)ms")
WORKER_LOG_TOTAL = re.compile(r"worker\[\d+\] INFO request (\S+): .* total ([\d.]+)s")


def measure_speed(servers: dict[str, Server], reference: Reference, args: argparse.Namespace) -> dict:
    """Decode tokens/s and the time of a 1-token request: in-process and through each server, interleaved
    so that load from elsewhere on the machine hits all of them alike.

    Decode rate = (tokens(N) - tokens(1)) / (time(N) - time(1)) for the same prompt: the prompt's cost
    cancels (it is a cache hit on the servers after a first request), and so does any chunking of the
    stream. CPU per decoded token is measured the same way, per serving process."""
    n = args.decode_tokens
    messages = reference.decode_prompt(n)
    paths = {"in_process": lambda k: reference.generate_s(messages, k)}
    # CPU seconds by role: this process (all its threads); or the server, its children, and this client
    cpus = {"in_process": lambda: {"process": time.process_time()}}
    for kind, server in servers.items():
        paths[kind] = lambda k, server=server: stream_s(server, messages, k, args.seed)
        cpus[kind] = lambda server=server: server_cpu(server)
        paths[kind](1)  # the prompt goes into that server's cache
    rates: dict[str, list[float]] = {name: [] for name in paths}
    cpu_per_token: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
    tokens: dict[str, int] = {}
    for _ in range(args.speed_rounds):
        for name, run in paths.items():
            c0 = cpus[name]()
            t_long, n_long = run(n)
            c1 = cpus[name]()
            t_one, n_one = run(1)
            c2 = cpus[name]()
            tokens[name] = n_long
            if t_long > t_one and n_long > n_one:
                rates[name].append((n_long - n_one) / (t_long - t_one))
                for role in c0.keys() & c1.keys() & c2.keys():
                    per_token = ((c1[role] - c0[role]) - (c2[role] - c1[role])) / (n_long - n_one)
                    cpu_per_token[name].setdefault(role, []).append(per_token)
    result: dict[str, dict] = {}
    for name in paths:
        result[name] = {
            "decode_tokens": tokens.get(name),
            "decode_tps_best": max(rates[name]) if rates[name] else None,
            "decode_tps_median": statistics.median(rates[name]) if rates[name] else None,
            "decode_tps_all": rates[name],
            "decode_cpu_ms_per_token": {role: round(statistics.median(v) * 1e3, 3) for role, v in cpu_per_token[name].items()},
        }
    measure_tiny(servers, reference, args, result)
    return result


def measure_tiny(servers: dict[str, Server], reference: Reference, args: argparse.Namespace, result: dict) -> None:
    """A 1-token request (tiny prompt, different each time): wall time at the client, and for the proxy
    the time its log gives minus the worker's own reported total for the same request."""
    prose = wl.Prose(8)
    tiny = [[{"role": "user", "content": f"{w} ping {i}"}] for i, w in enumerate(prose.words(args.tiny_requests + 1))]
    times: dict[str, list[float]] = {"in_process": [], **{kind: [] for kind in servers}}
    ids: list[str] = []
    kwargs = {"seed": args.seed} if args.seed is not None else {}
    for messages in tiny:
        times["in_process"].append(reference.generate_s(messages, 1)[0])
        for kind, server in servers.items():
            start = time.perf_counter()
            response = openai_client(server).chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=1, temperature=0, **kwargs)
            times[kind].append(time.perf_counter() - start)
            if kind == PROXY:
                ids.append(response.id)
    for name, values in times.items():
        result[name]["tiny_request_ms_median"] = statistics.median(values[1:]) * 1e3  # the first one warms up
    if PROXY in servers:
        time.sleep(0.5)  # the log lines of the last request
        text = servers[PROXY].log_text()
        proxy_ms = {rid: float(ms) for rid, ms in PROXY_LOG_TOTAL.findall(text)}
        worker_ms = {rid: float(s) * 1e3 for rid, s in WORKER_LOG_TOTAL.findall(text)}
        wall = dict(zip(ids, times[PROXY]))
        both = [rid for rid in ids[1:] if rid in proxy_ms and rid in worker_ms]
        if both:
            result[PROXY]["tiny_worker_ms_median"] = statistics.median(worker_ms[r] for r in both)
            result[PROXY]["tiny_proxy_log_minus_worker_ms_median"] = statistics.median(proxy_ms[r] - worker_ms[r] for r in both)
            result[PROXY]["tiny_client_minus_worker_ms_median"] = statistics.median(wall[r] * 1e3 - worker_ms[r] for r in both)


def session(arch: str, workload: wl.Workload, model_dir: Path, renderer: wl.ChatRenderer, reference: Reference,
            args: argparse.Namespace, logs: Path, budget: int, measure: bool) -> tuple[list[Row], dict]:
    """Both servers started fresh; the workload through each in turn; both stopped in `finally`."""
    size = wl.SIZES[args.size]
    speed: dict = {}
    rows = []
    with ExitStack() as stack:
        started: dict[str, Server] = {}
        for kind in args.servers:
            log = logs / f"{arch}.{workload.name}.{kind}.log"
            if kind == PROXY:
                server = proxy_server(model_dir, free_port(), log, budget, args.proxy_disk_tier, args.proxy_arg)
            else:
                server = upstream_server(model_dir, free_port(), log, budget, args.upstream_cache_size)
            stack.callback(server.stop)
            server.start()
            started[kind] = server
        for server in started.values():
            server.wait_ready(args.start_timeout)
        for kind, server in started.items():
            row = Row(workload.name, arch, kind, cache_budget_bytes=budget if budget != BIG else None)
            rows.append(row)
            try:
                run_workload(server, workload, size, renderer, reference, args, row)
                row.cache = proxy_pool(server, time.monotonic()) if kind == PROXY else upstream_cache(server)
                row.cache_bytes = row.cache.get("bytes")
            except Exception as exc:  # reported in the table and the JSON; the run goes on
                row.error = f"{exc}\n--- {kind} log tail ---\n{server.log_tail(40)}"
                print(f"!! {workload.name} {arch} {kind}: {row.error}", file=sys.stderr)
            row.peak_rss_parts = server.peak_rss_bytes()
            row.peak_rss_bytes = sum(row.peak_rss_parts)
        if measure:  # decode and per-request overhead, on servers that have served one workload
            try:
                speed = measure_speed(started, reference, args)
            except Exception as exc:
                speed = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"!! speed {arch}: {speed['error']}", file=sys.stderr)
    return rows, speed


# ------------------------------------------------------------------ budget


def mix_total_bytes(workload: wl.Workload, renderer: wl.ChatRenderer, size: wl.Size, reference: Reference,
                    max_tokens: int) -> int:
    """Bytes a perfectly shared cache needs to hold the whole workload, from a dry run with fake replies:
    distinct prefix tokens x KV bytes per token + the fixed states (recurrent, sliding window) of each leaf."""
    turns = wl.replay(workload.script(size), renderer, wl.fake_replier(words=max(1, max_tokens // 2)))
    distinct, leaves = wl.distinct_tokens(t.history for t in turns)
    return int(distinct * reference.cache_bytes_per_token + leaves * reference.cache_bytes_fixed)


# ------------------------------------------------------------------ report


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def print_table(rows: list[Row]) -> None:
    header = ["workload", "arch", "server", "prompt tok", "cached tok", "oracle", "cached/oracle",
              "prefill tok", "med TTFT ms", "cache bytes", "peak RSS MB"]
    lines = [header]
    for r in rows:
        if r.error:
            lines.append([r.workload, r.arch, r.server, "ERROR", r.error.splitlines()[0][:60], "", "", "", "", "", ""])
            continue
        lines.append([
            r.workload, r.arch, r.server, str(r.prompt_tokens), str(r.cached_tokens), str(r.oracle_tokens),
            f"{100 * r.share:.1f}%" if r.share is not None else "-", str(r.prefill_tokens),
            f"{r.median_ttft_ms:.0f}" if r.median_ttft_ms is not None else "-", fmt_bytes(r.cache_bytes),
            f"{r.peak_rss_bytes / 2**20:.0f}" if r.peak_rss_bytes else "-",
        ])
    print_aligned(lines, left=3)


def print_aligned(lines: list[list[str]], left: int) -> None:
    """A header line, a rule, then the rows; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if j < left else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def check_targets(rows: list[Row], speeds: dict[str, dict]) -> list[str]:
    """The issue's targets, one line per miss."""
    misses = []
    pairs: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        pairs.setdefault((r.workload, r.arch), {})[r.server] = r
    for (workload, arch), by in pairs.items():
        ours, theirs = by.get(PROXY), by.get(UPSTREAM)
        if ours is None or ours.error:
            misses.append(f"{workload}/{arch}: proxy {'failed' if ours else 'not run'}")
            continue
        where = f"{workload}/{arch}"
        if ours.share is not None and ours.share < 0.95:
            misses.append(f"{where}: cached {ours.cached_tokens} = {100 * ours.share:.1f}% of oracle {ours.oracle_tokens} (< 95%)")
        if ours.over_oracle:
            misses.append(f"{where}: {ours.over_oracle} request(s) report cached > oracle + 1")
        if ours.prompt_token_mismatches:
            misses.append(f"{where}: {ours.prompt_token_mismatches} prompt-token count(s) differ from the oracle's tokenization")
        if theirs is None or theirs.error:
            continue
        if ours.cached_tokens < theirs.cached_tokens:
            misses.append(f"{where}: cached {ours.cached_tokens} < mlx_lm.server's {theirs.cached_tokens}")
        if ours.prefill_tokens > theirs.prefill_tokens:
            misses.append(f"{where}: prefill {ours.prefill_tokens} > mlx_lm.server's {theirs.prefill_tokens}")
        if ours.cache_bytes is not None and theirs.cache_bytes is not None and ours.cache_bytes > theirs.cache_bytes:
            misses.append(f"{where}: cache bytes {ours.cache_bytes:,} > mlx_lm.server's {theirs.cache_bytes:,}")
    for arch, speed in speeds.items():
        ours, base = speed.get(PROXY, {}).get("decode_tps_best"), speed.get("in_process", {}).get("decode_tps_best")
        if ours and base and ours < 0.95 * base:
            misses.append(f"decode/{arch}: proxy {ours:.0f} tok/s = {100 * ours / base:.0f}% of in-process {base:.0f} (< 95%)")
    return misses


# ------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    names = [w.name for w in wl.WORKLOADS]
    p = argparse.ArgumentParser(prog="bench_vs_upstream", description=__doc__.split("\n")[0])
    p.add_argument("--archs", default=DEFAULT_ARCHS, help=f"comma-separated, from {','.join(ARCHITECTURES)}")
    p.add_argument("--size", default="small", choices=sorted(wl.SIZES))
    p.add_argument("--workloads", default=",".join(names), help=f"comma-separated, from {','.join(names)}")
    p.add_argument("--servers", default=f"{PROXY},{UPSTREAM}", help="comma-separated: proxy, mlx_lm.server")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--logs", type=Path, help="keep the server logs in this directory")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, help="send this seed with every request (default: none; see the docstring)")
    p.add_argument("--decode-tokens", type=int, default=200)
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved rounds of the decode measurement")
    p.add_argument("--tiny-requests", type=int, default=8)
    p.add_argument("--no-speed", action="store_true", help="skip the decode / overhead measurement")
    p.add_argument("--upstream-cache-size", type=int, default=UPSTREAM_CACHE_SIZE,
                   help="mlx_lm.server --prompt-cache-size (default: effectively unlimited, like the proxy)")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--proxy-disk-tier", action="store_true",
                   help="leave the proxy's disk tier on (in a fresh directory per session); default: off")
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `mlx-cache-proxy serve` (repeatable), e.g. --proxy-arg=--checkpoint-interval=128")
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.workloads = [a for a in args.workloads.split(",") if a]
    args.servers = [s for s in args.servers.split(",") if s]
    for arch in args.archs:
        if arch not in ARCHITECTURES:
            p.error(f"unknown arch {arch!r}")
    for name in args.workloads:
        if name not in names:
            p.error(f"unknown workload {name!r}")
    for server in args.servers:
        if server not in (PROXY, UPSTREAM):
            p.error(f"unknown server {server!r}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    command = command_line("tests.benchmarks.bench_vs_upstream", argv)
    workloads = [w for w in wl.WORKLOADS if w.name in args.workloads]
    size = wl.SIZES[args.size]
    rows: list[Row] = []
    speeds: dict[str, dict] = {}
    budgets: dict[str, dict] = {}

    from mlx_lm.utils import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-vs-upstream-") as tmp:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            dirs = {t: make_model(arch, Path(tmp) / f"{arch}-{t}", template=t)
                    for t in sorted({w.template for w in workloads})}
            renderers = {t: wl.ChatRenderer(load_tokenizer(d)) for t, d in dirs.items()}
            references = {t: Reference(d) for t, d in dirs.items()}  # same weights, another template
            try:
                for i, workload in enumerate(workloads):
                    reference = references[workload.template]
                    budget = BIG
                    if workload.budget_fraction is not None:
                        total = mix_total_bytes(workload, renderers[workload.template], size, reference, args.max_tokens)
                        budget = int(total * workload.budget_fraction)
                        budgets[f"{workload.name}/{arch}"] = {"budget_bytes": budget, "estimated_total_bytes": total,
                                                              "fraction": workload.budget_fraction}
                    t0 = time.perf_counter()
                    new_rows, speed = session(arch, workload, dirs[workload.template], renderers[workload.template],
                                              reference, args, logs, budget, measure=i == 0 and not args.no_speed)
                    rows.extend(new_rows)
                    print(f"[{arch}] {workload.name}: " + "; ".join(
                        f"{r.server} cached {r.cached_tokens}/{r.oracle_tokens} oracle" + (" ERROR" if r.error else "")
                        for r in new_rows) + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
                    if speed:
                        speeds[arch] = speed
            finally:
                for reference in references.values():
                    reference.close()
        runtime = time.perf_counter() - started
        print()
        print_table(rows)
        for kind in args.servers:
            mine = [r for r in rows if r.server == kind and not r.error]
            print(f"{kind}: replies equal to the in-process greedy text {sum(r.replies_as_in_process for r in mine)}"
                  f"/{sum(r.requests for r in mine)}; prompt-token counts differing from ours "
                  f"{sum(r.prompt_token_mismatches for r in mine)}")
        print()
        print_speed(speeds)
        misses = check_targets(rows, speeds)
        print("\ntargets missed:" if misses else "\nall targets met")
        for miss in misses:
            print(f"  - {miss}")
        for where, b in budgets.items():
            print(f"cache budget [{where}]: {b['budget_bytes']:,} B "
                  f"({b['fraction']:.0%} of an estimated {b['estimated_total_bytes']:,} B)")
        load = {"before": load_before, "after": os.getloadavg()}
        print_run(command, runtime, load)
        if args.json:
            write_json(args, command, runtime, rows, speeds, budgets, misses, load)
            print(f"wrote {args.json}")
    return 0


def print_speed(speeds: dict[str, dict]) -> None:
    names = (("in_process", "in-process stream_generate"), (PROXY, "proxy"), (UPSTREAM, "mlx_lm.server"))
    for arch, speed in speeds.items():
        if "error" in speed:
            print(f"speed [{arch}]: ERROR {speed['error']}")
            continue
        base = speed["in_process"]
        parts = []
        for key, name in names:
            if key in speed and speed[key]["decode_tps_best"]:
                tps = speed[key]["decode_tps_best"]
                cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(speed[key]["decode_cpu_ms_per_token"].items())
                                if role != "worker" or key == PROXY)
                parts.append(f"{name} {tps:.0f} tok/s ({100 * tps / base['decode_tps_best']:.0f}%; CPU ms/token: {cpu})")
        print(f"decode [{arch}], best of rounds: " + "; ".join(parts))
        parts = []
        for key, name in names:
            if key in speed:
                ms = speed[key]["tiny_request_ms_median"]
                extra = "" if key == "in_process" else f" (+{ms - base['tiny_request_ms_median']:.1f} ms)"
                parts.append(f"{name} {ms:.1f} ms{extra}")
        print(f"1-token request [{arch}], median wall: " + "; ".join(parts))
        ours = speed.get(PROXY, {})
        if "tiny_worker_ms_median" in ours:
            print(f"  proxy vs its worker's reported time [{arch}]: worker {ours['tiny_worker_ms_median']:.1f} ms; "
                  f"proxy log total - worker {ours['tiny_proxy_log_minus_worker_ms_median']:.1f} ms; "
                  f"client wall - worker {ours['tiny_client_minus_worker_ms_median']:.1f} ms")


def git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--short").splitlines()}


def command_line(module: str, argv: Optional[list[str]]) -> str:
    """How this run was started, for the report."""
    return " ".join([".venv/bin/python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def print_run(command: str, runtime: float, load: dict) -> None:
    print(f"\ncommand: {command}\nruntime: {runtime:.0f} s; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.1f}' for x in load['before'])}, after {'/'.join(f'{x:.1f}' for x in load['after'])} "
          f"on {os.cpu_count()} CPUs")


def run_header(args: argparse.Namespace, command: str, runtime: float, load: dict) -> dict:
    """What every benchmark's JSON starts with: when, how, on what, from which tree, with which settings."""
    import mlx.core as mx
    import mlx_lm

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "runtime_s": runtime,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": load},
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "git": git_state(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def write_json(args, command, runtime, rows, speeds, budgets, misses, load) -> None:
    data = {
        **run_header(args, command, runtime, load),
        "size": asdict(wl.SIZES[args.size]),
        "rows": [{**asdict(r), "cached_over_oracle": r.share} for r in rows],
        "speed": speeds,
        "mix_budgets": budgets,
        "targets_missed": misses,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

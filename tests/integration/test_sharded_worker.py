"""A sharded worker: `mlx.launch` with 2 ranks of the ring backend on loopback, driven over ZeroMQ.

Its greedy tokens must equal a single-process `--no-cache` worker's, and its pool must
restore a continued conversation and a mid-message divergence as one process does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq

from protocol.messages import (
    Connect, FinishReason, Generate, Hello, Result, SamplingParams, Shutdown, TokenFrame, Tokens,
)  # fmt: skip
from tests.integration.test_worker_process import Client, Worker, _tokens

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
MAX_TOKENS = 6


def _free_ports(count: int) -> int:
    """A first port of `count` consecutive free ones (the ring listens on PORT, PORT+1, ...)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65536:
            continue
        try:
            held = []
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


class ShardedWorker:
    """`mlx.launch --backend ring -n 2` of `mlx-cache-proxy worker`, rank 0 on a loopback TCP endpoint."""

    def __init__(self, model: Path):
        self.endpoint = f"tcp://127.0.0.1:{_free_ports(1)}"
        command = [str(MLX_LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                   "--starting-port", str(_free_ports(2)), "--",
                   sys.executable, "-m", "proxy.cli", "worker", "--model", str(model), "--endpoint", self.endpoint,
                   "--cache-bytes", "64M", "--max-batch", "4"]  # fmt: skip
        # Its own session: teardown can stop the launcher and both ranks it started, whatever state they are in.
        self.proc = subprocess.Popen(command, cwd=REPO, start_new_session=True)
        self.context = zmq.Context()
        self.client = Client(self.context, self.endpoint)

    def connect(self) -> Hello:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"the sharded worker exited with {self.proc.returncode}"
            self.client.send(Connect())
            try:
                hello = self.client.recv(timeout=0.5, skip_hello=False)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no Hello"
        assert isinstance(hello, Hello), hello
        return hello

    def shutdown(self) -> int:
        self.client.send(Shutdown())
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        self.client.socket.close(linger=0)
        self.context.term()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT_S)


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 131 + i * 37) % 990 + 3 for i in range(length)]


def _generate(rid: str, prompt: list[int], hints: list[int] = ()) -> Generate:
    return Generate(rid, prompt, SamplingParams(max_tokens=MAX_TOKENS), checkpoint_hints=list(hints))


def _run(client: Client, request: Generate) -> tuple[list[int], Result]:
    chunks, result = client.run(request, timeout=120.0)
    assert isinstance(result, Result), result
    assert result.finish_reason is FinishReason.LENGTH
    return _tokens(chunks), result


def _run_together(client: Client, requests: list[Generate]) -> list[list[int]]:
    """Send all of `requests` at once; each one's tokens (batched tokens arrive in TokenFrames)."""
    for request in requests:
        client.send(request)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    done: set[str] = set()
    while len(done) < len(requests):
        message = client.recv(timeout=120.0)
        for part in message.parts if isinstance(message, TokenFrame) else [message]:
            if isinstance(part, Tokens):
                tokens[part.request_id] += part.tokens
            else:
                assert isinstance(part, Result) and part.finish_reason is FinishReason.LENGTH, part
                done.add(part.request_id)
    return [tokens[r.request_id] for r in requests]


def _cold_tokens(model: Path, socket_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    """What one process with no cache generates for each prompt."""
    worker = Worker(model, socket_dir, "--no-cache")
    try:
        client, _ = worker.connected()
        return [_run(client, _generate(f"cold-{i}", p))[0] for i, p in enumerate(prompts)]
    finally:
        worker.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_sharded_worker_matches_one_process_and_restores_exactly(tiny_model, arch):
    model = tiny_model(arch)
    first = _prompt(3, 40)
    hint = 24  # a message end: on the hybrid, the checkpoint the divergence restores from
    with tempfile.TemporaryDirectory(prefix="mcp-", dir="/tmp") as socket_dir:
        sharded = ShardedWorker(model)
        try:
            hello = sharded.connect()
            tokens, result = _run(sharded.client, _generate("first", first, [hint]))
            assert result.facts.cached_tokens == 0

            continued = first + tokens + _prompt(5, 6)
            diverged = first[:30] + _prompt(7, 6)  # leaves `first` mid-message, past the hint
            others = [_prompt(11, 30), _prompt(13, 34)]
            cont_tokens, cont = _run(sharded.client, _generate("continued", continued))
            div_tokens, div = _run(sharded.client, _generate("diverged", diverged))
            # Two at once: admitted, prefilled and decoded in one batch on both ranks.
            batch_tokens = _run_together(sharded.client, [_generate(f"batch-{i}", p) for i, p in enumerate(others)])
            assert sharded.shutdown() == 0
        finally:
            sharded.close()
        cold = _cold_tokens(model, socket_dir, [first, continued, diverged, *others])

    assert hello.cache_enabled
    assert tokens == cold[0]
    assert cont_tokens == cold[1]
    assert cont.facts.cached_tokens >= len(first)  # the conversation went on from its stored cache
    assert div_tokens == cold[2]
    if "ArraysCache" in hello.layout.layer_kinds:
        assert div.facts.cached_tokens == hint  # the recurrent state restored from the hint's snapshot
    else:
        assert div.facts.cached_tokens == 30  # KV trimmed back to the divergence
    assert batch_tokens == cold[3:]

"""The proxy <-> worker link under attack and with keys: a rogue peer, CURVE, open binds.

A stranger that reaches a worker's endpoint (a second ZeroMQ DEALER) must get
nothing -- no Hello, no tokens, no Stats -- and must not be able to stop the
worker or take the proxy's place; the proxy keeps serving. With CURVE keys the
right proxy is served and a wrong key is refused with a 503, never a 400.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai
import pytest
import zmq

from protocol.codec import encode
from protocol.messages import Abort, Connect, Generate, Message, Ping, SamplingParams, Shutdown
from tests.e2e.conftest import REPO, Server, free_port, launch, stop, wait_healthy
from tests.e2e.test_faults import ask, client, first_content, health, wait_until, worker

pytestmark = pytest.mark.slow


def worker_argv(model: Path, endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "worker", "--model", str(model), "--endpoint", endpoint,
            "--heartbeat-interval", "0.5", *extra]  # fmt: skip


def serve_argv(model: Path, endpoint: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "serve", "--worker", f"{model}={endpoint}", "--port", str(port),
            "--heartbeat-timeout", "3", "--worker-start-timeout", "60", *extra]  # fmt: skip


@contextmanager
def remote_service(
    model: Path, log_dir: Path, name: str, worker_extra=(), serve_extra=(), bind_host: str = "127.0.0.1"
) -> Iterator[tuple[Server, Server, str]]:
    """(proxy, remote worker, the proxy's tcp endpoint for it), both stopped afterwards."""
    worker_port, port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{worker_port}"
    bind = f"tcp://{bind_host}:{worker_port}"
    remote = launch(worker_argv(model, bind, *worker_extra), worker_port, log_dir / f"{name}-worker.log")
    server = launch(serve_argv(model, endpoint, port, *serve_extra), port, log_dir / f"{name}-proxy.log")
    try:
        wait_healthy(server)
        yield server, remote, endpoint
    finally:
        stop(server)
        stop(remote)


class Rogue:
    """Another local process on the worker's endpoint: a plain DEALER, no keys."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, message: Message) -> None:
        self.socket.send(encode(message))

    def received(self, within: float) -> list[bytes]:
        frames = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            if self.socket.poll(left * 1000):
                frames.append(self.socket.recv())
        return frames

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def generate(rid: str, max_tokens: int = 50) -> Generate:
    return Generate(request_id=rid, prompt_tokens=[5, 6, 7, 8], sampling=SamplingParams(max_tokens=max_tokens))


def write_keys(directory: Path, only: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", str(directory), "--only", only],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return directory


# ----------------------------------------------------------------- a rogue peer


def test_a_rogue_peer_gets_nothing_and_the_proxy_keeps_serving(tiny_model, log_dir):
    with remote_service(tiny_model, log_dir, "rogue") as (server, remote, endpoint):
        model = str(tiny_model)
        before = ask(server, "hello there", model)
        rogue = Rogue(endpoint)
        try:
            # Mid-request: a Connect must not take the running request's tokens.
            chunks = iter(client(server).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "tell a long story"}], max_tokens=120, stream=True,
            ))  # fmt: skip
            text = first_content(chunks)
            rogue.send(Connect())
            rogue.send(generate("rogue-1"))
            rogue.send(Ping())
            rogue.send(Abort(request_id="rogue-1"))
            text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text
            rogue.send(Shutdown())
            assert rogue.received(within=2.0) == []  # no Hello, no tokens, no Stats, no Error
            assert remote.process.poll() is None  # Shutdown from a stranger stopped nothing
            assert ask(server, "hello there", model) == before
            status = health(server)
            assert status["status"] == "ok" and worker(server)["ready"]
        finally:
            rogue.close()
        assert "refused a Connect: a proxy is connected already" in remote.log()
        assert "from a peer that did not connect" in remote.log()


def test_a_restarted_proxy_is_admitted_again_at_once(tiny_model, log_dir):
    """The worker frees its one peer slot when the old proxy's connection goes, without waiting for a timeout."""
    with remote_service(tiny_model, log_dir, "reproxy") as (server, remote, endpoint):
        assert ask(server, "hi", str(tiny_model))
        assert stop(server) == 0
        port = free_port()
        again = launch(serve_argv(tiny_model, endpoint, port), port, log_dir / "reproxy-proxy-2.log")
        try:
            started = time.monotonic()
            wait_healthy(again, timeout=30)
            assert time.monotonic() - started < 15
            assert ask(again, "hi", str(tiny_model))
        finally:
            stop(again)


# ----------------------------------------------------------------- open binds


def test_worker_refuses_a_non_loopback_bind_without_keys(tiny_model):
    done = subprocess.run(worker_argv(tiny_model, f"tcp://0.0.0.0:{free_port()}"), cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "without CURVE keys" in lines[0], done.stderr


def test_proxy_refuses_a_non_loopback_worker_without_keys(tiny_model):
    argv = serve_argv(tiny_model, "tcp://192.0.2.7:5555", free_port())
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--worker-public-key" in done.stderr, done.stderr


# ----------------------------------------------------------------- CURVE


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Each side's pair written on its own, as on two machines; only public keys are copied over."""
    worker_dir = write_keys(tmp_path_factory.mktemp("worker-keys"), "worker")
    proxy_dir = write_keys(tmp_path_factory.mktemp("proxy-keys"), "proxy")
    stranger_dir = write_keys(tmp_path_factory.mktemp("stranger-keys"), "proxy")
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "proxy.key").write_bytes((proxy_dir / "proxy.key").read_bytes())
    only_stranger = tmp_path_factory.mktemp("only-stranger")
    (only_stranger / "proxy.key").write_bytes((stranger_dir / "proxy.key").read_bytes())
    return {
        "worker_secret": worker_dir / "worker.key_secret", "worker_public": worker_dir / "worker.key",
        "proxy_secret": proxy_dir / "proxy.key_secret", "allowed": allowed, "only_stranger": only_stranger,
        "stranger_secret": stranger_dir / "proxy.key_secret",
    }  # fmt: skip


def test_keys_are_readable_by_their_owner_only(keys):
    for name in ("worker_secret", "worker_public", "proxy_secret"):
        assert stat.S_IMODE(os.stat(keys[name]).st_mode) == 0o600, name


def test_curve_with_the_right_keys_serves_and_a_wrong_key_gets_503(tiny_model, log_dir, keys):
    worker_keys = ("--curve-secret-key", str(keys["worker_secret"]), "--curve-allowed-keys", str(keys["allowed"]))
    proxy_keys = ("--worker-public-key", f"{tiny_model}={keys['worker_public']}",
                  "--curve-secret-key", str(keys["proxy_secret"]))  # fmt: skip
    model = str(tiny_model)
    # Bound on every interface: allowed, because the keys guard it.
    with remote_service(tiny_model, log_dir, "curve", worker_keys, proxy_keys, bind_host="0.0.0.0") as (
        server, remote, endpoint
    ):  # fmt: skip
        assert ask(server, "hello there", model)
        assert "(CURVE)" in remote.log()
        rogue = Rogue(endpoint)  # no keys: its connection never completes
        try:
            rogue.send(Connect())
            rogue.send(Shutdown())
            assert rogue.received(within=1.5) == []
        finally:
            rogue.close()
        assert ask(server, "hello there", model) and remote.process.poll() is None

        # The worker comes back admitting another proxy's key only: this proxy is refused, with a 503.
        stop(remote)
        worker_port = int(endpoint.rsplit(":", 1)[1])
        other = ("--curve-secret-key", str(keys["worker_secret"]), "--curve-allowed-keys", str(keys["only_stranger"]))
        changed = launch(worker_argv(tiny_model, endpoint, *other), worker_port, log_dir / "curve-worker-2.log")
        try:
            def refused() -> bool:
                try:
                    ask(server, "hello there", model)
                except openai.InternalServerError as error:
                    return error.status_code == 503 and error.code == "worker_link_refused"
                return False

            wait_until(refused, 60, "a 503 worker_link_refused")
            status = health(server)
            assert status["status"] == "degraded" and not worker(server)["ready"]
            assert any(model in p and "CURVE key" in p for p in status["problems"]), status["problems"]
        finally:
            stop(changed)
        assert "not an allowed proxy key" in changed.log()


def test_a_proxy_with_the_wrong_worker_key_stops_at_start_up_with_a_clear_error(tiny_model, log_dir, keys):
    worker_port = free_port()
    endpoint = f"tcp://127.0.0.1:{worker_port}"
    worker_keys = ("--curve-secret-key", str(keys["worker_secret"]), "--curve-allowed-keys", str(keys["allowed"]))
    remote = launch(worker_argv(tiny_model, endpoint, *worker_keys), worker_port, log_dir / "wrongkey-worker.log")
    try:
        # The stranger's public key stands in for the worker's: the handshake cannot succeed.
        wrong = keys["only_stranger"] / "proxy.key"
        argv = serve_argv(tiny_model, endpoint, free_port(), "--worker-public-key", f"{tiny_model}={wrong}",
                          "--curve-secret-key", str(keys["proxy_secret"]))  # fmt: skip
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "security handshake with the worker" in done.stderr, done.stderr[-2000:]
    finally:
        stop(remote)

"""Fixtures that run the whole service as subprocesses: `serve`, and mlx_lm.server to compare with.

Every process started here is stopped in teardown: SIGTERM, then SIGKILL after
a timeout. A server that fails to come up fails the test with its log tail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch(argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> Server:
    # Each process gets its own default disk tier: two workers of one model on one directory are
    # refused (worker/disk_lock.py), and the session's proxies run beside the tests' own. A
    # --cache-dir flag still wins.
    disk = log_path.parent / f"{log_path.stem}-disk"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "MLX_CACHE_PROXY_CACHE_DIR": str(disk), **(env or {})},
    )  # fmt: skip
    log.close()
    return Server(process, port, log_path)


def wait_healthy(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{server.root}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{server.log()[-4000:]}")


def stop(server: Server, timeout: float = STOP_TIMEOUT_S) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


def post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST raw bytes; (status, parsed JSON body), error statuses included."""
    request = urllib.request.Request(
        server.root + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def proxy_argv(model: str | Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "serve", "--model", str(model), "--port", str(port),
            "--shutdown-timeout", "10", *extra]  # fmt: skip


@contextmanager
def running_proxy(model: str | Path, log_dir: Path, *extra: str, name: str = "proxy") -> Iterator[Server]:
    port = free_port()
    server = launch(proxy_argv(model, port, *extra), port, log_dir / f"{name}-{port}.log")
    try:
        wait_healthy(server)
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default tiny hybrid (qwen3_next: KV + gated-delta layers), with the tools template."""
    from worker.tiny_models import make_model

    return make_model("qwen3_next", tmp_path_factory.mktemp("models") / "tiny-qwen3-next", template="chatml-tools").resolve()


@pytest.fixture(scope="session")
def tiny_model_alias(tiny_model, tmp_path_factory) -> Path:
    """The same model under another path: a different model name for a second proxy."""
    alias = tmp_path_factory.mktemp("alias") / "tiny-alias"
    alias.symlink_to(tiny_model, target_is_directory=True)
    return alias


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def proxies(tiny_model, tiny_model_alias, log_dir) -> Iterator[tuple[Server, Server]]:
    """(cached proxy, no-cache proxy), started together.

    The cached proxy forwards models it does not serve to the no-cache proxy,
    which serves the alias path: the upstream path is tested too.
    """
    nocache_port, port = free_port(), free_port()
    nocache = launch(
        proxy_argv(tiny_model_alias, nocache_port, "--no-cache"), nocache_port, log_dir / "nocache.log"
    )
    cached = launch(
        proxy_argv(tiny_model, port, "--upstream", f"http://127.0.0.1:{nocache_port}"), port, log_dir / "proxy.log"
    )
    try:
        wait_healthy(nocache)
        wait_healthy(cached)
        yield cached, nocache
    finally:
        codes = (stop(cached), stop(nocache))
        assert codes == (0, 0), f"proxies exited with {codes}:\n{cached.log()[-3000:]}"


@pytest.fixture(scope="session")
def proxy(proxies) -> Server:
    return proxies[0]


@pytest.fixture(scope="session")
def nocache_proxy(proxies) -> Server:
    return proxies[1]


@pytest.fixture(scope="module")
def mlx_lm_server(tiny_model, log_dir, tmp_path_factory) -> Iterator[Server]:
    port = free_port()
    hf_home = tmp_path_factory.mktemp("hf")
    (hf_home / "hub").mkdir()  # mlx_lm.server's /v1/models scans the HF cache and fails without one
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(tiny_model), "--port", str(port)]
    server = launch(argv, port, log_dir / "mlx_lm_server.log", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(server)
        yield server
    finally:
        stop(server)

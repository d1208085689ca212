"""Local worker processes: how they are started, watched and stopped.

The socket side (handshake, frames, heartbeats) is `proxy.worker_client`; this
module only owns the OS process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from proxy.config import ModelSpec, WorkerOptions

log = logging.getLogger("mlx_cache_proxy")


def socket_dir() -> Path:
    """A private directory for the workers' ipc sockets (short: ipc paths are limited)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="mlx-cache-proxy-", dir=base))


def ipc_endpoint(directory: Path, index: int) -> str:
    return f"ipc://{directory}/worker-{index}.sock"


def worker_argv(spec: ModelSpec, options: WorkerOptions, endpoint: str) -> list[str]:
    """The command line of a local worker for `spec`."""
    if spec.path is None:
        raise ValueError(f"model {spec.model_id!r} has no local path to start a worker with")
    argv = [
        sys.executable, "-m", "proxy.cli", "worker",
        "--model", str(spec.path),
        "--endpoint", endpoint,
        "--model-id", spec.model_id,
        "--parent-pid", str(os.getpid()),
        "--cache-bytes", str(options.cache_bytes),
        "--heartbeat-interval", str(options.heartbeat_interval),
    ]  # fmt: skip
    if options.checkpoint_interval is not None:
        argv += ["--checkpoint-interval", str(options.checkpoint_interval)]
    if options.no_cache:
        argv.append("--no-cache")
    if options.prefill_step is not None:
        argv += ["--prefill-step", str(options.prefill_step)]
    if options.cache_dir and not options.no_cache:
        argv += ["--cache-dir", options.cache_dir, "--disk-cache-bytes", str(options.disk_cache_bytes)]
    if options.memory_limit:
        argv += ["--memory-limit", str(options.memory_limit)]
    if options.max_kv_size:
        argv += ["--max-kv-size", str(options.max_kv_size)]
    argv += ["--log-level", options.log_level, "--log-format", options.log_format]
    if options.log_file:
        argv += ["--log-file", options.log_file]
    return argv


class WorkerProcess:
    """One local worker subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, endpoint: str) -> None:
        self._process = process
        self.endpoint = endpoint
        self.exited: asyncio.Task[int] = asyncio.ensure_future(process.wait())

    @classmethod
    async def start(
        cls, spec: ModelSpec, options: WorkerOptions, endpoint: str
    ) -> WorkerProcess:
        argv = worker_argv(spec, options, endpoint)
        log.info("starting worker for %s: %s", spec.model_id, " ".join(argv))
        # stdout/stderr are inherited: the worker's log lines land in ours.
        process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        return cls(process, endpoint)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._process.returncode

    async def stop(self, timeout: float) -> None:
        """Wait `timeout` for an exit (after Shutdown was sent), then SIGTERM, then SIGKILL."""
        for step, signal_name in ((timeout, "terminate"), (5.0, "kill")):
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), step)
                return
            except asyncio.TimeoutError:
                log.warning("worker pid %d did not exit; sending %s", self.pid, signal_name)
                try:
                    getattr(self._process, signal_name)()
                except ProcessLookupError:
                    pass
        await asyncio.wait_for(asyncio.shield(self.exited), 5.0)


def remove_socket_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)

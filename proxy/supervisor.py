"""Workers kept alive: local processes started, watched, restarted and stopped.

`WorkerProcess` is one OS process. `WorkerSupervisor` keeps one model's worker
up: it starts it (or reaches a remote one), notices its death -- the process
exited, or heartbeats stopped (`proxy.worker_client`'s watchdog) -- and then
holds the model's queue, kills what is left of a local worker, and brings a
new one up with back-off (0.5 s, 1 s, 2 s ... capped; the back-off starts over
after a healthy period). A remote worker is not ours to restart: the
supervisor handshakes again until it answers. Requests queued meanwhile wait
(up to `unavailable_timeout`, then 503) and run on the new worker. After every
handshake the queue is told how many requests the worker runs at once (its
Hello's `max_batch`): a local worker was asked with --max-batch, a remote one
decides for itself. A remote worker whose link refuses us (CURVE keys that do
not match) is tried again the same way, but meanwhile requests get a 503
`worker_link_refused` at once: waiting would not mend the keys.

The socket side (handshake, frames, heartbeats) is `proxy.worker_client`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import zmq.asyncio

from protocol.messages import CacheEvents, Hello
from proxy.config import ModelSpec, WorkerOptions
from proxy.errors import WorkerLinkRefused as LinkRefusedError
from proxy.errors import WorkerUnavailable
from proxy.request_queue import RequestQueue
from proxy.worker_client import WorkerClient, WorkerLinkRefused, WorkerStartError

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
        "--heartbeat-interval", str(options.heartbeat_interval),
    ]  # fmt: skip
    if options.cache_bytes is not None:
        argv += ["--cache-bytes", str(options.cache_bytes)]
    if options.checkpoint_interval is not None:
        argv += ["--checkpoint-interval", str(options.checkpoint_interval)]
    if options.no_cache:
        argv.append("--no-cache")
    if options.prefill_step is not None:
        argv += ["--prefill-step", str(options.prefill_step)]
    if options.max_batch is not None:
        argv += ["--max-batch", str(options.max_batch)]
    if options.cache_dir and not options.no_cache:
        cache_dir = os.path.join(options.cache_dir, spec.disk_subdir) if spec.disk_subdir else options.cache_dir
        argv += ["--cache-dir", cache_dir, "--disk-cache-bytes", str(options.disk_cache_bytes)]
    if options.memory_limit:
        argv += ["--memory-limit", str(options.memory_limit)]
    if options.max_kv_size:
        argv += ["--max-kv-size", str(options.max_kv_size)]
    argv += ["--log-level", options.log_level, "--log-format", options.log_format]
    if options.log_file:
        argv += ["--log-file", options.log_file]
    if options.stderr_level:
        argv += ["--stderr-level", options.stderr_level]
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
        # stdout/stderr are inherited: the worker's log lines land in ours. Its own session:
        # a Ctrl-C in the terminal must not stop it under a running request; the proxy
        # stops it (Shutdown), and the worker exits by itself when the proxy is gone.
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
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

    async def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL (a hung or stopped worker ignores anything milder) and wait for the exit."""
        if self.returncode is None:
            try:
                self._process.kill()
            except ProcessLookupError:
                pass
        await asyncio.wait_for(asyncio.shield(self.exited), timeout)


def remove_socket_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------- supervision


class WorkerState(str, Enum):
    STARTING = "starting"  # the first start-up
    UP = "up"
    DOWN = "down"  # dead or silent: being restarted (local) or reconnected (remote)
    STOPPED = "stopped"  # the proxy is shutting down


class Backoff:
    """Delays between restart attempts: `initial`, doubling, at most `cap`."""

    MIN_STEP = 0.1  # an `initial` of 0 restarts at once, but a crash loop still backs off

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = max(0.0, initial)
        self.cap = max(cap, self.initial)
        self._next = self.initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, max(self._next * 2, self.MIN_STEP))
        return delay

    def reset(self) -> None:
        self._next = self.initial


class WorkerSupervisor:
    """One model's worker, kept up; see the module docstring.

    `client` is the client of the latest worker that completed a handshake (a
    dead one's, with its last Hello and Stats, until a new one is up).
    `restarts` counts local worker processes started after the first, and
    reconnections to a remote worker that came back.
    """

    def __init__(
        self,
        spec: ModelSpec,
        options: WorkerOptions,
        endpoint: str,
        context: zmq.asyncio.Context,
        queue: RequestQueue,
    ) -> None:
        self.spec = spec
        self.options = options
        self.endpoint = spec.endpoint or endpoint
        self.context = context
        self.queue = queue
        self.client: Optional[WorkerClient] = None
        self.process: Optional[WorkerProcess] = None
        self.state = WorkerState.STARTING
        self.restarts = 0
        self.down_since: Optional[float] = None
        self._up_since = 0.0
        self._first_hello: Optional[Hello] = None
        self._backoff = Backoff(options.restart_backoff, options.restart_backoff_max)
        self._recovery: Optional[asyncio.Task[None]] = None
        self._stopping = False  # shutting down: no more restarts
        self.link_refused: Optional[str] = None  # why the last attempt's link was refused, until one succeeds
        # The served model's hooks (replicas, routing): a worker's prefix events, and its going down / up.
        self.on_cache_events: Optional[Callable[[CacheEvents], None]] = None
        self.on_down: Optional[Callable[[], None]] = None
        self.on_up: Optional[Callable[[], None]] = None

    @property
    def local(self) -> bool:
        return self.spec.endpoint is None

    @property
    def name(self) -> str:
        return self.spec.model_id

    # ------------------------------------------------------------ start and stop

    async def start(self) -> Hello:
        """Bring the worker up for the first time; raises `WorkerStartError` if it cannot."""
        self.client = await self._bring_up()
        assert self.client.hello is not None
        self._first_hello = self.client.hello
        self._mark_up()
        return self._first_hello

    async def close(self) -> None:
        """Stop supervising; send Shutdown to (and stop) a local worker, leave a remote one be."""
        self._stopping = True
        self.state = WorkerState.STOPPED
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self.client is not None:
            await self.client.close(shutdown=self.local)
        if self.process is not None:
            await self.process.stop(self.options.stop_timeout)

    def stop_restarting(self) -> None:
        """The proxy is shutting down: a worker that dies from now on stays dead."""
        self._stopping = True
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()

    # ------------------------------------------------------------ availability

    def check_available(self) -> None:
        """Raise `WorkerUnavailable` when a new request should not even queue.

        A worker that is down is waited for (the request queues) until it has
        been down for `unavailable_timeout`; after that requests fail at once.
        """
        if self.state is WorkerState.UP:
            return
        reason = self.client.failure if self.client is not None else "not started"
        if self.state is WorkerState.DOWN and self.link_refused is not None:
            raise self._link_refused_error()
        if self.state is WorkerState.DOWN and not self._stopping:
            down_for = time.monotonic() - (self.down_since or time.monotonic())
            if down_for < self.options.unavailable_timeout:
                return
        raise WorkerUnavailable(f"the worker for {self.name} is unavailable: {reason}", retry_after=5)

    # ------------------------------------------------------------ failure and recovery

    def _on_client_failure(self, client: WorkerClient, reason: str) -> None:
        if client is not self.client or self.state is not WorkerState.UP:
            return
        self.state = WorkerState.DOWN
        self.down_since = time.monotonic()
        self.queue.hold()  # nothing queued goes to the dead worker
        if self.on_down is not None:
            self.on_down()
        if self._stopping:
            return
        if self.down_since - self._up_since >= self.options.restart_backoff_reset:
            self._backoff.reset()
        self._recovery = asyncio.get_running_loop().create_task(
            self._recover(reason), name=f"worker-recovery-{self.name}"
        )

    def _on_process_exit(self, process: WorkerProcess, exited: asyncio.Task[int]) -> None:
        if exited.cancelled() or process is not self.process or self.client is None:
            return  # an exit during start-up is reported by the handshake itself
        self.client.fail(f"worker process exited with code {exited.result()}")

    async def _recover(self, reason: str) -> None:
        """Clear away the dead worker, then bring a new one up, with back-off, until one answers."""
        assert self.client is not None
        await self.client.close(shutdown=False)  # drops frames still queued for the dead worker
        if self.process is not None and self.process.returncode is None:
            log.warning("killing worker pid %d for %s: %s", self.process.pid, self.name, reason)
            try:
                await self.process.kill()
            except asyncio.TimeoutError:
                log.error("worker pid %d for %s did not die on SIGKILL", self.process.pid, self.name)
        expiry = asyncio.get_running_loop().create_task(self._expire_waiting())
        try:
            client = await self._bring_up_with_backoff()
        finally:
            expiry.cancel()
        self.client = client
        self._mark_up()
        log.info(
            "worker for %s is back (pid %s, restart %d); %d queued request(s) resume",
            self.name, client.hello.pid if client.hello else "?", self.restarts, self.queue.waiting,
        )  # fmt: skip
        self.queue.resume()

    async def _bring_up_with_backoff(self) -> WorkerClient:
        while True:
            delay = self._backoff.next()
            action = "restarting" if self.local else "reconnecting to"
            log.info("%s the worker for %s in %.1fs", action, self.name, delay)
            await asyncio.sleep(delay)
            try:
                client = await self._bring_up(restart=True)
            except WorkerLinkRefused as exc:
                log.error("worker for %s did not come back: %s", self.name, exc)
                self.link_refused = str(exc)
                self.queue.fail_waiting(self._link_refused_error)
                continue
            except (WorkerStartError, OSError) as exc:
                log.error("worker for %s did not come back: %s", self.name, exc)
                continue
            except Exception:
                log.exception("bringing the worker for %s back failed", self.name)
                continue
            if not self.local:
                self.restarts += 1
            self.link_refused = None
            return client

    async def _expire_waiting(self) -> None:
        """Answer requests that waited `unavailable_timeout` for the worker with a 503."""
        timeout = self.options.unavailable_timeout
        tick = max(0.05, min(1.0, timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.down_since is not None and now - self.down_since >= timeout:
                failed = self.queue.fail_waiting(self._unavailable_error, entered_before=now - timeout)
                if failed:
                    log.warning("%d request(s) waited %.0fs for the worker of %s: 503", failed, timeout, self.name)

    def _link_refused_error(self) -> WorkerUnavailable:
        return LinkRefusedError(f"the worker for {self.name} is unavailable: {self.link_refused}", retry_after=5)

    def _unavailable_error(self) -> WorkerUnavailable:
        reason = self.client.failure if self.client is not None else "not started"
        return WorkerUnavailable(
            f"the worker for {self.name} is unavailable ({reason}) and did not come back "
            f"within {self.options.unavailable_timeout:.0f}s",
            retry_after=5,
        )

    async def _bring_up(self, restart: bool = False) -> WorkerClient:
        """Start (local) or reach (remote) a worker and handshake; the new client, connected."""
        options = self.options
        process = None
        if self.local:
            process = await WorkerProcess.start(self.spec, options, self.endpoint)
            self.process = process
            if restart:
                self.restarts += 1
            process.exited.add_done_callback(lambda task, p=process: self._on_process_exit(p, task))
        client = WorkerClient(
            self.name,
            self.endpoint,
            context=self.context,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            keys=self.spec.link_keys,
        )
        client.on_failure = lambda reason, c=client: self._on_client_failure(c, reason)
        client.on_cache_events = self.on_cache_events
        try:
            hello = await client.connect(options.start_timeout, exited=process.exited if process else None)
            self._check_same_model(hello)
        except BaseException:
            await client.close(shutdown=process is not None)
            if process is not None:
                await process.stop(timeout=0.5)
            raise
        return client

    def _check_same_model(self, hello: Hello) -> None:
        first = self._first_hello
        if first is None:
            return
        if (hello.model_id, hello.vocab_size) != (first.model_id, first.vocab_size):
            raise WorkerStartError(
                f"the worker at {self.endpoint} now serves {hello.model_id!r} (vocabulary {hello.vocab_size}); "
                f"{self.name} was {first.model_id!r} (vocabulary {first.vocab_size}): not using it"
            )

    def _mark_up(self) -> None:
        """The current client completed its handshake: before the queue resumes, match its batch size."""
        self.state = WorkerState.UP
        self.down_since = None
        self._up_since = time.monotonic()
        assert self.client is not None and self.client.hello is not None
        self._apply_max_batch(self.client.hello)
        if self.on_up is not None:
            self.on_up()

    def _apply_max_batch(self, hello: Hello) -> None:
        max_batch = hello.max_batch
        if max_batch < 1:
            log.warning("worker for %s says it runs %d requests at once; running 1", self.name, max_batch)
            max_batch = 1
        if max_batch != self.queue.max_running:
            log.info("worker for %s runs up to %d request(s) at once", self.name, max_batch)
        self.queue.set_max_running(max_batch)

"""A served model: its supervised worker, its queue and its tokenizer.

`open_served_model` brings one up (start the worker, handshake, load the
tokenizer); `close_served_model` takes it down in the reverse order.
`begin_shutdown` is the first step of a graceful stop: waiting requests get a
clean 503 and the worker is no longer restarted, while the running requests
go on. `ModelRegistry` maps request `model` names, aliases included, to them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine, Optional, TypeVar

import zmq.asyncio

from proxy.chat import ChatTokenizer
from proxy.config import DEFAULT_MODEL_ALIAS, ModelSpec, ProxyConfig, is_name_pattern
from proxy.errors import ShuttingDown
from proxy.request_queue import RequestQueue
from proxy.supervisor import WorkerProcess, WorkerState, WorkerSupervisor
from proxy.worker_client import WorkerClient, WorkerStartError

log = logging.getLogger("mlx_cache_proxy")

T = TypeVar("T")

TOKENIZER_THREADS = 4


@dataclass
class ServedModel:
    spec: ModelSpec
    supervisor: WorkerSupervisor
    queue: RequestQueue
    tokenizer: ChatTokenizer
    # Tokenizing and template rendering run here, off the event loop. A `tokenizers` encode
    # releases the GIL, so with a few threads a short prompt does not wait for a long one.
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenizer")
    )
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def client(self) -> WorkerClient:
        """The current worker's client (a dead worker's until its replacement is up)."""
        assert self.supervisor.client is not None
        return self.supervisor.client

    @property
    def process(self) -> Optional[WorkerProcess]:
        """The local worker process (None for a remote worker)."""
        return self.supervisor.process

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def worker_state(self) -> WorkerState:
        return self.supervisor.state

    def check_available(self) -> None:
        """Raise `WorkerUnavailable` when a new request should not queue (the worker stayed down)."""
        self.supervisor.check_available()

    def begin_shutdown(self) -> None:
        """Refuse new requests, answer the waiting ones with a 503, restart nothing more."""
        failed = self.queue.close(lambda: ShuttingDown("the server is shutting down", retry_after=5))
        if failed:
            log.info("shutting down: %d queued request(s) for %s answered with 503", failed, self.model_id)
        self.supervisor.stop_restarting()

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_thread, functools.partial(fn, *args, **kwargs))

    async def tokenize(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, cancelled=event, **kwargs)` on a tokenizer thread; the event is set when the caller is cancelled.

        A client that leaves cancels its handler: the tokenizing then stops at the
        next piece (`TokenizationCancelled`, which nobody awaits any more).
        """
        cancelled = threading.Event()
        try:
            return await self.in_tokenizer_thread(fn, *args, cancelled=cancelled, **kwargs)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in the background, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


async def open_served_model(
    spec: ModelSpec,
    config: ProxyConfig,
    context: zmq.asyncio.Context,
    endpoint: str,
) -> ServedModel:
    """Start (or reach) the worker for `spec`, handshake, load the tokenizer."""
    queue = RequestQueue(config.max_queue)  # max_running: from the worker's Hello, by the supervisor
    supervisor = WorkerSupervisor(spec, config.worker, endpoint, context, queue)
    try:
        # On this (the main) thread: mlx_lm imports MLX, whose thread-local state
        # must not belong to an executor thread that exits during interpreter
        # shutdown (its destructor then aborts the process).
        tokenizer = ChatTokenizer.load(spec.path) if spec.path is not None else None
        hello = await supervisor.start()
        if tokenizer is None:
            tokenizer = ChatTokenizer.load(_tokenizer_path(spec, hello.model_id))
    except BaseException:
        await supervisor.close()
        raise
    log.info(
        "worker for %s ready: pid %d, context %d, cache %s, batch %d, layers %s",
        spec.model_id,
        hello.pid,
        hello.context_limit,
        "on" if hello.cache_enabled else "off",
        queue.max_running,
        ",".join(sorted(set(hello.layout.layer_kinds))),
    )
    return ServedModel(spec=spec, supervisor=supervisor, queue=queue, tokenizer=tokenizer)


def _tokenizer_path(spec: ModelSpec, hello_model_id: str) -> Path:
    """Where the tokenizer of a remote worker's model is: its --worker name, or its model id."""
    from proxy.model_source import ModelSourceError, resolve_model_path

    for candidate in (spec.model_id, hello_model_id):
        try:
            return resolve_model_path(candidate)
        except ModelSourceError:
            continue
    raise WorkerStartError(
        f"cannot find a tokenizer for remote worker {spec.model_id!r} (worker model id "
        f"{hello_model_id!r}): name the worker by a local model path or a cached HF repo"
    )


async def close_served_model(served: ServedModel, config: ProxyConfig) -> None:
    served.begin_shutdown()  # in case on_shutdown did not run (start-up failed half-way)
    for task in list(served.background):
        task.cancel()
    await asyncio.gather(*served.background, return_exceptions=True)
    await served.supervisor.close()
    if served.process is not None:
        log.info("worker for %s stopped (exit code %s)", served.model_id, served.process.returncode)
    # Joined, not left behind: no thread may still be exiting when Python finalizes.
    served.tokenizer_thread.shutdown(wait=True, cancel_futures=True)


class ModelRegistry:
    """Request `model` names -> served models. The first model is the default.

    A name is looked up as a model id or exact alias first, then against the alias
    patterns (`claude-*`), the longest pattern first; a name nothing matches goes to
    `default_model` when one is set, else it is unknown (None).
    """

    def __init__(self, models: list[ServedModel], default_model: Optional[str] = None) -> None:
        self.models = list(models)
        self._by_name: dict[str, ServedModel] = {}
        patterns: list[tuple[str, ServedModel]] = []
        for served in self.models:
            self._by_name.setdefault(served.spec.model_id, served)
            for name in served.spec.aliases:
                if is_name_pattern(name):
                    patterns.append((name, served))
                else:
                    self._by_name.setdefault(name, served)
        self._patterns = sorted(patterns, key=lambda pattern: -len(pattern[0]))  # stable: ties keep their order
        self._fallback = self._by_name.get(default_model) if default_model else None

    def lookup(self, name: Optional[str]) -> Optional[ServedModel]:
        """The model serving `name`; no name means the first model."""
        if name is None or name == "":
            return self.models[0] if self.models else None
        served = self._by_name.get(name)
        if served is None:
            served = next((s for pattern, s in self._patterns if fnmatch.fnmatchcase(name, pattern)), None)
        return served if served is not None else self._fallback

    def ids(self) -> list[str]:
        return [served.model_id for served in self.models]

    def listed_names(self) -> list[str]:
        """What /v1/models lists: every model id, then the exact --alias names (patterns cannot be listed)."""
        aliases = [
            name for served in self.models for name in served.spec.aliases
            if not is_name_pattern(name) and name != DEFAULT_MODEL_ALIAS and self._by_name.get(name) is served
        ]  # fmt: skip
        return self.ids() + [name for name in aliases if name not in self.ids()]

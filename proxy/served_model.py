"""A served model: its replicas (each a supervised worker and its queue), its router and tokenizer.

`open_served_model` brings one up (start the workers, handshake, load the
tokenizer); `close_served_model` takes it down in the reverse order. A model
has one replica unless --replicas N or several --worker NAME=... give more;
`route` picks one per request (proxy/routing.py). A replica that goes down
while others are up hands its waiting requests on (they are routed again);
it takes requests again once its supervisor has it back.
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
from typing import Any, Callable, Coroutine, Optional, Sequence, TypeVar, Union

import zmq.asyncio

from proxy.chat import ChatTokenizer
from proxy.config import DEFAULT_MODEL_ALIAS, ModelSpec, ProxyConfig, is_name_pattern
from protocol.messages import Hello, Result
from protocol.prefix_hash import block_hashes
from proxy.errors import ShuttingDown, WorkerUnavailable
from proxy.request_queue import RequestQueue
from proxy.routing import ReplicaLoad, RoutePolicy, Router
from proxy.supervisor import WorkerProcess, WorkerState, WorkerSupervisor
from proxy.worker_client import WorkerClient, WorkerStartError

log = logging.getLogger("mlx_cache_proxy")

T = TypeVar("T")

TOKENIZER_THREADS = 4
GRAMMAR_THREADS = 2


PREFILL_TPS_MIN_TOKENS = 64  # a Result that computed fewer prompt tokens says little about prefill speed


@dataclass
class Replica:
    """One worker of a model: its supervisor and its admission queue."""

    index: int
    supervisor: WorkerSupervisor
    queue: RequestQueue
    prefill_tps: float = 0.0  # moving average of computed prompt tokens per second (0: none yet)

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def client(self) -> WorkerClient:
        assert self.supervisor.client is not None
        return self.supervisor.client

    @property
    def up(self) -> bool:
        return self.supervisor.state is WorkerState.UP

    def load(self) -> ReplicaLoad:
        q = self.queue
        return ReplicaLoad(
            self.index, q.waiting, q.running_count, q.max_running, q.max_waiting, q.mean_service_s,
            self.prefill_tps, self.up,
        )  # fmt: skip

    def observe(self, result: Result) -> None:
        computed, seconds = result.facts.recomputed_tokens, result.timings.prefill_s
        if computed >= PREFILL_TPS_MIN_TOKENS and seconds > 0:
            tps = computed / seconds
            self.prefill_tps = tps if not self.prefill_tps else 0.8 * self.prefill_tps + 0.2 * tps


class ReplicaMoved(WorkerUnavailable):
    """A waiting request's replica went down while others are up: it is routed again (never sent to a client)."""


@dataclass
class ServedModel:
    spec: ModelSpec
    replicas: list[Replica]
    tokenizer: ChatTokenizer
    router: Router = field(default_factory=Router)
    # Tokenizing and template rendering run here, off the event loop. A `tokenizers` encode
    # releases the GIL, so with a few threads a short prompt does not wait for a long one.
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenizer")
    )
    # Compiling a client's schema can take seconds (llguidance releases the GIL): on threads of its
    # own, so heavy schemas hold up only other structured requests, never tokenizing.
    grammar_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=GRAMMAR_THREADS, thread_name_prefix="grammar")
    )
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def primary(self) -> Replica:
        """The replica whose worker answers for the model (limits, /health): the first one up, else the first."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        return next((r for r in self.replicas if r.up), self.replicas[0])

    @property
    def supervisor(self) -> WorkerSupervisor:
        return self.primary.supervisor

    @property
    def queue(self) -> RequestQueue:
        return self.primary.queue

    @property
    def client(self) -> WorkerClient:
        """The primary worker's client (a dead worker's until its replacement is up)."""
        return self.primary.client

    @property
    def process(self) -> Optional[WorkerProcess]:
        """The local worker process (None for a remote worker)."""
        return self.supervisor.process

    @property
    def restarts(self) -> int:
        return sum(r.supervisor.restarts for r in self.replicas)

    @property
    def worker_state(self) -> WorkerState:
        return self.supervisor.state

    def check_available(self) -> None:
        """Raise `WorkerUnavailable` when a new request should not queue (every worker stayed down)."""
        error: Optional[Exception] = None
        for replica in self.replicas:
            try:
                replica.supervisor.check_available()
                return
            except WorkerUnavailable as exc:
                error = error or exc
        assert error is not None
        raise error

    def route(self, prompt_tokens: list[int], namespace: str) -> Replica:
        """The replica for a request (proxy/routing.py); a model of one replica has no choice to make."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        hashes = block_hashes(prompt_tokens, namespace, self.router.index.block_tokens)
        decision = self.router.route([r.load() for r in self.replicas], hashes, len(prompt_tokens))
        return self.replicas[decision.replica]

    def begin_shutdown(self) -> None:
        """Refuse new requests, answer the waiting ones with a 503, restart nothing more."""
        for replica in self.replicas:
            failed = replica.queue.close(lambda: ShuttingDown("the server is shutting down", retry_after=5))
            if failed:
                log.info("shutting down: %d queued request(s) for %s answered with 503", failed, self.model_id)
            replica.supervisor.stop_restarting()

    def watch(self, replica: Replica) -> None:
        """Feed the router from `replica`'s worker, and move its waiting requests when it goes down."""
        supervisor = replica.supervisor
        supervisor.on_cache_events = lambda events: self.router.index.apply(replica.index, events)
        supervisor.on_down = lambda: self._replica_down(replica)
        supervisor.on_up = lambda: self.router.index.forget(replica.index)  # a new session: a reset follows

    def _replica_down(self, replica: Replica) -> None:
        self.router.index.forget(replica.index)
        if not any(r.up for r in self.replicas if r is not replica):
            return  # nowhere to go: they wait for this one to come back, as with one worker
        moved = replica.queue.fail_waiting(
            lambda: ReplicaMoved(f"replica {replica.label} of {self.model_id} went down", retry_after=1)
        )
        if moved:
            log.warning("replica %s of %s is down: %d waiting request(s) move to the others", replica.label, self.model_id, moved)

    async def in_grammar_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await _run_in(self.grammar_thread, fn, *args, **kwargs)

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await _run_in(self.tokenizer_thread, fn, *args, **kwargs)

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



async def _run_in(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))


async def open_served_model(
    specs: Union[ModelSpec, Sequence[ModelSpec]],
    config: ProxyConfig,
    context: zmq.asyncio.Context,
    endpoints: Union[str, Sequence[str]],
    policy: Optional[RoutePolicy] = None,
) -> ServedModel:
    """Start (or reach) the workers of one model (a spec per replica), handshake, load the tokenizer.

    `endpoints`: an ipc endpoint per spec, for the local ones (a remote spec names its own).
    """
    specs = [specs] if isinstance(specs, ModelSpec) else list(specs)
    endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    spec = specs[0]
    replicas = [
        Replica(i, WorkerSupervisor(s, config.worker, e, context, queue), queue)
        for i, (s, e) in enumerate(zip(specs, endpoints))
        for queue in [RequestQueue(config.max_queue)]  # max_running: from the worker's Hello, by the supervisor
    ]
    try:
        # On this (the main) thread: mlx_lm imports MLX, whose thread-local state
        # must not belong to an executor thread that exits during interpreter
        # shutdown (its destructor then aborts the process).
        tokenizer = ChatTokenizer.load(spec.path) if spec.path is not None else None
        served = ServedModel(spec=spec, replicas=replicas, tokenizer=tokenizer, router=Router(policy or RoutePolicy()))
        for replica in replicas:
            served.watch(replica)
        starts = [asyncio.ensure_future(r.supervisor.start()) for r in replicas]
        try:
            hellos = await asyncio.gather(*starts)
        except BaseException:
            # One replica could not start: the others' starts stop too (gather leaves them running).
            for start in starts:
                start.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            raise
        if tokenizer is None:
            served.tokenizer = ChatTokenizer.load(_tokenizer_path(spec, hellos[0].model_id))
        _check_same_model(spec, hellos)
    except BaseException:
        await asyncio.gather(*(r.supervisor.close() for r in replicas), return_exceptions=True)
        raise
    for replica, hello in zip(replicas, hellos):
        log.info(
            "worker for %s%s ready: pid %d, context %d, cache %s, batch %d, layers %s",
            spec.model_id,
            f" (replica {replica.label})" if len(replicas) > 1 else "",
            hello.pid,
            hello.context_limit,
            "on" if hello.cache_enabled else "off",
            replica.queue.max_running,
            ",".join(sorted(set(hello.layout.layer_kinds))),
        )
    return served


def _check_same_model(spec: ModelSpec, hellos: Sequence[Hello]) -> None:
    """Replicas of one name must serve one model: a request may go to any of them."""
    first = hellos[0]
    for hello in hellos[1:]:
        if (hello.model_id, hello.vocab_size, hello.context_limit) != (first.model_id, first.vocab_size, first.context_limit):
            raise WorkerStartError(
                f"the workers named {spec.model_id!r} do not serve one model: {first.model_id!r} "
                f"(vocabulary {first.vocab_size}, context {first.context_limit}) and {hello.model_id!r} "
                f"(vocabulary {hello.vocab_size}, context {hello.context_limit})"
            )


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
    await asyncio.gather(*(r.supervisor.close() for r in served.replicas), return_exceptions=True)
    for replica in served.replicas:
        if replica.supervisor.process is not None:
            log.info("worker for %s stopped (exit code %s)", served.model_id, replica.supervisor.process.returncode)
    # Joined, not left behind: no thread may still be exiting when Python finalizes.
    served.tokenizer_thread.shutdown(wait=True, cancel_futures=True)
    served.grammar_thread.shutdown(wait=True, cancel_futures=True)


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

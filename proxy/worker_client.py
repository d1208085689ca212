"""The proxy's end of one worker's socket.

A zmq DEALER connects to the worker's ROUTER. After the Connect/Hello
handshake one reader task owns receiving: it decodes every frame and hands
per-request messages to that request's `RequestChannel` (each part of a
TokenFrame, the Tokens of several running requests, on its own), keeps the
latest Stats, and notices silence. A watchdog task pings a quiet worker and declares
it dead after `heartbeat_timeout` seconds without a frame; whoever watches the
process (`proxy.supervisor`) calls `fail` when it exits. A dead worker fails
every in-flight request with `WorkerUnavailable`, after telling `on_failure`
(the supervisor, which holds the queue and restarts the worker).

One client is one incarnation of a worker: after a failure it is closed, and a
restarted (or reconnected) worker gets a new client with a fresh socket.

The link itself is watched too (a socket monitor). A worker admits one proxy at
a time and drops, unanswered, frames from a connection that did not handshake;
so a connection that drops after the handshake ends the session (whatever the
socket reconnects to would ignore us), and the client fails after a short
grace (a local worker's exit, noticed meanwhile, is the better reason). With
`ClientKeys` the socket is a CURVE client; a security handshake that fails
(wrong keys, or one side without CURVE) is a `WorkerLinkRefused`, at once, not
a handshake timeout. Connect is repeated every second until Hello: a worker
admits a new proxy once it sees the previous one's connection gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional, Union

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol.curve import ClientKeys

from protocol.codec import ProtocolError, decode, encode, frame_version
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    CacheEvents,
    Connect,
    Error,
    ErrorCode,
    Evict,
    Generate,
    Hello,
    Message,
    Ping,
    Progress,
    Result,
    Shutdown,
    Stats,
    TokenFrame,
    Tokens,
)
from proxy.errors import ApiError, WorkerUnavailable, from_worker_error

log = logging.getLogger("mlx_cache_proxy")

RequestMessage = Union[Progress, Tokens, Result]

CONNECT_RESEND_S = 1.0
DISCONNECT_GRACE_S = 1.0
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_LINK_EVENTS = _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED


class WorkerStartError(RuntimeError):
    """The worker could not be brought up (it exited, timed out, or refused us)."""


class WorkerVersionMismatch(WorkerStartError):
    """The worker speaks another protocol version."""


class WorkerLinkRefused(WorkerStartError):
    """The connection's security handshake failed: the keys do not match, or one side has none."""


def _refusal_reason(name: str, event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the worker for {name} refused this proxy's CURVE key (status {value}): "
            "is proxy.key among the worker's --curve-allowed-keys?"
        )
    return (
        f"the security handshake with the worker for {name} failed: is --worker-public-key that worker's "
        "worker.key, and do both sides use CURVE keys?"
    )


class RequestChannel:
    """The messages of one request, in order, as the reader task hands them over."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._inbox: asyncio.Queue[Union[Message, ApiError]] = asyncio.Queue()
        self.finished = False  # the last message (Result, Error, or a failure) has arrived

    def _put(self, item: Union[Message, ApiError]) -> None:
        if isinstance(item, (Result, Error, ApiError)):
            self.finished = True
        self._inbox.put_nowait(item)

    async def get(self, timeout: Optional[float] = None) -> Optional[RequestMessage]:
        """The next message; None after `timeout` seconds of silence.

        A worker's `Error` for this request, or the worker's death, is raised
        as the matching `ApiError`.
        """
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(item, ApiError):
            raise item
        if isinstance(item, Error):
            raise from_worker_error(item.code, item.message)
        return item  # type: ignore[return-value]


class WorkerClient:
    """Handshake, dispatch and liveness for one worker endpoint."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        context: zmq.asyncio.Context,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        on_failure: Optional[Callable[[str], None]] = None,
        keys: Optional[ClientKeys] = None,
    ) -> None:
        self.name = name
        self.on_failure = on_failure  # called once, when the worker first counts as dead
        self.on_cache_events: Optional[Callable[[CacheEvents], None]] = None  # the router's view of its pool
        self.endpoint = endpoint
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self._socket)
        self._monitor = self._socket.get_monitor_socket(_LINK_EVENTS)
        self._socket.connect(endpoint)
        self._channels: dict[str, RequestChannel] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.hello: Optional[Hello] = None
        self.stats: Optional[Stats] = None
        self.last_seen = time.monotonic()
        self.failure: Optional[str] = None  # why the worker counts as dead
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self.hello is not None and self.failure is None and not self._closed

    async def connect(self, timeout: float, exited: Optional[Awaitable[int]] = None) -> Hello:
        """Send Connect and wait for Hello; refuse another protocol version."""
        self._send(Connect())
        handshake = asyncio.ensure_future(self._await_hello())
        refusal = asyncio.ensure_future(self._await_refusal())
        resend = asyncio.ensure_future(self._resend_connect())
        waiters: set[asyncio.Future] = {handshake, refusal}
        exit_watch = asyncio.ensure_future(exited) if exited is not None else None
        if exit_watch is not None:
            waiters.add(exit_watch)
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if handshake in done:
                hello = handshake.result()
            elif refusal in done:
                raise WorkerLinkRefused(refusal.result())
            elif exit_watch is not None and exit_watch in done:
                raise WorkerStartError(
                    f"worker for {self.name} exited with code {exit_watch.result()} during start-up"
                )
            else:
                # A worker serving another proxy says nothing to this one (it answers strangers nothing).
                raise WorkerStartError(
                    f"worker for {self.name} at {self.endpoint} did not complete the handshake "
                    f"within {timeout:.0f}s: it is not up yet, or it is serving another proxy "
                    "(a worker serves one proxy at a time)"
                )
        finally:
            for task in (handshake, refusal, resend):  # never `exit_watch`: it is the supervisor's own task
                task.cancel()
        self.hello = hello
        self.last_seen = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"worker-reader-{self.name}"),
            asyncio.create_task(self._watchdog(), name=f"worker-watchdog-{self.name}"),
            asyncio.create_task(self._watch_link(), name=f"worker-link-{self.name}"),
        ]
        return hello

    async def _resend_connect(self) -> None:
        while True:
            await asyncio.sleep(CONNECT_RESEND_S)
            self._send(Connect())

    async def _link_event(self) -> tuple[int, int]:
        event = parse_monitor_message(await self._monitor.recv_multipart())
        return event["event"], event["value"]

    async def _await_refusal(self) -> str:
        """The reason of the first failed security handshake (before Hello)."""
        while True:
            event, value = await self._link_event()
            if event & _HANDSHAKE_FAILED:
                return _refusal_reason(self.name, event, value)

    async def _watch_link(self) -> None:
        """After Hello: a dropped or refused connection ends this session."""
        while True:
            try:
                event, value = await self._link_event()
            except zmq.ZMQError:
                return
            if event & _HANDSHAKE_FAILED:
                self.fail(_refusal_reason(self.name, event, value))
                return
            if event == zmq.EVENT_DISCONNECTED:
                await asyncio.sleep(DISCONNECT_GRACE_S)
                self.fail("the connection to the worker was lost")
                return

    async def _await_hello(self) -> Hello:
        while True:
            data = await self._socket.recv()
            try:
                message = decode(data)
            except ProtocolError as exc:
                version = frame_version(data)
                if version is not None and version != PROTOCOL_VERSION:
                    raise WorkerVersionMismatch(
                        f"worker for {self.name} speaks protocol version {version}, "
                        f"this proxy speaks {PROTOCOL_VERSION}; upgrade one of them"
                    ) from exc
                raise WorkerStartError(f"worker for {self.name} sent a bad frame: {exc}") from exc
            if isinstance(message, Error):
                if message.code is ErrorCode.VERSION_MISMATCH:
                    raise WorkerVersionMismatch(
                        f"worker for {self.name} refused protocol version {PROTOCOL_VERSION}: "
                        f"{message.message}"
                    )
                raise WorkerStartError(
                    f"worker for {self.name} failed to start: {message.code.value}: {message.message}"
                )
            if isinstance(message, Hello):
                if message.protocol_version != PROTOCOL_VERSION:
                    raise WorkerVersionMismatch(
                        f"worker for {self.name} speaks protocol version "
                        f"{message.protocol_version}, this proxy speaks {PROTOCOL_VERSION}"
                    )
                return message
            if isinstance(message, Stats):
                self.stats = message
            # Anything else before Hello is stale (a previous proxy's request); skip it.

    async def close(self, *, shutdown: bool) -> None:
        """Stop the reader; send Shutdown first when we own the worker."""
        if self._closed:
            return
        if shutdown and self.failure is None:
            try:
                await asyncio.wait_for(self._socket.send(encode(Shutdown())), 1.0)
            except (asyncio.TimeoutError, zmq.ZMQError):
                pass
        self._closed = True
        self.fail("the proxy is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def fail(self, reason: str) -> None:
        """Count the worker as dead and fail every in-flight request."""
        if self.failure is None:
            self.failure = reason
            if not self._closed:
                log.error("worker for %s is unavailable: %s", self.name, reason)
                if self.on_failure is not None:
                    # Before the requests hear of it, so the queue is held before a turn moves on.
                    self.on_failure(reason)
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            # Retry-After: a dead worker is restarted at once, and a retry waits for it in the queue.
            channel._put(WorkerUnavailable(f"the worker for {self.name} is unavailable: {reason}", retry_after=1))

    # ------------------------------------------------------------ requests

    def submit(self, generate: Generate) -> RequestChannel:
        """Send `generate`; its messages arrive on the returned channel."""
        if not self.alive:
            raise WorkerUnavailable(
                f"the worker for {self.name} is unavailable: {self.failure or 'not connected'}",
                retry_after=5,
            )
        channel = RequestChannel(generate.request_id)
        self._channels[generate.request_id] = channel
        self._send(generate)
        return channel

    def abort(self, request_id: str) -> None:
        if self.alive:
            self._send(Abort(request_id=request_id))

    def evict(self, target_bytes: int) -> None:
        if self.alive:
            self._send(Evict(target_bytes=target_bytes))

    def ping(self) -> None:
        if self.alive:
            self._send(Ping())

    def _send(self, message: Message) -> None:
        # A DEALER send does not block below the high-water mark; a failed one
        # surfaces through the watchdog as silence.
        future = self._socket.send(encode(message))
        future.add_done_callback(_log_send_failure)

    # ------------------------------------------------------------ background

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._socket.recv()
            except zmq.ZMQError as exc:
                self.fail(f"socket error: {exc}")
                return
            self.last_seen = time.monotonic()
            try:
                message = decode(data)
            except ProtocolError as exc:
                log.error("worker for %s sent an undecodable frame: %s", self.name, exc)
                continue
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Stats):
            self.stats = message
            return
        if isinstance(message, Hello):
            self.hello = message
            return
        if isinstance(message, CacheEvents):
            if self.on_cache_events is not None:
                self.on_cache_events(message)
            return
        if isinstance(message, TokenFrame):
            for part in message.parts:
                self._hand_over(part)
            return
        self._hand_over(message)

    def _hand_over(self, message: Message) -> None:
        """Give a per-request message to its request's channel; drop it if that request is gone."""
        request_id = getattr(message, "request_id", None)
        if request_id is None:
            if isinstance(message, Error):
                log.error("worker for %s reported: %s: %s", self.name, message.code.value, message.message)
            else:
                log.warning("unexpected %s from worker for %s", message.KIND, self.name)
            return
        channel = self._channels.get(request_id)
        if channel is None:
            log.debug("dropping %s for finished request %s", message.KIND, request_id)
            return
        channel._put(message)
        if channel.finished:
            del self._channels[request_id]

    async def _watchdog(self) -> None:
        while self.failure is None:
            await asyncio.sleep(self._heartbeat_interval)
            silence = time.monotonic() - self.last_seen
            if silence > self._heartbeat_timeout:
                self.fail(f"no message for {silence:.0f}s (heartbeat timeout)")
                return
            if silence > self._heartbeat_interval:
                self.ping()


def _log_send_failure(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.error("sending to a worker failed: %s", exc)

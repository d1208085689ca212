"""The worker's IO thread: the only code that touches the ZeroMQ socket.

It binds a ROUTER socket, decodes what the proxy sends, answers the handshake,
Ping and the heartbeat itself, and hands model work (Generate, Evict, Shutdown)
to the model thread through `inbox`. Whatever the model thread wants to send goes
through an `Outbox`, whose pipe wakes the poll so tokens leave at once.

One proxy at a time is the worker's peer: the first that completes the
Connect/Hello handshake. Another Connect is refused (logged, not answered)
while that peer's connection lasts. Whether it does is asked of the socket
itself: with ROUTER_MANDATORY a send to a connection that has gone fails, so
the heartbeat, and a probe at each refused Connect, notice a peer that left
(ZMTP heartbeats close a connection whose far end went silent without closing
it). A restarted proxy, which repeats its Connect, is admitted within a second.
(ROUTER_NOTIFY would say so directly, but it is a draft option pyzmq's libzmq
is built without.) Every other frame from a peer that did not
complete the handshake is dropped unanswered (the log line is rate-limited):
a stranger on the endpoint gets nothing, and can neither run, stop nor steal a
request. With `ServerKeys` the socket is a CURVE server and only listed proxy
keys get a connection at all.

Abort is settled here, under the `RequestBook` lock: a queued request is taken
out of the book and answered at once with an aborted Result (it never runs);
a running one (several run at once) gets its abort event set and the model
thread finishes it with FinishReason.ABORT between two steps. An Abort for an id the book does not know (finished long
ago, never sent) is ignored: its last message has already gone out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import msgpack
import zmq

from protocol.codec import ProtocolError, decode, encode, frame_version
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    CacheFacts,
    Connect,
    Error,
    ErrorCode,
    Evict,
    FinishReason,
    Generate,
    Hello,
    Message,
    Ping,
    PoolStats,
    RestoreKind,
    Result,
    Shutdown,
    Stats,
    Timings,
)
from protocol.curve import ServerKeys, start_authenticator
from protocol.log_throttle import LogThrottle
from worker.memory import memory_stats

log = logging.getLogger("mlx_cache_proxy.worker")

PARENT_CHECK_S = 1.0
# After a stop is requested, how long the model thread may take to wind down
# before the IO thread ends the process itself (a hung model must not leave an orphan).
STOP_GRACE_S = 15.0
SHUTDOWN_LINGER_MS = 2000
# A peer whose connection answers no ZMTP ping this long is dropped (a machine gone without closing).
PEER_TIMEOUT_S = 20.0
DROPPED_LOG_INTERVAL_S = 10.0


class StopFlag:
    """Set by a signal handler or by the IO thread; read by both threads.

    A plain attribute, not a threading.Event: a signal handler must not take a
    lock the interrupted main thread may be holding.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
            self.requested = True


class RequestBook:
    """Requests handed to the model thread, each queued or running, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, Generate] = {}
        self._running: dict[str, threading.Event] = {}

    def enqueue(self, request: Generate) -> bool:
        """False when a request with this id is already queued or running."""
        with self._lock:
            rid = request.request_id
            if rid in self._queued or rid in self._running:
                return False
            self._queued[rid] = request
            return True

    def start(self, request_id: str) -> Optional[threading.Event]:
        """Mark a queued request running; None if it was aborted while queued."""
        with self._lock:
            if self._queued.pop(request_id, None) is None:
                return None
            abort_event = threading.Event()
            self._running[request_id] = abort_event
            return abort_event

    def finish(self, request_id: str) -> None:
        with self._lock:
            self._running.pop(request_id, None)

    def abort(self, request_id: str) -> Optional[Generate]:
        """Abort one request: the queued request it removed, or None (running, or unknown)."""
        with self._lock:
            event = self._running.get(request_id)
            if event is not None:
                event.set()
                return None
            return self._queued.pop(request_id, None)

    def abort_all(self) -> list[Generate]:
        """Abort the running requests and remove every queued one (for Shutdown)."""
        with self._lock:
            for event in self._running.values():
                event.set()
            removed, self._queued = list(self._queued.values()), {}
            return removed

    def is_running(self, request_id: str) -> bool:
        return request_id in self._running

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)


@dataclass(frozen=True)
class Ready:
    """The engine has loaded: the Hello to answer Connect with (memory is filled in at send time)."""

    hello: Hello


@dataclass(frozen=True)
class Close:
    """Close the socket and end the IO thread; `linger_ms` lets queued frames leave first."""

    linger_ms: int


Outgoing = Union[Message, Ready, Close]


class Outbox:
    """A queue into the IO thread plus a pipe that wakes its poll."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, item: Outgoing) -> None:
        self._queue.put(item)
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so a wake-up is already pending

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> list[Outgoing]:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class ParentWatch:
    """Is the process that started us still there? (Checked by polling: no signal is sent on its death.)"""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._was_our_parent = os.getppid() == pid

    def gone(self) -> bool:
        if self._was_our_parent and os.getppid() != self.pid:
            return True  # we were re-parented
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, owned by someone else
        return _is_zombie(self.pid)


def _is_zombie(pid: int) -> bool:
    # A dead process nobody has reaped still answers kill(pid, 0).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def remove_stale_ipc(endpoint: str) -> None:
    """Remove the socket file of an ipc:// endpoint nobody listens on any more."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise RuntimeError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"{endpoint} is in use by another process")


def aborted_while_queued(request: Generate, pool: PoolStats) -> Result:
    """The answer to an Abort of a request that never started."""
    log.info("request %s: aborted while queued; prompt %d", request.request_id, len(request.prompt_tokens))
    facts = CacheFacts(
        prompt_tokens=len(request.prompt_tokens),
        cached_tokens=0,
        recomputed_tokens=0,
        restore_point=0,
        restore_kind=RestoreKind.NONE,
        pool=pool,
    )
    return Result(
        request_id=request.request_id,
        finish_reason=FinishReason.ABORT,
        generated_tokens=0,
        facts=facts,
        timings=Timings(),
        memory=memory_stats(pool.bytes),
    )


class RateLimitedLog:
    """A warning at most once per `interval` seconds, counting the ones left out (strangers may flood)."""

    def __init__(self, interval: float = DROPPED_LOG_INTERVAL_S) -> None:
        self._throttle = LogThrottle(interval)

    def warning(self, text: str, *args: Any) -> None:
        count = self._throttle.count()
        if count:
            log.warning(text + " (%d such frame(s) since the last report)", *args, count)


def _frame_kind(payload: bytes) -> Optional[str]:
    """Best effort: the kind of a frame that did not decode (another version's Connect, say)."""
    try:
        kind = msgpack.unpackb(payload, raw=False)["kind"]
        return kind if isinstance(kind, str) else None
    except Exception:
        return None


def _request_id_of(payload: bytes) -> Optional[str]:
    """Best effort: the request id inside a frame that did not decode, so its request still ends."""
    try:
        frame = msgpack.unpackb(payload, raw=False)
        rid = frame["body"]["request_id"]
        return rid if isinstance(rid, str) else None
    except Exception:
        return None


class IOLoop(threading.Thread):
    """Owns the ROUTER socket; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        inbox: "queue.Queue[Message]",
        outbox: Outbox,
        book: RequestBook,
        stop: StopFlag,
        heartbeat_s: float,
        parent_pid: Optional[int] = None,
        keys: Optional[ServerKeys] = None,
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.endpoint = endpoint
        self.inbox = inbox
        self.outbox = outbox
        self.book = book
        self.stop = stop
        self.heartbeat_s = heartbeat_s
        self.parent = ParentWatch(parent_pid) if parent_pid else None
        self.keys = keys
        # Written by the model thread (a reference swap), read here for Stats.
        self.pool_stats = PoolStats()
        self.sessions = 0  # proxies admitted so far (written here, read by the model thread)
        self.bound = threading.Event()
        self.bind_error: Optional[BaseException] = None
        self.failed = False
        self._hello: Optional[Hello] = None
        self._peer: Optional[list[bytes]] = None  # routing envelope of the connected proxy
        self._waiting_for_hello: list[list[bytes]] = []
        self._socket: Any = None
        self._stop_seen_at: Optional[float] = None
        self.stop_grace_s = STOP_GRACE_S  # the model thread extends it while it saves the pool to disk
        self._shutting_down = False  # after Shutdown nothing new is started
        # Set once the engine has loaded: compiles a request's grammar before the model thread sees it.
        self.compile_ahead: Optional[Callable[[str], None]] = None
        self._dropped = RateLimitedLog()
        self._refused = RateLimitedLog()

    # ----------------------------------------------------------------- thread body

    def run(self) -> None:
        context = zmq.Context()
        auth = None
        try:
            if self.keys is not None:
                auth = start_authenticator(context, self.keys)
            self._socket = self._bind(context)
        except BaseException as exc:
            self.bind_error = exc
            self.bound.set()
            if auth is not None:
                auth.stop()
            context.term()
            return
        self.bound.set()
        linger_ms = 0
        try:
            linger_ms = self._loop()
        except Exception:
            log.exception("IO loop failed")
            self.failed = True
            self.stop.request("IO loop failed")
        finally:
            self._socket.close(linger=linger_ms)
            if auth is not None:
                auth.stop()
            context.term()
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except OSError:
                    pass

    def _bind(self, context: zmq.Context) -> Any:
        remove_stale_ipc(self.endpoint)
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer errors, not vanishes
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop part of a token stream
        # ZMTP pings: a connection whose far end stopped answering is closed, which frees the peer's place.
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(PEER_TIMEOUT_S * 1000))
        if self.keys is not None:
            self.keys.apply(sock)
        sock.bind(self.endpoint)
        return sock

    def _loop(self) -> int:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self.outbox.fileno(), zmq.POLLIN)
        now = time.monotonic()
        next_heartbeat, next_parent_check = now + self.heartbeat_s, now + PARENT_CHECK_S
        while True:
            timeout = max(0.0, min(next_heartbeat, next_parent_check) - time.monotonic())
            events = dict(poller.poll(timeout=min(timeout, 0.5) * 1000))
            if self._socket in events:
                self._receive_all()
            for item in self.outbox.drain():
                if isinstance(item, Close):
                    return item.linger_ms
                self._handle_outgoing(item)
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_s
                if self._hello is not None and self._peer is not None:
                    self._send(self._peer, self._stats())
            if now >= next_parent_check:
                next_parent_check = now + PARENT_CHECK_S
                if self.parent and self.parent.gone():
                    log.warning("parent process %d is gone; stopping", self.parent.pid)
                    self.stop.request(f"parent {self.parent.pid} exited")
            self._watch_stop(now)

    def _watch_stop(self, now: float) -> None:
        if not self.stop.requested:
            return
        if self._stop_seen_at is None:
            self._stop_seen_at = now
        elif now - self._stop_seen_at > self.stop_grace_s:
            log.error("model thread did not stop within %.0fs (%s); exiting", self.stop_grace_s, self.stop.reason)
            os._exit(1)

    # ----------------------------------------------------------------- inbound

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                log.warning("dropping a message without a routing envelope")
                continue
            envelope, payload = frames[:-1], frames[-1]
            try:
                self._handle_frame(envelope, payload)
            except Exception as exc:
                log.exception("failed to handle a message")
                if envelope == self._peer:
                    self._send(envelope, Error(ErrorCode.INTERNAL, f"worker IO error: {exc}", _request_id_of(payload)))

    def _handle_frame(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            message = decode(payload)
        except ProtocolError as exc:
            version = frame_version(payload)
            if version is not None and version != PROTOCOL_VERSION and _frame_kind(payload) == "connect":
                self._send(envelope, _version_mismatch(version))  # part of the handshake: say why
            elif envelope != self._peer:
                self._dropped.warning("dropped an undecodable frame from a peer that did not connect")
            else:
                log.warning("undecodable message: %s", exc)
                self._send(envelope, Error(ErrorCode.BAD_REQUEST, str(exc), _request_id_of(payload)))
            return
        if isinstance(message, Connect):
            self._on_connect(envelope, message)
        elif envelope != self._peer:
            self._dropped.warning("dropped %s from a peer that did not connect", message.KIND)
        elif isinstance(message, Ping):
            self._send(envelope, self._stats())
        elif self.stop.requested:
            return  # stopping: nothing more is started or answered
        elif isinstance(message, Generate):
            if self._shutting_down:
                self._send(envelope, Error(ErrorCode.BUSY, "the worker is shutting down", message.request_id))
            else:
                self._on_generate(envelope, message)
        elif isinstance(message, Abort):
            self._on_abort(message)
        elif isinstance(message, Shutdown):
            self._shutting_down = True
            for request in self.book.abort_all():
                self._send(envelope, aborted_while_queued(request, self.pool_stats))
            self.inbox.put(message)
        elif isinstance(message, Evict):
            self.inbox.put(message)
        else:
            self._send(envelope, Error(ErrorCode.BAD_REQUEST, f"a worker does not accept {message.KIND}"))

    def _on_connect(self, envelope: list[bytes], message: Connect) -> None:
        if message.protocol_version != PROTOCOL_VERSION:
            self._send(envelope, _version_mismatch(message.protocol_version))
            return
        if self._peer is not None and envelope != self._peer:
            if self._peer_reachable():
                self._refused.warning("refused a Connect: a proxy is connected already, and its connection is up")
                return
            self._on_peer_gone()
        if self._peer is None:
            log.info("a proxy connected")
            self.sessions += 1  # the model thread then tells the new proxy its whole prefix set
        self._peer = envelope
        if self._hello is None:
            if envelope not in self._waiting_for_hello:
                self._waiting_for_hello.append(envelope)  # answered once the engine has loaded
        else:
            self._send(envelope, self._current_hello())

    def _peer_reachable(self) -> bool:
        """Is the peer's connection still there? (A send to a vanished one fails at once.)"""
        try:
            self._socket.send_multipart([*self._peer, encode(self._stats())], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH
        return True

    def _on_peer_gone(self) -> None:
        envelope, self._peer = self._peer, None
        self._waiting_for_hello = [e for e in self._waiting_for_hello if e != envelope]
        aborted = self.book.abort_all()  # nobody is left to read them; the next proxy gets the batch
        running = self.book.running_ids()
        log.info(
            "the proxy disconnected; %d running request(s) aborted, %d queued dropped; the next proxy may connect",
            len(running), len(aborted),
        )  # fmt: skip

    def _on_generate(self, envelope: list[bytes], request: Generate) -> None:
        if not self.book.enqueue(request):
            self._send(envelope, Error(ErrorCode.BAD_REQUEST, "request id already in use", request.request_id))
            return
        grammar = request.sampling.grammar
        if grammar is not None and self.compile_ahead is not None:
            # Compiled on a thread of its own first: a schema that takes seconds stalls no running request.
            threading.Thread(target=self._compile_then_queue, args=(request, grammar.text), daemon=True,
                             name="grammar-compile").start()  # fmt: skip
        else:
            self.inbox.put(request)

    def _compile_then_queue(self, request: Generate, grammar: str) -> None:
        try:
            self.compile_ahead(grammar)
        finally:
            self.inbox.put(request)  # an Abort meanwhile took it out of the book: the model loop skips it

    def _on_abort(self, message: Abort) -> None:
        removed = self.book.abort(message.request_id)
        if removed is not None:
            self._send(self._peer, aborted_while_queued(removed, self.pool_stats))
        elif not self.book.is_running(message.request_id):
            log.debug("abort of unknown request %s ignored", message.request_id)

    # ----------------------------------------------------------------- outbound

    def _handle_outgoing(self, item: Outgoing) -> None:
        if isinstance(item, Ready):
            self._hello = item.hello
            waiting, self._waiting_for_hello = self._waiting_for_hello, []
            for envelope in waiting:
                self._send(envelope, self._current_hello())
        elif self._peer is None:
            log.debug("no proxy connected; dropping %s", item.KIND)
        else:
            self._send(self._peer, item)

    def _send(self, envelope: Optional[list[bytes]], message: Message) -> None:
        if self.stop.requested or envelope is None:
            return
        try:
            self._socket.send_multipart([*envelope, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH and envelope == self._peer:
                self._on_peer_gone()
            else:
                log.warning("could not send %s: %s", message.KIND, exc)

    def _current_hello(self) -> Hello:
        return dataclasses.replace(self._hello, memory=memory_stats(self.pool_stats.bytes))

    def _stats(self) -> Stats:
        pool = self.pool_stats
        return Stats(memory=memory_stats(pool.bytes), pool=pool, running_requests=self.book.running_ids())


def _version_mismatch(version: Any) -> Error:
    return Error(
        ErrorCode.VERSION_MISMATCH,
        f"this worker speaks protocol version {PROTOCOL_VERSION}, the proxy sent {version!r}",
    )

"""A cap on open client connections (`--max-connections`), so a flood cannot exhaust descriptors.

Without one, every accepted connection costs a file descriptor for as long as the client
keeps it; past the process's limit `accept()` fails with EMFILE, asyncio logs a traceback
for each failure, the log file cannot be reopened, the workers' sockets cannot be, and
`/health` hangs like everything else. `ConnectionGate` is the listening socket's protocol
factory, wrapped around aiohttp's:

- up to the cap, a connection is aiohttp's, untouched (a thin `GatedConnection` in front of
  aiohttp's handler counts it, and forwards every callback);
- over the cap, the connection's request head is read (bounded in time and size) and it is
  answered with a canned 503 JSON error with `Connection: close`, then closed: an answer
  the client's retry logic understands, and its descriptor back in milliseconds. Nothing of
  aiohttp runs for it, so a flood costs no tasks and no tracebacks;
- except that a `GET /health` or `/metrics` over the cap is handed to aiohttp all the same,
  up to `HEALTH_RESERVE` such connections at once, and closed after its one answer: the
  monitoring keeps working during a flood, which is when it matters;
- connections whose head is being read are themselves capped (`REFUSING_MAX`); past that
  the 503 goes out at once, unread (the client may then see a reset instead).

Refusals are counted and logged once per `REFUSAL_LOG_INTERVAL_S`, never one line each.
The cap's default comes from the open-file limit, after raising the soft limit to the
hard one (`raise_open_file_limit`), with room left for workers' sockets, log files,
upstream connections and the refusals themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any, Callable, Optional

from protocol.log_throttle import LogThrottle
from proxy.anthropic_api import is_anthropic_path
from proxy.auth import is_monitoring_path

log = logging.getLogger("mlx_cache_proxy")

HEALTH_RESERVE = 8  # connections over the cap kept for GET /health and /metrics
# Over-cap connections whose request head is being read, at once (asyncio accepts up to a backlog, 128, of
# connections before any of them is read); past that, the 503 goes out unread, at the risk of a reset.
REFUSING_MAX = 256
HEAD_TIMEOUT_S = 2.0  # an over-cap connection's request head must arrive within this, or it is refused unread
HEAD_LIMIT = 8192  # bytes of request head read from an over-cap connection
REFUSAL_LOG_INTERVAL_S = 10.0
DESCRIPTORS_KEPT = 256  # never given to client connections: workers, ZeroMQ, logs, model files, upstream
MAX_DEFAULT_CONNECTIONS = 4096  # more is no use in front of a few workers, and each one costs memory


# ----------------------------------------------------------------- the open-file limit


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard limit where allowed; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an infinite hard limit but refuses a soft one above OPEN_MAX (10240).
    for target in ((hard,) if hard != resource.RLIM_INFINITY else ()) + (10240,):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            continue
    return soft


def default_max_connections(open_file_limit: int) -> int:
    """Half of the descriptors, leaving at least DESCRIPTORS_KEPT and the reserves for the rest."""
    room = open_file_limit - DESCRIPTORS_KEPT - HEALTH_RESERVE - REFUSING_MAX
    return max(16, min(MAX_DEFAULT_CONNECTIONS, open_file_limit // 2, room))


def check_max_connections(max_connections: int, open_file_limit: int) -> None:
    """Refuses a cap that leaves too few descriptors for everything else."""
    needed = max_connections + HEALTH_RESERVE + REFUSING_MAX + DESCRIPTORS_KEPT
    if needed > open_file_limit:
        raise ValueError(
            f"--max-connections {max_connections} needs about {needed} file descriptors with the proxy's own, "
            f"over the open-file limit of {open_file_limit}: lower it or raise the limit (ulimit -n)"
        )


def connection_cap(requested: int) -> int:
    """The cap to use: `requested` (checked against the limit) or, for 0, the default; raises the limit first."""
    limit = raise_open_file_limit()
    if requested == 0:
        return default_max_connections(limit)
    check_max_connections(requested, limit)
    return requested


# ----------------------------------------------------------------- the gate


def refusal_response(path: Optional[str], limit: int) -> bytes:
    """The canned 503: Anthropic's error shape on its routes, OpenAI's elsewhere."""
    message = f"too many open connections (the cap is {limit}, --max-connections); try again shortly"
    if path is not None and is_anthropic_path(path):
        body: dict[str, Any] = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    else:
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": "too_many_connections"}}
    data = json.dumps(body).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def request_path(head: bytes) -> Optional[str]:
    """The path of a request line `METHOD PATH HTTP/x` (no query); None if it is not one."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    return parts[1].split("?", 1)[0]


def is_monitoring_request(head: bytes) -> bool:
    method = head.split(b" ", 1)[0]
    path = request_path(head)
    return method in (b"GET", b"HEAD") and path is not None and is_monitoring_path(path)


class ConnectionGate:
    """The protocol factory of the listening socket: aiohttp's handlers, up to `limit` at once."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.factory = factory
        self.limit = limit
        self.open = 0  # connections given to aiohttp under the cap
        self.monitoring = 0  # health/metrics connections given to aiohttp over the cap
        self.refusing = 0  # over-cap connections being read and answered
        self.refused_total = 0
        self._refused_unlogged = 0
        self._last_log = -float("inf")
        self._flush: Optional[asyncio.TimerHandle] = None
        self._clock = clock

    def __call__(self) -> asyncio.Protocol:
        return GatedConnection(self)

    def note_refused(self) -> None:
        """Counts a refusal; the count is logged at most once per REFUSAL_LOG_INTERVAL_S (the first at once)."""
        self.refused_total += 1
        self._refused_unlogged += 1
        wait = self._last_log + REFUSAL_LOG_INTERVAL_S - self._clock()
        if wait <= 0:
            self.flush_log()
        elif self._flush is None:  # the last refusals of a burst are logged too, one interval on
            self._flush = asyncio.get_running_loop().call_later(wait, self.flush_log)

    def flush_log(self) -> None:
        self._flush = None
        if self._refused_unlogged:
            log.warning("refused %d connection(s) over the cap of %d open connections (--max-connections) "
                        "since %s", self._refused_unlogged, self.limit,
                        "the last count" if self._last_log > -float("inf") else "start-up")
            self._refused_unlogged = 0
            self._last_log = self._clock()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self.flush_log()


ADMITTED, READING_HEAD, REFUSED, MONITORING = "admitted", "reading_head", "refused", "monitoring"


class GatedConnection(asyncio.Protocol):
    """One client connection: aiohttp's handler behind it once admitted, else a refusal."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate
        self.state = ""
        self.inner: Optional[asyncio.Protocol] = None
        self.transport: Optional[asyncio.Transport] = None
        self.head = b""
        self._timer: Optional[asyncio.TimerHandle] = None
        self._refusing_slot = False  # counted in gate.refusing until connection_lost or the hand-over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        gate = self.gate
        if gate.open < gate.limit:
            gate.open += 1
            self.state = ADMITTED
            self._hand_over(b"")
        elif gate.refusing < REFUSING_MAX:
            gate.refusing += 1
            self._refusing_slot = True
            self.state = READING_HEAD
            self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._refuse)
        else:
            self.state = READING_HEAD
            self._refuse()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        elif self.state == READING_HEAD:
            self.head += data
            if b"\r\n\r\n" in self.head or len(self.head) >= HEAD_LIMIT:
                self._decide()

    def eof_received(self) -> Optional[bool]:
        if self.inner is not None:
            return self.inner.eof_received()
        if self.state == READING_HEAD:
            self._decide()
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        gate = self.gate
        if self.state == ADMITTED:
            gate.open -= 1
        elif self.state == MONITORING:
            gate.monitoring -= 1
        if self._refusing_slot:
            gate.refusing -= 1
        self.state = "closed"
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def _decide(self) -> None:
        gate = self.gate
        if is_monitoring_request(self.head) and gate.monitoring < HEALTH_RESERVE:
            self._stop_timer()
            gate.refusing -= 1
            self._refusing_slot = False
            gate.monitoring += 1
            self.state = MONITORING
            self._hand_over(self.head)
            close_after_answer = getattr(self.inner, "close", None)  # aiohttp: close once this request is done
            if close_after_answer is not None:
                close_after_answer()
        else:
            self._refuse()

    def _refuse(self) -> None:
        if self.state != READING_HEAD or self.transport is None:
            return
        self.state = REFUSED  # still counted in gate.refusing until connection_lost
        self.gate.note_refused()
        self.transport.write(refusal_response(request_path(self.head), self.gate.limit))
        self.transport.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, head: bytes) -> None:
        assert self.transport is not None
        self.inner = self.gate.factory()
        self.inner.connection_made(self.transport)
        if head:
            self.inner.data_received(head)


# ----------------------------------------------------------------- accept() errors


class AcceptErrorFilter:
    """An asyncio exception handler that logs accept() failures (EMFILE...) once per interval, without traceback.

    The cap keeps descriptors from running out through client connections, but something else
    (a leak, a low hard limit) still could; then asyncio would report every failed accept with a
    full traceback. Everything else goes to the handler that was there before.
    """

    def __init__(self, previous: Optional[Callable[[asyncio.AbstractEventLoop, dict], None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.previous = previous
        self._throttle = LogThrottle(REFUSAL_LOG_INTERVAL_S, clock)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "out of system resource" not in str(context.get("message", "")):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        count = self._throttle.count()
        if count:
            log.error("accept() failing: %s (%d time(s) in the last %.0f s; asyncio retries each second)",
                      context.get("exception"), count, REFUSAL_LOG_INTERVAL_S)

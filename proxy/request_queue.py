"""One FIFO admission queue per worker.

A worker runs up to `max_running` requests at once (its Hello's `max_batch`,
applied by the supervisor with `set_max_running`; 1 means one at a time). The
queue hands out turns in arrival order, and a turn comes free only when its
request has finished with the worker (its last message arrived, not merely its
last byte sent to the client). At most `max_waiting` requests wait; one more is
refused at once with `QueueFull`, so a client gets a 429 rather than a long
silent wait.

While the worker is down (dead, hung, being restarted) the queue is *held*: no
turn is handed out, so nothing queued is sent to a dead worker; `resume`
hands turns out again. `fail_waiting` answers waiting requests with an error
instead (the worker stayed down too long), and `close` does that for good (the
proxy is shutting down).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from enum import Enum
from typing import Callable, Optional

from proxy.errors import ApiError, QueueFull

ErrorFactory = Callable[[], ApiError]


class TicketState(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"  # released, or failed while waiting


class Ticket:
    """One request's place in a `RequestQueue`."""

    def __init__(self, queue: RequestQueue) -> None:
        self._queue = queue
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state = TicketState.WAITING
        self.entered_at = time.monotonic()
        self.started_at: Optional[float] = None
        self.error: Optional[ApiError] = None  # why the request will never get the turn

    async def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for this ticket's turn; False if `timeout` seconds passed first.

        Raises the ticket's error when the queue gave up on it while it waited.
        """
        if self.error is not None:
            raise self.error
        if self.state is TicketState.DONE:
            raise RuntimeError("ticket already released")
        try:
            await asyncio.wait_for(asyncio.shield(self._turn), timeout)
        except asyncio.TimeoutError:
            return False
        if self.error is not None:
            raise self.error
        return True

    @property
    def position(self) -> int:
        """Its place in line: 0 once running; a waiting ticket is 1 + the requests waiting ahead of it.

        The running requests are not counted: whichever finishes first frees the turn for place 1.
        """
        return self._queue._position(self)

    def release(self) -> None:
        """Leave the queue (waiting) or hand the turn on (running). Idempotent."""
        self._queue._release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _start(self) -> None:
        self.state = TicketState.RUNNING
        self.started_at = time.monotonic()
        if not self._turn.done():
            self._turn.set_result(None)

    def _fail(self, error: ApiError) -> None:
        self.state = TicketState.DONE
        self.error = error
        if not self._turn.done():
            self._turn.set_result(None)  # wakes the waiter, which raises `error`


class RequestQueue:
    """A FIFO where up to `max_running` requests run and at most `max_waiting` wait."""

    def __init__(self, max_waiting: int, max_running: int = 1) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.max_waiting = max_waiting
        self.max_running = max_running
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._mean_service_s = 1.0  # moving average of how long a turn lasts
        self._held = False  # the worker is down: hand out no turn until `resume`
        self._refusal: Optional[ErrorFactory] = None  # closed: what every new request gets

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        """Requests holding a turn: in flight at the worker."""
        return len(self._running)

    @property
    def mean_service_s(self) -> float:
        """How long a turn lasts, on average (a moving average)."""
        return self._mean_service_s

    @property
    def held(self) -> bool:
        return self._held

    def enter(self) -> Ticket:
        """A ticket for a new request; raises `QueueFull` when the queue is full.

        A closed queue raises its closing error instead.
        """
        if self._refusal is not None:
            raise self._refusal()
        runs_now = self._turn_free() and not self._waiting
        if not runs_now and len(self._waiting) >= self.max_waiting:
            raise QueueFull(
                f"the queue for this model is full ({self.max_waiting} waiting); retry later",
                retry_after=self.retry_after(),
            )
        ticket = Ticket(self)
        if runs_now:
            self._running.append(ticket)
            ticket._start()
        else:
            self._waiting.append(ticket)
        return ticket

    def set_max_running(self, max_running: int) -> None:
        """Run up to `max_running` requests at once from now on (the worker's Hello says how many).

        Raising it hands out the new turns at once; lowering it lets the running requests run on
        and hands out no turn until fewer than `max_running` hold one.
        """
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.max_running = max_running
        self._hand_on()

    def retry_after(self) -> int:
        """Seconds until a turn is likely free for a new request, for the Retry-After header.

        `max_running` turns come free per mean turn length, so the waiting line drains that much faster.
        """
        turns_ahead = len(self._waiting) + 1
        return max(1, math.ceil(self._mean_service_s * turns_ahead / self.max_running))

    # ------------------------------------------------------------ worker down / shutting down

    def hold(self) -> None:
        """Stop handing out turns (the worker is down); waiting requests keep their places."""
        self._held = True

    def resume(self) -> None:
        """Hand out turns again (the worker is back), up to `max_running`."""
        self._held = False
        self._hand_on()

    def fail_waiting(self, error: ErrorFactory, entered_before: Optional[float] = None) -> int:
        """Answer waiting requests (those that entered before `entered_before`, or all) with an error."""
        failed = [t for t in self._waiting if entered_before is None or t.entered_at <= entered_before]
        for ticket in failed:
            self._waiting.remove(ticket)
            ticket._fail(error())
        return len(failed)

    def close(self, error: ErrorFactory) -> int:
        """Fail every waiting request and refuse new ones with `error`; the running ones run on."""
        self._refusal = error
        return self.fail_waiting(error)

    # ------------------------------------------------------------ internals

    def _turn_free(self) -> bool:
        return not self._held and len(self._running) < self.max_running

    def _position(self, ticket: Ticket) -> int:
        if ticket.state is not TicketState.WAITING:
            return 0
        return self._waiting.index(ticket) + 1

    def _release(self, ticket: Ticket) -> None:
        if ticket.state is TicketState.DONE:
            return
        if ticket.state is TicketState.WAITING:
            self._waiting.remove(ticket)
            ticket.state = TicketState.DONE
            return
        ticket.state = TicketState.DONE
        if ticket.started_at is not None:
            took = time.monotonic() - ticket.started_at
            self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * took
        if ticket in self._running:
            self._running.remove(ticket)
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiting and self._turn_free():
            nxt = self._waiting.popleft()
            self._running.append(nxt)
            nxt._start()

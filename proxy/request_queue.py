"""One serialized FIFO queue per worker.

A worker runs one request at a time; its queue hands out the turn in arrival
order, and only when the previous request has finished with the worker (its
last message arrived, not merely its last byte sent to the client). At most
`max_waiting` requests wait; one more is refused at once with `QueueFull`, so a
client gets a 429 rather than a long silent wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from enum import Enum
from typing import Optional

from proxy.errors import QueueFull


class TicketState(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class Ticket:
    """One request's place in a `RequestQueue`."""

    def __init__(self, queue: RequestQueue) -> None:
        self._queue = queue
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state = TicketState.WAITING
        self.started_at: Optional[float] = None

    async def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for this ticket's turn; False if `timeout` seconds passed first."""
        if self.state is TicketState.DONE:
            raise RuntimeError("ticket already released")
        try:
            await asyncio.wait_for(asyncio.shield(self._turn), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @property
    def position(self) -> int:
        """Requests ahead of this one (0: running or next)."""
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


class RequestQueue:
    """A FIFO where one request runs and at most `max_waiting` wait."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self._waiting: deque[Ticket] = deque()
        self._running: Optional[Ticket] = None
        self._mean_service_s = 1.0  # moving average of how long a turn lasts

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._running is not None

    def enter(self) -> Ticket:
        """A ticket for a new request; raises `QueueFull` when the queue is full."""
        if self._running is not None and len(self._waiting) >= self.max_waiting:
            raise QueueFull(
                f"the queue for this model is full ({self.max_waiting} waiting); retry later",
                retry_after=self.retry_after(),
            )
        ticket = Ticket(self)
        if self._running is None:
            self._running = ticket
            ticket._start()
        else:
            self._waiting.append(ticket)
        return ticket

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, for the Retry-After header."""
        return max(1, math.ceil(self._mean_service_s * (len(self._waiting) + 1)))

    def _position(self, ticket: Ticket) -> int:
        if ticket.state is not TicketState.WAITING:
            return 0
        return self._waiting.index(ticket) + (1 if self._running is not None else 0)

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
        if self._running is ticket:
            self._running = None
            if self._waiting:
                nxt = self._waiting.popleft()
                self._running = nxt
                nxt._start()

"""When to log events that may come in floods (strangers' frames, refused keys, failed accepts).

Shared by the worker and the proxy; imports nothing of either.
"""

from __future__ import annotations

import time
from typing import Callable


class LogThrottle:
    """Counts events and says when to report them: the first at once, then at most once per `interval` seconds."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -float("inf")
        self._unreported = 0

    def count(self) -> int:
        """Count one event; the events since the last report (this one included) if one is due now, else 0."""
        self._unreported += 1
        now = self._clock()
        if now < self._next:
            return 0
        reported, self._unreported = self._unreported, 0
        self._next = now + self.interval
        return reported

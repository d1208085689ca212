"""One log line per request, on logger "mlx_cache_proxy", when the worker is done with it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from protocol.messages import CacheFacts

log = logging.getLogger("mlx_cache_proxy")


@dataclass
class RequestRecord:
    request_id: str
    model: str
    prompt_tokens: int
    arrived: float = field(default_factory=time.monotonic)
    started: Optional[float] = None  # the queue gave it the turn
    first_token: Optional[float] = None
    finished: Optional[float] = None
    facts: Optional[CacheFacts] = None
    generated_tokens: int = 0
    status: str = "ok"

    def line(self) -> str:
        end = self.finished or time.monotonic()
        facts = self.facts
        parts = [
            f"request {self.request_id}",
            f"model={self.model}",
            f"status={self.status}",
            f"prompt={self.prompt_tokens}",
            f"cached={facts.cached_tokens if facts else '-'}",
            f"recomputed={facts.recomputed_tokens if facts else '-'}",
            f"generated={self.generated_tokens}",
            f"restore={facts.restore_point}/{facts.restore_kind.value}" if facts else "restore=-",
            f"queue={_ms(self.arrived, self.started)}",
            f"ttft={_ms(self.arrived, self.first_token)}",
            f"total={_ms(self.arrived, end)}",
        ]
        return " ".join(parts)

    def emit(self) -> None:
        if self.finished is None:
            self.finished = time.monotonic()
        level = logging.INFO if self.status in ("ok", "stop_string", "client_gone") else logging.WARNING
        log.log(level, self.line())


def _ms(start: float, end: Optional[float]) -> str:
    return "-" if end is None else f"{(end - start) * 1000:.0f}ms"

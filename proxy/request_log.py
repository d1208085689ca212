"""One log line per request, on logger "mlx_cache_proxy", when the worker is done with it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from protocol.messages import CacheFacts, Timings

log = logging.getLogger("mlx_cache_proxy")


@dataclass
class RequestRecord:
    request_id: str
    model: str  # as the client named it
    prompt_tokens: int
    model_key: str = ""  # the served model's id, for metrics labels
    arrived: float = field(default_factory=time.monotonic)
    started: Optional[float] = None  # the queue gave it the turn
    first_token: Optional[float] = None
    finished: Optional[float] = None
    facts: Optional[CacheFacts] = None
    timings: Optional[Timings] = None  # the worker's, from its Result
    generated_tokens: int = 0
    status: str = "ok"
    http_status: int = 200
    error_code: Optional[str] = None
    finish_reason: str = ""

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
            f"batch={self.timings.batch_size_max if self.timings else '-'}",
            f"queue={_ms(self.arrived, self.started)}",
            f"ttft={_ms(self.arrived, self.first_token)}",
            f"total={_ms(self.arrived, end)}",
        ]
        return " ".join(parts)

    def seconds(self, end: Optional[float]) -> Optional[float]:
        return None if end is None else end - self.arrived

    def fields(self) -> dict:
        """The same figures as the line, for JSON logs."""
        facts = self.facts
        return {
            "request_id": self.request_id,
            "model": self.model,
            "status": self.status,
            "http_status": self.http_status,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": facts.cached_tokens if facts else None,
            "recomputed_tokens": facts.recomputed_tokens if facts else None,
            "generated_tokens": self.generated_tokens,
            "restore_point": facts.restore_point if facts else None,
            "restore_kind": facts.restore_kind.value if facts else None,
            "restored_from_disk": facts.restored_from_disk if facts else None,
            "batch_size_max": self.timings.batch_size_max if self.timings else None,
            "queue_s": self.seconds(self.started),
            "ttft_s": self.seconds(self.first_token),
            "total_s": self.seconds(self.finished),
        }

    def emit(self) -> None:
        if self.finished is None:
            self.finished = time.monotonic()
        level = logging.INFO if self.status in ("ok", "stop_string", "client_gone") else logging.WARNING
        log.log(level, self.line(), extra=self.fields())


def _ms(start: float, end: Optional[float]) -> str:
    return "-" if end is None else f"{(end - start) * 1000:.0f}ms"

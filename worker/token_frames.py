"""Generated tokens leave in small batches: several requests' tokens in one frame.

A request's first token leaves at once (it is its TTFT); after that, what the
running requests generated over FLUSH_S goes out together, as one `TokenFrame`
(a lone request's as a plain `Tokens`). A model at 20-50 tokens/s still
streams every token; a fast one, or a batch of eight, sends a frame per few
steps instead of a message per token per request, which would cost the worker,
the proxy and the client more than the decode itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from protocol.messages import CacheFacts, Message, TokenFrame, TokenLogprob, Tokens

FLUSH_S = 0.02


@dataclass
class _Pending:
    emit: Callable[[Message], None]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    facts: Optional[CacheFacts] = None


class TokenFrames:
    def __init__(self, flush_s: float = FLUSH_S):
        self.flush_s = flush_s
        self._pending: dict[str, _Pending] = {}
        self._last_flush = 0.0

    def add(self, request_id: str, token: int, logprobs: list[TokenLogprob], first_facts: Optional[CacheFacts],
            emit: Callable[[Message], None]) -> None:
        pending = self._pending.setdefault(request_id, _Pending(emit))
        pending.tokens.append(token)
        pending.logprobs.extend(logprobs)
        if first_facts is not None:
            pending.facts = first_facts
            self.flush()  # a first token is the request's TTFT: it leaves now, with whatever is pending

    def flush_due(self) -> None:
        if self._pending and time.perf_counter() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self, request_id: Optional[str] = None) -> None:
        """Send what is pending (of every request: a request's last tokens go before its Result)."""
        if request_id is not None and request_id not in self._pending:
            return
        pending, self._pending = self._pending, {}
        self._last_flush = time.perf_counter()
        by_emit: dict[int, list[tuple[Callable[[Message], None], Tokens]]] = {}
        for rid, p in pending.items():
            part = Tokens(request_id=rid, tokens=p.tokens, logprobs=p.logprobs, first_cache_facts=p.facts)
            by_emit.setdefault(id(p.emit), []).append((p.emit, part))
        for parts in by_emit.values():
            emit = parts[0][0]
            if len(parts) == 1:
                emit(parts[0][1])
            else:
                emit(TokenFrame(parts=[part for _, part in parts]))

"""Server-sent events, as OpenAI streams them: `data: {json}` lines, `data: [DONE]` last;
and as Anthropic streams them: named `event:` lines, no [DONE].

Comment lines (`: ...`) keep idle connections open while a request waits in
the queue or prefills. A write to a client that has gone raises `ClientGone`
(a `ConnectionError`), which the generation treats like a cancelled handler.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.errors import ApiError


class ClientGone(ConnectionError):
    """The client closed the connection while we were streaming to it."""


class EventStream:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
            },
        )
        self.closed = False

    async def open(self) -> None:
        await self.response.prepare(self._request)

    async def data(self, payload: dict[str, Any]) -> None:
        await self._write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n")

    async def event(self, name: str, payload: dict[str, Any]) -> None:
        await self._write(f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n")

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")

    async def error(self, error: ApiError) -> None:
        """An error event, then the end of the stream: never a hang."""
        await self.data(error.body())
        await self.done()

    async def done(self) -> None:
        if not self.closed:
            await self._write("data: [DONE]\n\n")
            await self.end()

    async def end(self) -> None:
        """The end of the stream, without OpenAI's [DONE]."""
        if not self.closed:
            self.closed = True
            try:
                await self.response.write_eof()
            except ConnectionError as exc:
                raise ClientGone(str(exc)) from exc

    async def _write(self, text: str) -> None:
        try:
            await self.response.write(text.encode("utf-8"))
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(str(exc)) from exc

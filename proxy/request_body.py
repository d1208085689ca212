"""The request body, read whole within `--body-timeout` before any handler runs.

A client may send its body as slowly as it likes (a byte every few seconds keeps every
per-read timeout happy), holding a connection and a handler for ever. So the body has one
deadline for all of it, counted from the end of the headers: the handlers' own
`request.read()` then returns what was read here. A body late past the deadline is a 408
in the route's error shape, and the connection is closed as soon as the answer is out,
rather than lingering while the client dribbles on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiohttp import web

from proxy.errors import ApiError, RequestTimeout

log = logging.getLogger("mlx_cache_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorResponder = Callable[[web.Request, ApiError], web.StreamResponse]


def body_deadline_middleware(
    timeout_s: float, error_response: ErrorResponder
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Reads the body within `timeout_s`; `error_response` gives the 408 the route's shape."""

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), timeout_s)
            except asyncio.TimeoutError:
                return await _answer_and_close(request, error_response(request, RequestTimeout(
                    f"the request body did not arrive within {timeout_s:g} s (--body-timeout)")))
        return await handler(request)

    return read_body_in_time


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    log.info("%s %s: request body not received within the body timeout; closing the connection",
             request.method, request.path)
    response.force_close()  # Connection: close
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # the rest of the body is not waited for
    return response

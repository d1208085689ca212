"""CORS for browser clients: `--cors-origin` (repeatable; `*` for any origin).

Two small pieces instead of the aiohttp-cors package, which wants every route registered
with it and is one more dependency for a few headers:

- `preflight_middleware` answers a preflight (`OPTIONS` with `Origin` and
  `Access-Control-Request-Method`) before the API-key check: a browser sends no credentials
  on a preflight, so one must never need a key.
- `add_cors_headers`, an `on_response_prepare` hook, puts `Access-Control-Allow-Origin` on
  every response to an allowed origin: the errors (a 401 the page should be able to read)
  and SSE streams too, whose headers leave before any middleware could see the response.

Keys travel in headers, never in cookies, so no `Allow-Credentials` is sent, and the
headers a preflight asks for are allowed as asked (the OpenAI and Anthropic browser SDKs
send their own `x-stainless-*` headers) on top of the ones named here.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable, Optional

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = ("authorization", "x-api-key", "content-type", "anthropic-version", "anthropic-beta")
EXPOSED_HEADERS = "Retry-After, X-Cache-Cached-Tokens, X-Cache-Restore"
MAX_AGE_S = 3600  # how long a browser may reuse a preflight's answer


class CorsPolicy:
    """Which origins may call the API from a browser."""

    def __init__(self, origins: Iterable[str]) -> None:
        given = [o.strip().rstrip("/") for o in origins]
        for origin in given:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"a CORS origin is '*' or a scheme and host like https://app.example, got {origin!r}")
        self.any = "*" in given
        self.origins = frozenset(o.lower() for o in given if o != "*")

    def allow_origin(self, origin: Optional[str]) -> Optional[str]:
        """The Access-Control-Allow-Origin value for a request from `origin`; None if it is not allowed."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin.lower() in self.origins else None


def preflight_middleware(policy: CorsPolicy) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def answer_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin")
        allowed = policy.allow_origin(origin)
        if allowed is None:
            return web.json_response(
                {"error": {"message": f"the origin {origin!r} is not allowed (--cors-origin)",
                           "type": "invalid_request_error", "param": None, "code": "cors_origin_not_allowed"}},
                status=403,
            )
        asked = [h.strip().lower() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
        headers = list(ALLOWED_HEADERS) + [h for h in asked if h and h not in ALLOWED_HEADERS]
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": allowed,
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ", ".join(headers),
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Vary": "Origin",
        })

    return answer_preflight


def response_hook(policy: CorsPolicy) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        allowed = policy.allow_origin(request.headers.get("Origin"))
        if allowed is None or "Access-Control-Allow-Origin" in response.headers:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if allowed != "*":
            response.headers.add("Vary", "Origin")

    return add_cors_headers


def install_cors(app: web.Application, origins: Iterable[str]) -> list:
    """Hook CORS into `app`; returns the middlewares to put first (none when no origin is configured)."""
    origins = list(origins)
    if not origins:
        return []
    policy = CorsPolicy(origins)
    app.on_response_prepare.append(response_hook(policy))
    return [preflight_middleware(policy)]

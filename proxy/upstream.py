"""Requests for models no local worker serves go, unchanged, to `--upstream`.

Method, path, query, body and the end-to-end headers pass through; the answer
streams back as it arrives (SSE included), undecoded, with its own status.
"""

from __future__ import annotations

import logging
from typing import Optional

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.errors import UpstreamError
from proxy.sse import ClientGone
from proxy.state import CONFIG

log = logging.getLogger("mlx_cache_proxy")

# RFC 9110 hop-by-hop headers, plus the ones aiohttp sets for the new connection.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip


def upstream_url(base: str, path_qs: str) -> URL:
    """`base` + the request's path; a base ending in /v1 does not double the /v1."""
    url = URL(base)
    base_path = url.path.rstrip("/")
    if base_path.endswith("/v1") and (path_qs == "/v1" or path_qs.startswith(("/v1/", "/v1?"))):
        path_qs = path_qs[3:]
    return URL(str(url.with_path("").with_query(None)).rstrip("/") + base_path + path_qs, encoded=True)


# With --api-key these carry the proxy's own key, which is not the upstream's to see.
_CLIENT_KEYS = frozenset(("authorization", "x-api-key"))


def forwarded_headers(headers, drop_keys: bool = False) -> dict[str, str]:
    dropped = _HOP_BY_HOP | _CLIENT_KEYS if drop_keys else _HOP_BY_HOP
    return {k: v for k, v in headers.items() if k.lower() not in dropped}


def new_session() -> aiohttp.ClientSession:
    # No decompression: bytes and Content-Encoding pass through together.
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )


async def forward(
    request: web.Request,
    body: bytes,
    session: aiohttp.ClientSession,
    base: str,
) -> web.StreamResponse:
    url = upstream_url(base, request.raw_path)
    try:
        upstream = await session.request(
            request.method, url, data=body, headers=forwarded_headers(request.headers, drop_keys=bool(request.app[CONFIG].api_keys)),
            allow_redirects=False,
        )
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"the upstream at {base} could not be reached: {exc}", retry_after=5) from exc
    response: Optional[web.StreamResponse] = None
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(forwarded_headers(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    except ConnectionError as exc:  # our client went away
        raise ClientGone(str(exc)) from exc
    except aiohttp.ClientError as exc:
        log.warning("upstream %s broke off: %s", url, exc)
        if response is not None and response.prepared:
            return response  # headers are out; closing is all we can do
        raise UpstreamError(f"the upstream at {base} failed: {exc}") from exc
    finally:
        upstream.release()

"""API keys: `--api-key` (repeatable) and `--api-key-file`, checked on every request but health and metrics.

A client sends its key as `Authorization: Bearer KEY` (OpenAI's SDK) or `x-api-key: KEY`
(Anthropic's); either is accepted on every route. A missing or unknown key is a 401 in the
route's error shape (OpenAI's `invalid_api_key`, Anthropic's `authentication_error`) with
`WWW-Authenticate: Bearer`. `/health` (and what lies under it) and `/metrics` stay open, for
load balancers and Prometheus, unless `--protect-metrics`.

The keys are held only as SHA-256 digests. A presented key is hashed and its digest looked up
in a dict, so the cost does not depend on how many keys there are, and what is compared is
never the key: the time the lookup takes can only tell how a 32-byte digest of the client's
guess (under Python's per-process random string hash) relates to a stored digest, which says
nothing about a key, since nobody can steer a digest towards a stored one. A byte-by-byte
comparison of keys (`==` on strings) would leak the length and matching prefix of a key;
`hmac.compare_digest` of each stored key would cost one comparison per key.

For code that keeps per-client state (cache namespaces): the middleware sets `CLIENT_ID` on
every request it lets through, read with `client_id(request)`. It is a stable, non-secret name
of the key that matched: the first 16 hex digits of SHA-256(key), the same across restarts and
for the same key given any way; "" when no keys are configured (one client: everyone), and ""
on the open paths when they are reached without a key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from aiohttp import web

from proxy.errors import Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A typed request key where aiohttp has them (3.13+), else the plain string aiohttp used to take.
CLIENT_ID: Any = web.RequestKey("client_id", str) if hasattr(web, "RequestKey") else "mlx_cache_proxy.client_id"
CLIENT_ID_HEX = 16  # digits of the key's SHA-256 in its public name: 64 bits, no collision among real key sets

HEALTH_PREFIXES = ("/health", "/v1/health")
METRICS_PATH = "/metrics"


def is_health_path(path: str) -> bool:
    """`/health`, `/v1/health` and anything under them (always open)."""
    return any(path == p or path.startswith(p + "/") for p in HEALTH_PREFIXES)


def is_monitoring_path(path: str) -> bool:
    """Health and metrics: open without a key unless --protect-metrics; also what the connection cap lets through."""
    return path == METRICS_PATH or is_health_path(path)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """The public name of a key: what `client_id` returns for requests that present it."""
    return _digest(key).hex()[:CLIENT_ID_HEX]


class ApiKeys:
    """The configured keys, as digests; `identify` answers which client a request's headers name."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._by_digest: dict[bytes, str] = {}
        for key in keys:
            if not key or key != key.strip():
                raise ValueError("an API key must be non-empty, without surrounding spaces")
            self._by_digest[_digest(key)] = key_id(key)

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, headers: Mapping[str, str]) -> Optional[str]:
        """The client id of the key in `Authorization: Bearer` or `x-api-key`; None if neither holds a known key."""
        for key in presented_keys(headers):
            ident = self._by_digest.get(_digest(key))
            if ident is not None:
                return ident
        return None


def presented_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request carries: the Bearer token, then x-api-key (either may be absent)."""
    keys = []
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        keys.append(api_key)
    return keys


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from exc
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"the API key file {path} holds no key")
    return keys


def client_id(request: web.Request) -> str:
    """The non-secret id of the key the request presented ("" with no keys configured); see the module doc."""
    return request.get(CLIENT_ID, "")


def auth_middleware(keys: ApiKeys, protect_metrics: bool) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware that refuses requests without a known key (install it inside the error middleware)."""

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        ident = keys.identify(request.headers)
        if ident is None:
            if not (is_health_path(request.path) or (not protect_metrics and request.path == METRICS_PATH)):
                raise Unauthorized(_refusal_message(request.headers))
            ident = ""
        request[CLIENT_ID] = ident
        return await handler(request)

    return check_api_key


def _refusal_message(headers: Mapping[str, str]) -> str:
    if presented_keys(headers):
        return "Incorrect API key provided."
    return ("You didn't provide an API key. Send it as an Authorization header with Bearer auth "
            "(Authorization: Bearer YOUR_KEY) or as an x-api-key header.")

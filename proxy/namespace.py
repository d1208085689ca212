"""Cache namespaces: whose prompts may restore from whose.

A restored prefix tells its client, through `cached_tokens` and the time to
first token, how far its prompt matches one that was stored, and fork points
make that exact; so a client could read another's secret system prompt token
by token. Prefixes are therefore shared only inside a namespace: one per API
key when keys are set (`proxy.auth`), split further by a request's optional
`cache_salt` (vLLM's field name; also on the Anthropic route). With neither,
every request shares the one namespace "".

The worker and the disk tier see only a digest of the two, never a key or a
salt; the digest is stable across restarts, so the disk tier keeps it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from proxy.errors import InvalidRequest

MAX_SALT_CHARS = 256
NAMESPACE_HEX = 32  # digest characters sent to the worker


def parse_cache_salt(body: dict[str, Any]) -> Optional[str]:
    """The request's `cache_salt`: None, or a non-empty string of at most MAX_SALT_CHARS."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt or len(salt) > MAX_SALT_CHARS:
        raise InvalidRequest(
            f"cache_salt must be a non-empty string of at most {MAX_SALT_CHARS} characters", param="cache_salt"
        )
    return salt


def cache_namespace(client_id: str, cache_salt: Optional[str]) -> str:
    """The namespace of a request from `client_id` ("" without API keys) with `cache_salt`."""
    if not client_id and cache_salt is None:
        return ""
    material = f"mlx-cache-proxy namespace\0{client_id}\0{cache_salt or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:NAMESPACE_HEX]

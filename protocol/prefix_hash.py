"""Chained hashes of a prompt's prefix at block boundaries: how a worker names what its pool
holds and how the proxy names what a request needs, the same way on both sides.

h_0 = H(namespace), h_k = H(h_{k-1}, tokens[B(k-1):Bk]) for every whole block of B tokens:
h_k names the whole prefix tokens[:Bk] in that namespace, so two prompts share h_k exactly
when they share their first Bk tokens (and their cache namespace). 64-bit blake2b values fit
a msgpack integer.
"""

from __future__ import annotations

import hashlib
from array import array

PREFIX_BLOCK_TOKENS = 64  # tokens per block: routing resolution, and the events' granularity

_MASK = (1 << 63) - 1  # below 2**63: a plain msgpack int on either side


def namespace_seed(namespace: str) -> bytes:
    return hashlib.blake2b(namespace.encode(), digest_size=8, person=b"mlxcp-prefix").digest()


def block_hashes(tokens: list[int], namespace: str = "", block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """The chained hash of every whole block of `tokens`, in order."""
    digest = namespace_seed(namespace)
    out = []
    for begin in range(0, len(tokens) - block_tokens + 1, block_tokens):
        chunk = array("I", tokens[begin : begin + block_tokens]).tobytes()
        digest = hashlib.blake2b(digest + chunk, digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") & _MASK)
    return out

"""What the pool can restore, told to the proxy as prefix-block events (protocol.CacheEvents).

The router of a model with several replicas sends each request where most of its prompt is
cached (proxy/routing.py). It learns that from these events, never by asking.

At sequence granularity, an approximation: a block (a prefix of PREFIX_BLOCK_TOKENS * k tokens,
named by its chained hash) counts as stored while some stored sequence of the pool covers it
whole. A KV-only model restores any such prefix by trimming; a hybrid one restores from the
deepest checkpoint at or below it, so up to a lattice interval less than the block says. The
disk tier is not reported: routing counts what memory holds.

`PrefixReporter.update` diffs the pool against what was last reported: hashes are computed once
per sequence state (a sequence's token list is replaced when it grows, cut in place when it
shrinks: both are seen), and a block is reported stored when its first covering sequence comes
and removed when its last one goes.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from protocol.messages import CacheEvents
from protocol.prefix_hash import PREFIX_BLOCK_TOKENS, block_hashes

MAX_HASHES_PER_MESSAGE = 4096  # ~40 KB of msgpack: a big change goes out as several messages


class StoredSequence(NamedTuple):
    key: int
    tokens: list[int]
    namespace: str


class _Seen(NamedTuple):
    tokens: list[int]  # the list object hashed (identity: a replaced list is a new state)
    length: int
    hashes: list[int]


class PrefixReporter:
    def __init__(self, block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._seen: dict[int, _Seen] = {}
        self._counts: dict[int, int] = {}  # block hash -> stored sequences covering it (> 0)

    @property
    def blocks(self) -> int:
        return len(self._counts)

    def update(self, sequences: Iterable[StoredSequence], reset: bool = False) -> list[CacheEvents]:
        """The events that bring the proxy's view up to the pool's `sequences` (none if nothing changed).

        `reset`: the proxy knows nothing (a new session): the first message carries the whole set.
        """
        touched: dict[int, bool] = {}  # hash -> whether it was stored before this update
        live = set()
        for seq in sequences:
            live.add(seq.key)
            seen = self._seen.get(seq.key)
            if seen is not None and seen.tokens is seq.tokens and seen.length == len(seq.tokens):
                continue
            hashes = block_hashes(seq.tokens, seq.namespace, self.block_tokens)
            if seen is not None:
                self._count(seen.hashes, -1, touched)
            self._count(hashes, 1, touched)
            self._seen[seq.key] = _Seen(seq.tokens, len(seq.tokens), hashes)
        for key in [k for k in self._seen if k not in live]:
            self._count(self._seen.pop(key).hashes, -1, touched)
        if reset:
            return self._messages(sorted(self._counts), [], reset=True)
        stored = sorted(h for h, was in touched.items() if not was and h in self._counts)
        removed = sorted(h for h, was in touched.items() if was and h not in self._counts)
        return self._messages(stored, removed, reset=False) if stored or removed else []

    def _count(self, hashes: list[int], delta: int, touched: dict[int, bool]) -> None:
        counts = self._counts
        for h in hashes:
            n = counts.get(h, 0)
            touched.setdefault(h, n > 0)
            if n + delta > 0:
                counts[h] = n + delta
            else:
                counts.pop(h, None)

    def _messages(self, stored: list[int], removed: list[int], reset: bool) -> list[CacheEvents]:
        step = MAX_HASHES_PER_MESSAGE
        out = [CacheEvents(self.block_tokens, removed=removed[i : i + step]) for i in range(0, len(removed), step)]
        chunks = [stored[i : i + step] for i in range(0, len(stored), step)] or ([[]] if reset else [])
        for i, chunk in enumerate(chunks):
            out.append(CacheEvents(self.block_tokens, stored=chunk, reset=reset and i == 0))
        return out

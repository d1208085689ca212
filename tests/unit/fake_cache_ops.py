"""A stand-in for ModelCacheOps over plain Python lists, for the pool's pure-logic tests.

A "cache" is a list of the tokens it has consumed; a snapshot records the
position and the tokens at that position, so a test can check that a restore
used the right snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_PER_TOKEN = 10
SNAPSHOT_BYTES = 7


@dataclass(frozen=True)
class FakeSnapshot:
    position: int
    tokens: tuple
    nbytes: int = SNAPSHOT_BYTES


class FakeCache(list):
    pass


class FakeOps:
    def __init__(self, needs_snapshots: bool = True):
        self.needs_snapshots = needs_snapshots
        self.forks = 0

    def new_cache(self):
        return FakeCache()

    def snapshot(self, cache, position):
        assert len(cache) == position
        return FakeSnapshot(position, tuple(cache))

    def restore(self, cache, position, snap):
        if self.needs_snapshots:
            assert snap is not None and snap.position == position
        del cache[position:]
        if snap is not None:
            assert tuple(cache) == snap.tokens
        return cache

    def fork(self, cache, position, snap):
        self.forks += 1
        new = FakeCache(cache[:position])
        if snap is not None:
            assert tuple(new) == snap.tokens
        return new

    def shrink(self, cache, position, snap):
        return self.fork(cache, position, snap)

    def compact(self, cache):
        return cache

    def nbytes(self, cache):
        return len(cache) * BYTES_PER_TOKEN

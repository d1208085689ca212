"""Eviction order: one policy object over an indexed structure (a lazy min-heap).

No MLX here. The pool names its evictable units (stored sequences and
checkpoints); the policy gives each a priority (lower goes first), the index
hands out the lowest. A priority can change as the pool changes around a unit:

- when it can only rise (a hit refreshes an age), the heap keeps the old,
  lower key and the unit is re-filed when it surfaces (`pop` compares the
  filed key with the current one);
- when it can fall (a sequence becomes covered by another, a checkpoint stops
  protecting a shared prefix), the pool re-files the units on the changed path
  (`touch`), which is a handful of nodes, not the whole pool.

So a victim costs O(log n) heap work plus the policy's look at the few units
that surface, whatever the number of stored sequences. Changing the order
touches `EvictionPolicy` only.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Protocol

from protocol.messages import RestoreKind

Priority = tuple


@dataclass(frozen=True)
class UnitFacts:
    """What the policy needs to know of one evictable unit (a stored sequence or a checkpoint)."""

    saved: int  # tokens of recompute it avoids beyond what is left without it
    held: float  # what it holds, in tokens of KV (its bytes over the KV bytes of one token)
    last_used: int  # the pool's request count when it was last used
    hits: int  # times it was restored from
    tier: int  # THIN, LANDMARK or WHOLE


# A unit used this many pool clock ticks later outranks one of the next tier up; the clock ticks at every
# checkout and every commit, so that is about 8 requests.
RECENCY_REQUESTS = 16
THIN, LANDMARK, WHOLE = 0, 1, 2  # the lattice and the ladder; message and prompt ends, forks; sequences
# The ladder counts with the landmarks: it is where the next prompt diverges (an edit, another question).
LANDMARKS = frozenset({RestoreKind.HINT, RestoreKind.PROMPT_END, RestoreKind.FORK, RestoreKind.TAIL})


def checkpoint_tier(kind: RestoreKind) -> int:
    return LANDMARK if kind in LANDMARKS else THIN


class PoolView(Protocol):
    """What the policy may ask the pool about a unit (answered in O(1) or a short walk)."""

    disk_tier: bool

    def sequence_facts(self, seq: Any) -> tuple[bool, bool, bool, UnitFacts]: ...  # compacted, covered, prefix_only
    def checkpoint_facts(self, ckpt: Any) -> tuple[bool, bool, UnitFacts]: ...  # protects a shared prefix, anchor


class EvictionPolicy:
    """The order in which the pool gives memory back; lower priorities go first.

    Group -1: KV buffers grown in steps, compacted (nothing is lost).
    Group 0: sequences another stored sequence covers (nothing is lost).
    Group 1, by score: checkpoints and sequences. A unit's score is its last
    use (one point per RECENCY_REQUESTS clock ticks, ~8 requests), plus its tier (0 for the
    lattice and the ladder, 1 for message ends, prompt ends and fork points, 2
    for a whole sequence), plus what it saves per what it holds squashed into
    [0, 1): tokens of recompute beyond the next-lower restore point left, times
    (hits + 1), over its bytes in tokens of KV (GreedyDual-Size-Frequency, with
    the clock for its inflation). So among units used at about the same time a
    sequence's lattice thins before its landmarks go, and they before the
    sequence does, the one that saves least per byte first; and what has not
    been used for a few dozen requests falls behind what was used since.
    Group 2: what keeps a shared prefix, and a sequence's anchor (the deepest
    checkpoint on its path, without which a hybrid's KV cannot be restored),
    which only leaves with its sequence. With a disk tier every checkpoint is
    in group 2: a sequence leaves before its checkpoints, so it is written whole.
    """

    @staticmethod
    def score(facts: UnitFacts) -> float:
        worth = facts.saved * (1 + facts.hits) / max(facts.held, 1e-9)
        return facts.last_used / RECENCY_REQUESTS + facts.tier + worth / (1 + worth)

    def sequence_priority(self, pool: PoolView, seq: Any) -> Priority:
        compacted, covered, prefix_only, facts = pool.sequence_facts(seq)
        if not compacted:
            return (-1, facts.last_used, 0)
        if covered:
            return (0, facts.last_used, 0)
        return (2 if prefix_only else 1, self.score(facts), 0)

    def checkpoint_priority(self, pool: PoolView, ckpt: Any) -> Priority:
        protects, anchor, facts = pool.checkpoint_facts(ckpt)
        return (2 if protects or anchor or pool.disk_tier else 1, self.score(facts), 0)


class EvictionIndex:
    """A min-heap of (priority, unit) with lazy re-filing; see the module docstring."""

    def __init__(self, priority: Callable[[Any], Optional[Priority]], alive: Callable[[Any], bool]):
        self._priority = priority  # None: not evictable now (pinned)
        self._alive = alive
        self._heap: list[tuple[Priority, int, Any]] = []
        self._filed: dict[Hashable, Priority] = {}  # the latest key filed per unit
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def file(self, unit: Any) -> None:
        """(Re-)file `unit` under its current priority; pinned units are left out until filed again."""
        key = self._priority(unit)
        if key is None:
            self._filed.pop(id(unit), None)
            return
        if self._filed.get(id(unit)) == key:
            return
        self._filed[id(unit)] = key
        heapq.heappush(self._heap, (key, next(self._order), unit))

    def key_of(self, unit: Any) -> Optional[Priority]:
        """The key `unit` is filed under (what `pop` just found current), or None."""
        return self._filed.get(id(unit))

    def forget(self, unit: Any) -> None:
        self._filed.pop(id(unit), None)

    def pop(self) -> Any:
        """The evictable unit of lowest current priority (it stays filed until forgotten), or None."""
        while self._heap:
            key, _, unit = self._heap[0]
            if not self._alive(unit) or self._filed.get(id(unit)) != key:
                heapq.heappop(self._heap)  # gone, pinned, or filed again under another key
                continue
            current = self._priority(unit)
            if current != key:
                heapq.heappop(self._heap)
                self._filed.pop(id(unit), None)
                self.file(unit)  # its priority rose (or it is pinned now): file it where it belongs
                continue
            return unit
        return None

    def rebuild(self, units: list[Any]) -> None:
        """Start over from the live units (when stale entries pile up)."""
        self._heap, self._filed = [], {}
        for unit in units:
            self.file(unit)

    def stale(self, live_units: int) -> bool:
        return len(self._heap) > 4 * live_units + 256

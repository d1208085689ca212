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
touches `EvictionPolicy.priority` only.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Hashable, Optional, Protocol

Priority = tuple


class PoolView(Protocol):
    """What the policy may ask the pool about a unit (answered in O(1) or a short walk)."""

    disk_tier: bool

    def sequence_facts(self, seq: Any) -> tuple[bool, bool, bool, int]: ...  # compacted, covered, prefix_only, age
    def checkpoint_facts(self, ckpt: Any) -> tuple[bool, bool, int]: ...  # protects a shared prefix, anchor, age


class EvictionPolicy:
    """The order in which the pool gives memory back; lower priorities go first.

    Group -1: KV buffers grown in steps, compacted (nothing is lost).
    Group 0: sequences another stored sequence covers (nothing is lost).
    Group 1, least recently used first: checkpoints, and sequences (cut back to a
    shared prefix, or dropped). A sequence's anchor (the deepest checkpoint on its
    path, without which a hybrid's KV cannot be restored) only leaves with it.
    Group 2: what keeps a shared prefix. With a disk tier a sequence leaves before
    its checkpoints, so it is written whole.
    """

    def sequence_priority(self, pool: PoolView, seq: Any) -> Priority:
        compacted, covered, prefix_only, age = pool.sequence_facts(seq)
        if not compacted:
            return (-1, age, 0)
        if covered:
            return (0, age, 0)
        return (2 if prefix_only else 1, age, 0 if pool.disk_tier else 1)

    def checkpoint_priority(self, pool: PoolView, ckpt: Any) -> Priority:
        protects, anchor, age = pool.checkpoint_facts(ckpt)
        tier = 2 if anchor else (1 if pool.disk_tier else 0)
        return (2 if protects else 1, age, tier)


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

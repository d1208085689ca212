"""Where a prefill takes checkpoints, within a budget that scales with the model's snapshot size.

No MLX here. One request's prefill takes, beyond what it restored from:

- the lattice: every `stride` tokens (the stride doubles so a sequence keeps at
  most `max_lattice_points`), for divergences anywhere (an earlier message edited);
- message ends the proxy hinted (where the next turn diverges when the template
  re-renders an earlier message differently);
- the fork point (where this prompt left a stored one) and the prompt's end;
- a ladder back from the prompt's end at geometric offsets (LADDER_FIRST,
  then x LADDER_RATIO but at least MIN_RUNG_GAP more, up to LADDER_REACH
  tokens back): the next prompt often
  shares all but the end of this one (an edited or regenerated last message,
  another question on the same document). Each rung moves down to the nearest
  structural boundary the proxy sent (a line or paragraph start, one of the
  message's last sentences) within its gap to the next rung, so an edit of a
  sentence restores at its start; the LAST_SPLITS boundaries nearest the end
  (the last paragraph start, the last line start, the last sentences) are
  taken as they are. Every stop is one more prefill chunk, so a rung
  closer than MIN_RUNG_GAP (a split point: MIN_SPLIT_GAP) to another stop is
  left out, and a prefill under MIN_LADDER_PREFILL tokens (a warm turn) takes
  none: a long new message gets a rung every ~64+ tokens.

The budget (`SnapshotBudget`): the snapshots one prompt adds beyond the lattice
and its prompt end may hold at most SNAPSHOT_SHARE of the prompt's KV bytes,
never fewer than MIN_EXTRA nor more than MAX_EXTRA; the fork point first, then
the most recent message ends (half the budget at most while rungs wait), then
the split points nearest the end and the rungs, then the other hints. The
lattice, likewise, holds at most LATTICE_SHARE of the sequence's KV bytes
(MIN_LATTICE_POINTS at least). For a model whose snapshot is the size of 3,000
tokens of KV (Qwen3-Next), a 2K-token prompt gets MIN_EXTRA extras and 2
lattice points, a 60K-token one about ten of each; a tiny test model, whose
snapshot is 66 tokens of KV, gets the caps.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from dataclasses import dataclass
from typing import Iterable, Sequence

from protocol.messages import SPLIT_POINTS_REACH, RestoreKind, SplitKind

DEFAULT_CHECKPOINT_INTERVAL = 256  # tokens between lattice points before the stride doubles
LADDER_FIRST = 64  # tokens back from the prompt's end of the first rung
LADDER_RATIO = 1.15  # each rung this much further back than the one before
LADDER_REACH = SPLIT_POINTS_REACH  # no rung further back than this (the proxy sends split points as far)
SNAP_WINDOW = 1.0  # a rung moves down to a structural boundary within this fraction of its gap
LAST_SPLITS = 3  # the structural boundaries nearest the end are taken as they are (the last sentences)
MIN_SPLIT_GAP = 16  # ... when at least this far from every other stop of the prefill
MIN_RUNG_GAP = 64  # a rung is taken when at least this far from every other stop
MIN_LADDER_PREFILL = 256  # a prefill shorter than this takes no rungs nor split points (one chunk or two)
SNAPSHOT_SHARE = 1.0  # extra snapshots of one prompt: at most this share of its KV bytes
MIN_EXTRA = 4
MAX_EXTRA = 40
LATTICE_SHARE = 0.5  # a sequence's lattice: at most this share of its KV bytes ...
MIN_LATTICE_POINTS = 2  # ... but at least this many points (and at most the pool's max_lattice_points)


def ladder_offsets(
    first: int = LADDER_FIRST, ratio: float = LADDER_RATIO, reach: int = LADDER_REACH, gap: int = MIN_RUNG_GAP
) -> list[int]:
    """Distances back from a prompt's end, ascending: first, then each max(ratio x, + gap), up to reach."""
    offsets, x = [], float(first)
    while x <= reach:
        offsets.append(int(round(x)))
        x = max(x * ratio, x + gap)
    return offsets


LADDER_OFFSETS = tuple(ladder_offsets())


def extra_budget(prompt_tokens: int, kv_bytes_per_token: float, snapshot_bytes: float) -> int:
    """How many snapshots beyond the lattice and the prompt end one prompt may add."""
    if snapshot_bytes <= 0:
        return MAX_EXTRA
    n = int(SNAPSHOT_SHARE * prompt_tokens * kv_bytes_per_token / snapshot_bytes)
    return max(MIN_EXTRA, min(MAX_EXTRA, n))


@dataclass(frozen=True)
class SnapshotBudget:
    """What one sequence may spend on snapshots, from the model's sizes (0: no snapshots to count)."""

    kv_bytes_per_token: float = 0.0
    snapshot_bytes: float = 0.0
    max_lattice_points: int = 16
    lattice_by_bytes: bool = True  # False: an interval the user chose, kept up to max_lattice_points

    def extra(self, prompt_tokens: int) -> int:
        return extra_budget(prompt_tokens, self.kv_bytes_per_token, self.snapshot_bytes)

    def lattice_points(self, tokens: int) -> int:
        if self.snapshot_bytes <= 0 or not self.lattice_by_bytes:
            return self.max_lattice_points
        n = int(LATTICE_SHARE * tokens * self.kv_bytes_per_token / self.snapshot_bytes)
        return max(MIN_LATTICE_POINTS, min(self.max_lattice_points, n))


@dataclass(frozen=True)
class Placement:
    """The checkpoint positions one prefill takes, by kind."""

    positions: dict[int, RestoreKind]


def _clear_of(stops: list[int], pos: int, gap: int) -> bool:
    """Is `pos` at least `gap` tokens from every position in `stops` (ascending)?"""
    i = bisect_right(stops, pos)
    return (i == 0 or pos - stops[i - 1] >= gap) and (i == len(stops) or stops[i] - pos >= gap)


def ladder_positions(n: int, splits: Sequence[int], offsets: Iterable[int] = LADDER_OFFSETS) -> list[int]:
    """Ladder rungs back from position n, nearest first, each snapped down to a split point in its window.

    `splits` are structural boundaries (ascending token offsets). A rung at
    n - o whose gap to the next rung down is g moves to the deepest split point
    in (n - o - SNAP_WINDOW * g, n - o]; without one it stays where it is.
    """
    offsets = [o for o in offsets if o < n]
    rungs: list[int] = []
    for i, o in enumerate(offsets):
        pos = n - o
        gap = (offsets[i + 1] - o) if i + 1 < len(offsets) else o
        j = bisect_right(splits, pos) - 1
        if j >= 0 and splits[j] > pos - SNAP_WINDOW * gap:
            pos = splits[j]
        if pos > 0 and (not rungs or pos < rungs[-1]):
            rungs.append(pos)
    return rungs


def last_boundaries(splits: Sequence[tuple[int, int]], p: int, n: int) -> list[int]:
    """The boundaries nearest the end worth a stop of their own, strongest first.

    The last paragraph start (another question after a document), the last
    line start, then the last sentence starts (an edit of the last sentences).
    """
    inside = [(pos, kind) for pos, kind in splits if p < pos < n]
    out: list[int] = []
    for wanted in (SplitKind.PARAGRAPH, SplitKind.LINE):
        found = [pos for pos, kind in inside if kind >= wanted]
        if found and found[-1] not in out:
            out.append(found[-1])
    for pos, _ in reversed(inside):
        if len(out) >= LAST_SPLITS:
            break
        if pos not in out:
            out.append(pos)
    return out[:LAST_SPLITS]


def place(
    n: int,
    restore_point: int,
    *,
    lattice_stride: int,
    hints: Iterable[int] = (),
    splits: Sequence[tuple[int, int]] = (),
    fork_at: int = 0,
    budget: int = MAX_EXTRA,
    snapshots: bool = True,
) -> Placement:
    """The checkpoints a prefill from `restore_point` to `n` takes (the prompt end always).

    `splits` are (position, SplitKind) pairs, ascending.
    """
    p = restore_point
    wanted: dict[int, RestoreKind] = {}
    if snapshots:
        for pos in range((p // lattice_stride + 1) * lattice_stride, n, lattice_stride):
            wanted[pos] = RestoreKind.LATTICE
        extra: dict[int, RestoreKind] = {}
        if p < fork_at < n:
            extra[fork_at] = RestoreKind.FORK
        hints = [pos for pos in sorted(set(hints), reverse=True) if p < pos < n and pos != fork_at]
        first_hints = max(1, budget // 2)
        for pos in hints[:first_hints]:
            if len(extra) < budget:
                extra[pos] = RestoreKind.HINT
        # Each stop is one more prefill chunk: a split point or a rung too close to another stop saves
        # too little for what it costs.
        stops = sorted({p, n, *wanted, *extra})
        candidates = []
        if n - p >= MIN_LADDER_PREFILL:  # a warm turn's few new tokens: each stop would cost a chunk
            candidates += [(pos, MIN_SPLIT_GAP) for pos in last_boundaries(splits, p, n)]
            candidates += [(pos, MIN_RUNG_GAP) for pos in ladder_positions(n, [pos for pos, _ in splits])]
        for pos, gap in candidates:
            if len(extra) >= budget:
                break
            if p < pos and _clear_of(stops, pos, gap):
                extra[pos] = RestoreKind.TAIL
                insort(stops, pos)
        for pos in hints[first_hints:]:
            if len(extra) < budget:
                extra[pos] = RestoreKind.HINT
        wanted.update(extra)
    wanted[n] = RestoreKind.PROMPT_END
    return Placement(wanted)

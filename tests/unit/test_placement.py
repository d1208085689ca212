"""Where a prefill takes checkpoints (worker/placement.py): pure arithmetic, no MLX."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.messages import RestoreKind, SplitKind
from worker.placement import (
    LADDER_OFFSETS,
    MAX_EXTRA,
    MIN_EXTRA,
    MIN_RUNG_GAP,
    MIN_SPLIT_GAP,
    extra_budget,
    ladder_offsets,
    place,
)


def test_ladder_offsets_grow_geometrically_with_a_minimum_gap():
    offsets = ladder_offsets()
    assert offsets == list(LADDER_OFFSETS) and offsets[0] == 64
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert min(gaps) >= MIN_RUNG_GAP
    assert gaps[-1] > 4 * gaps[0]  # geometric further back


def test_the_budget_scales_with_the_snapshot_size():
    # A model whose snapshot is worth 66 tokens of KV (the tiny qwen3_next) vs 3,000 (Qwen3-Next-80B).
    tiny = [extra_budget(n, 256, 66 * 256) for n in (500, 2000, 8000)]
    real = [extra_budget(n, 24_576, 3000 * 24_576) for n in (500, 2000, 60_000)]
    assert tiny[0] < tiny[1] < tiny[2] == MAX_EXTRA
    assert real[0] == real[1] == MIN_EXTRA < real[2] < MAX_EXTRA
    assert extra_budget(1000, 0, 0) == MAX_EXTRA  # nothing to snapshot: no limit that matters


@given(
    n=st.integers(1, 6000),
    p_share=st.floats(0, 1),
    hints=st.lists(st.integers(1, 6000), max_size=10),
    splits=st.lists(st.integers(1, 6000), max_size=60),
    budget=st.integers(0, 40),
    fork=st.integers(0, 6000),
)
def test_a_placement_stays_inside_the_prefill_and_within_its_budget(n, p_share, hints, splits, budget, fork):
    p = int(p_share * n)
    splits = [(pos, SplitKind.LINE) for pos in sorted(set(splits))]
    placed = place(n, p, lattice_stride=256, hints=hints, splits=splits, fork_at=fork, budget=budget)
    positions = placed.positions
    assert positions[n] is RestoreKind.PROMPT_END
    assert all(p < pos <= n or pos == n for pos in positions)
    extra = [pos for pos, kind in positions.items() if kind not in (RestoreKind.LATTICE, RestoreKind.PROMPT_END)]
    assert len(extra) <= max(budget, 1 if p < fork < n else 0)
    stops = sorted({p, n, *positions})
    for pos, kind in positions.items():
        if kind is RestoreKind.TAIL:  # ladder rungs and split points keep clear of the other stops
            gap = min(abs(pos - other) for other in stops if other != pos)
            assert gap >= MIN_SPLIT_GAP
    if p < fork < n:
        assert positions[fork] is RestoreKind.FORK


def test_a_short_new_message_gets_no_ladder_and_a_long_one_a_rung_every_so_often():
    short = place(1000 + 120, 1000, lattice_stride=4096, hints=[1117])
    assert not [k for k in short.positions.values() if k is RestoreKind.TAIL]
    long = place(2000, 0, lattice_stride=4096)
    rungs = sorted(pos for pos, k in long.positions.items() if k is RestoreKind.TAIL)
    assert rungs == sorted(2000 - o for o in LADDER_OFFSETS if 2000 - o >= MIN_RUNG_GAP)


def test_the_boundaries_nearest_the_end_are_taken_first():
    # A document, then "\n\nQuestion 1: ..." 20 tokens from the end: that paragraph start is a stop,
    # before the question's own sentence starts.
    splits = [(400, SplitKind.PARAGRAPH), (900, SplitKind.LINE), (1480, SplitKind.PARAGRAPH), (1488, SplitKind.SENTENCE)]
    placed = place(1500, 0, lattice_stride=4096, splits=splits, budget=1)
    assert placed.positions[1480] is RestoreKind.TAIL and 1488 not in placed.positions

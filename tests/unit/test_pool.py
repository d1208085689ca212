"""The pool's lookup, takeover/fork choice and eviction, over fake caches (no MLX)."""

import subprocess
import sys

from protocol.messages import RestoreKind, SplitKind
from tests.unit.fake_cache_ops import BYTES_PER_TOKEN, SNAPSHOT_BYTES, FakeOps
from worker.placement import LADDER_OFFSETS, MIN_RUNG_GAP
from worker.pool import CheckpointPool, TakenCheckpoint


def run(pool, prompt, generated=(), hints=(), logits="L", namespace=""):
    """Play one request against the pool the way the engine does; returns the plan."""
    plan = pool.plan(prompt, hints, namespace=namespace)
    lease = pool.checkout(plan)
    assert len(lease.cache) == plan.restore_point
    taken = []
    for pos in range(plan.restore_point + 1, len(prompt) + 1):
        lease.cache.append(prompt[pos - 1])
        kind = plan.checkpoints_to_take.get(pos)
        if kind is not None:
            snap = pool.ops.snapshot(lease.cache, pos) if pool.ops.needs_snapshots else None
            taken.append(TakenCheckpoint(pos, kind, snap, logits if pos == len(prompt) else None, 4 if pos == len(prompt) else 0))
    lease.cache.extend(generated)
    tokens = list(prompt) + list(generated)
    pool.commit(lease, tokens, len(prompt), taken)  # no snapshot at the generation end: the cache is that state
    return plan


def make_pool(needs_snapshots=True, capacity=10**9, interval=8, max_lattice=4):
    return CheckpointPool(FakeOps(needs_snapshots), capacity, interval, max_lattice)


SYSTEM = list(range(100, 140))  # 40 tokens


def test_empty_pool_plans_a_cold_start_with_checkpoints_on_the_way():
    pool = make_pool()
    plan = pool.plan(SYSTEM, hints=[10])
    assert plan.restore_point == 0 and plan.kind is RestoreKind.NONE and plan.source is None
    assert plan.checkpoints_to_take[10] is RestoreKind.HINT
    assert plan.checkpoints_to_take[40] is RestoreKind.PROMPT_END
    assert {16, 32} <= set(plan.checkpoints_to_take)  # 40 tokens, at most 4 points: stride 16


def test_a_continued_conversation_is_taken_over_in_place_at_the_generation_end():
    pool = make_pool()
    run(pool, SYSTEM, generated=[1, 2, 3])
    turn2 = SYSTEM + [1, 2, 3, 7, 7, 7]
    plan = run(pool, turn2, generated=[4])
    assert plan.in_place and plan.restore_point == 43 and plan.kind is RestoreKind.GENERATION_END
    assert plan.checkpoint is None  # the stored cache itself is the state at its end
    assert pool.ops.forks == 0 and len(pool.sequences) == 1
    assert pool.plan(turn2 + [4, 9]).restore_point == len(turn2) + 1  # and again, one turn on


def test_the_end_of_a_sequence_another_request_holds_is_not_taken_over():
    pool = make_pool()
    run(pool, SYSTEM, generated=[1, 2, 3])
    held = pool.lease(SYSTEM + [1, 2, 3, 5])
    plan = pool.plan(SYSTEM + [1, 2, 3, 6])
    assert plan.source is not held.sequence and plan.restore_point <= 40  # a checkpoint, not the held end
    pool.discard(held)


def test_checkpoints_a_prompt_went_past_lose_what_no_one_will_use():
    pool = make_pool()
    run(pool, SYSTEM, generated=[1, 2, 3])
    run(pool, SYSTEM + [1, 2, 3, 7, 7], generated=[4])
    kinds = {d: c for n in pool.trie.nodes() for d, c in n.checkpoints.items()}
    assert 43 not in kinds  # turn 1's generation end: superseded by turn 2's prompt
    assert kinds[40].kind is RestoreKind.PROMPT_END and kinds[40].logits is None
    assert kinds[45].logits == "L"  # the newest prompt end keeps its logits
    assert 46 not in kinds  # the generation end is the stored cache itself


def test_a_template_that_rewrites_the_reply_still_restores_at_the_prompt_end():
    pool = make_pool()
    run(pool, SYSTEM, generated=[1, 2, 3])
    plan = pool.plan(SYSTEM + [9, 9, 9, 7])  # the reply re-rendered differently
    assert plan.restore_point == 40 and plan.kind is RestoreKind.PROMPT_END and plan.in_place


def test_a_prompt_leaving_a_stored_prompt_forks_and_keeps_the_original():
    pool = make_pool()
    doc = SYSTEM + list(range(200, 230))
    run(pool, doc + [1, 1, 1], generated=[5])
    plan = run(pool, doc + [2, 2, 2], generated=[6])
    assert not plan.in_place and pool.ops.forks == 1
    assert plan.restore_point == 64 and plan.kind is RestoreKind.LATTICE  # within one interval of 70
    assert plan.checkpoints_to_take[70] is RestoreKind.FORK
    third = pool.plan(doc + [3, 3, 3])
    assert third.restore_point == 70 and third.kind is RestoreKind.FORK
    # The first conversation is still whole.
    assert pool.plan(doc + [1, 1, 1, 5, 8]).restore_point == 74


def test_a_kv_only_model_trims_to_the_common_prefix_without_checkpoints():
    pool = make_pool(needs_snapshots=False)
    run(pool, SYSTEM + [1, 2, 3])
    plan = pool.plan(SYSTEM + [1, 9])
    assert plan.restore_point == 41 and plan.kind is RestoreKind.TRIM
    assert set(plan.checkpoints_to_take) == {42}  # only the prompt end, for its logits


def test_an_exact_repeat_restores_everything_from_stored_logits():
    for needs in (True, False):
        pool = make_pool(needs_snapshots=needs)
        run(pool, SYSTEM, generated=[1, 2])
        plan = pool.plan(SYSTEM)
        assert plan.restore_point == len(SYSTEM) and plan.logits == "L"
        assert plan.checkpoints_to_take == {}


def test_without_logits_one_prompt_token_is_left_to_compute():
    pool = make_pool()
    run(pool, SYSTEM, logits=None)
    plan = pool.plan(SYSTEM)
    assert plan.restore_point < len(SYSTEM)


def test_agents_sharing_a_system_prompt_keep_their_own_histories():
    pool = make_pool()
    histories = {}
    for agent in range(5):
        histories[agent] = SYSTEM + [1000 + agent] * 5
        run(pool, histories[agent], generated=[7], hints=[len(SYSTEM)])
    for agent in range(5):
        nxt = histories[agent] + [7, 2000 + agent]
        plan = pool.plan(nxt)
        assert plan.restore_point == len(histories[agent]) + 1, agent
        assert plan.in_place


def test_lattice_is_thinned_as_a_sequence_grows():
    pool = make_pool(interval=8, max_lattice=4)
    tokens = list(range(1, 33))
    run(pool, tokens)
    lattice = lambda: sorted(
        d for n in pool.trie.nodes() for d, c in n.checkpoints.items() if c.kind is RestoreKind.LATTICE
    )
    assert lattice() == [8, 16, 24]
    run(pool, tokens + list(range(33, 129)))
    assert len(lattice()) <= 4
    assert all(d % pool.lattice_stride(128) == 0 for d in lattice())


def test_eviction_is_lru_and_a_hit_refreshes():
    pool = make_pool()
    a, b = [1] * 20, [2] * 20
    run(pool, a)
    run(pool, b)
    pool.plan(a)  # a plan alone is no hit
    run(pool, a + [3])  # a hit on a refreshes it
    pool.evict_to(30 * BYTES_PER_TOKEN)
    assert pool.plan(a + [3, 4]).restore_point > 0
    assert pool.plan(b + [4]).restore_point == 0


def test_intermediate_checkpoints_go_before_sequences_and_shared_prefixes_last():
    pool = make_pool(interval=8, max_lattice=16)
    run(pool, SYSTEM + [1] * 30, hints=[40])
    run(pool, SYSTEM + [2] * 30, hints=[40])
    shared = pool.trie.match(SYSTEM).node_at(40).checkpoints[40]
    pool.evict_to(pool.nbytes - SNAPSHOT_BYTES)
    assert len(pool.sequences) == 2  # an intermediate (lattice) snapshot went first
    assert pool.trie.match(SYSTEM).node_at(40).checkpoints[40] is shared  # not the shared one
    assert pool.plan(SYSTEM + [1] * 30 + [9]).restore_point == 70  # nor an anchor


def test_pool_stays_within_capacity():
    pool = make_pool(capacity=200 * BYTES_PER_TOKEN)
    for i in range(30):
        run(pool, [i] * 50, generated=[1])
        assert pool.nbytes <= pool.capacity_bytes
    assert pool.evictions > 0


def test_byte_accounting_matches_a_recount():
    pool = make_pool()
    for i in range(6):
        run(pool, SYSTEM + [i] * (i + 3), generated=[9, 9], hints=[40])
    pool.evict_to(pool.nbytes // 2)
    recount = sum(s.nbytes for s in pool.sequences.values()) + sum(
        c.nbytes for n in pool.trie.nodes() for c in n.checkpoints.values()
    )
    assert pool.nbytes == recount
    assert pool.stats().checkpoints == sum(len(n.checkpoints) for n in pool.trie.nodes())


def test_the_lookup_structure_and_the_pool_import_no_mlx():
    code = "import sys, worker.pool, worker.trie; print([m for m in sys.modules if m.startswith('mlx')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


LONG_SYSTEM = list(range(300, 400))  # 100 tokens: a shared prefix worth keeping


def test_an_evicted_conversation_is_cut_back_to_the_prefix_it_shares():
    pool = make_pool(interval=1000)
    a = LONG_SYSTEM + [1] * 30
    b = LONG_SYSTEM + [2] * 30
    run(pool, a, generated=[5], hints=[100])
    run(pool, b, generated=[6], hints=[100])
    pool.evict_to(pool.nbytes - 20 * BYTES_PER_TOKEN)  # a's unshared checkpoints, then its tail
    (seq_a,) = [s for s in pool.sequences.values() if s.tokens[-1] != 6]
    assert seq_a.tokens == LONG_SYSTEM and seq_a.prefix_only
    assert seq_a.nbytes == 100 * BYTES_PER_TOKEN
    plan = pool.plan(a + [5, 9])
    assert plan.restore_point == 100  # the system prompt is still there for a
    assert pool.plan(b + [6, 9]).restore_point == len(b) + 1  # b is whole


def test_a_sequence_another_covers_goes_first_whatever_its_age():
    pool = make_pool(interval=1000)
    run(pool, LONG_SYSTEM, logits=None)
    run(pool, LONG_SYSTEM + [1] * 20, generated=[2])  # takes the first over in place: one sequence
    assert len(pool.sequences) == 1
    run(pool, LONG_SYSTEM + [3] * 20, hints=[100])  # forks
    covered = [s for s in pool.sequences.values()]
    assert len(covered) == 2
    pool.evict_to(pool.nbytes - 10 * BYTES_PER_TOKEN)
    # One sequence's tail went; it now holds the shared prefix, which the other covers.
    shrunk = [s for s in pool.sequences.values() if s.prefix_only]
    assert len(shrunk) == 1 and shrunk[0].tokens == LONG_SYSTEM
    (whole,) = [s for s in pool.sequences.values() if not s.prefix_only]
    pool.evict_to(pool.nbytes - 1)
    assert not [s for s in pool.sequences.values() if s.prefix_only]  # covered: dropped first
    assert list(pool.sequences.values()) == [whole]
    assert pool.plan(whole.tokens + [1]).restore_point == len(whole.tokens)


def test_agents_taking_turns_under_pressure_keep_the_shared_system_prompt():
    per_agent = (len(LONG_SYSTEM) + 40) * BYTES_PER_TOKEN
    pool = make_pool(interval=1000, capacity=int(2.5 * per_agent))
    histories = {agent: LONG_SYSTEM + [1000 + agent] * 30 for agent in range(6)}
    for round_ in range(3):
        for agent in range(6):
            prompt = histories[agent] + [2000 + round_]
            plan = run(pool, prompt, generated=[7], hints=[len(LONG_SYSTEM)])
            if round_ > 0:
                assert plan.restore_point >= len(LONG_SYSTEM), (round_, agent, plan.restore_point)
            histories[agent] = prompt + [7]
            assert pool.nbytes <= pool.capacity_bytes


def test_a_stored_sequence_keeps_its_anchor_while_it_stays():
    pool = make_pool(interval=8, max_lattice=16)
    conversations = {k: [k] * 60 for k in (1, 2, 3)}
    for k, prompt in conversations.items():
        run(pool, prompt, generated=[k + 10])
    while pool.sequences:
        for seq in pool.sequences.values():  # whatever is still stored continues from its end
            assert pool.plan(seq.tokens + [99]).restore_point == len(seq.tokens)
        pool.evict_to(pool.nbytes - 1)


def test_tail_checkpoints_catch_a_new_ending_near_the_prompt_end():
    pool = make_pool(interval=1000)
    document = list(range(500, 900))  # one long message: no hint inside it
    first = document + [1] * 10
    plan = run(pool, first, generated=[7])
    rungs = [len(first) - o for o in LADDER_OFFSETS if len(first) - o >= MIN_RUNG_GAP]  # clear of position 0
    assert set(rungs) == {p for p, k in plan.checkpoints_to_take.items() if k is RestoreKind.TAIL}
    second = document[:390] + [2] * 12  # diverges 20 tokens before the first prompt's end
    assert pool.plan(second).restore_point == max(r for r in rungs if r <= 390)
    # Once the conversation goes on past them, an earlier prompt's tails are dropped; the new
    # prompt's own tails (those after its restore point) are kept.
    third = first + [7] + [3] * 300  # a prefill long enough for a ladder (MIN_LADDER_PREFILL)
    run(pool, third, generated=[8])
    tails = sorted(d for n in pool.trie.nodes() for d, c in n.checkpoints.items() if c.kind is RestoreKind.TAIL)
    restored = len(first) + 1
    assert tails == sorted(len(third) - o for o in LADDER_OFFSETS if len(third) - o >= restored + MIN_RUNG_GAP)


def test_the_ladder_moves_to_structural_boundaries_in_its_window():
    pool = make_pool(interval=1000)
    message = list(range(500, 800))
    splits = [(pos, SplitKind.LINE) for pos in (100, 200, 280, 295)]
    plan = pool.plan(message, splits=splits)
    tails = {p for p, k in plan.checkpoints_to_take.items() if k is RestoreKind.TAIL}
    assert 280 in tails and 295 not in tails  # the boundaries nearest the end (not too near it)
    assert {100, 200} <= tails  # a rung moved down to each, within its gap to the next
    unsnapped = {300 - o for o in LADDER_OFFSETS if o < 300}
    assert tails - {100, 200, 280} <= unsnapped


# ----------------------------------------------------------------- leases under concurrency


def hold(pool, prompt, hints=()):
    """Check a lease out and prefill it, as a running request would; commit it later with `release`."""
    lease = pool.lease(prompt, hints)
    taken = []
    for pos in range(lease.plan.restore_point + 1, len(prompt) + 1):
        lease.cache.append(prompt[pos - 1])
        kind = lease.plan.checkpoints_to_take.get(pos)
        if kind is not None and pool.ops.needs_snapshots:
            taken.append(TakenCheckpoint(pos, kind, pool.ops.snapshot(lease.cache, pos)))
    return lease, taken


def release(pool, lease, taken, prompt):
    pool.commit(lease, list(prompt), len(prompt), taken)


def test_a_sequence_in_use_is_never_evicted_even_over_budget():
    pool = make_pool(capacity=10**9)
    run(pool, LONG_SYSTEM + [1] * 20, generated=[5])
    continuing = LONG_SYSTEM + [1] * 20 + [5, 6, 6]
    lease, taken = hold(pool, continuing)
    assert lease.plan.in_place and lease.sequence.pins == 1
    pool.capacity_bytes = 0
    pool.evict_to(0)  # over budget: everything unpinned goes, the running one stays
    assert lease.sequence.key in pool.sequences and pool.stats().pinned_sequences == 1
    assert pool.stats().leases == 1 and pool.stats().pinned_checkpoints == 0  # restored at its end: no checkpoint
    run(pool, [7] * 30)  # another request commits (and evicts) meanwhile
    assert lease.sequence.key in pool.sequences
    pool.capacity_bytes = 10**9
    release(pool, lease, taken, continuing)
    stats = pool.stats()
    assert stats.leases == 0 and stats.pinned_sequences == 0 and stats.pinned_checkpoints == 0
    assert pool.plan(continuing + [9]).restore_point == len(continuing)


def test_a_sequence_in_use_is_neither_taken_over_nor_forked_by_a_second_request():
    pool = make_pool()
    run(pool, LONG_SYSTEM, generated=[5])
    first, taken = hold(pool, LONG_SYSTEM + [5, 1])
    second = pool.lease(LONG_SYSTEM + [5, 1])  # the same prompt at the same time
    assert second.sequence is None and second.plan.source is None and second.plan.restore_point == 0
    release(pool, first, taken, LONG_SYSTEM + [5, 1])
    pool.discard(second)
    assert pool.stats().leases == 0


def test_a_lease_is_handed_back_once():
    pool = make_pool()
    lease, taken = hold(pool, SYSTEM)
    release(pool, lease, taken, SYSTEM)
    import pytest

    with pytest.raises(RuntimeError):
        pool.discard(lease)


def check_consistency(pool):
    """Byte and count bookkeeping, trie entry counts, and the eviction index's promise."""
    nodes = list(pool.trie.nodes())
    recount = sum(s.nbytes for s in pool.sequences.values()) + sum(c.nbytes for n in nodes for c in n.checkpoints.values())
    assert pool.nbytes == recount
    assert pool.stats().checkpoints == sum(len(n.checkpoints) for n in nodes)
    for node in [pool.trie.root, *nodes]:
        assert node.entry_count == sum(1 for _ in pool.trie.entries_under(node))
        for ckpt in node.checkpoints.values():
            assert ckpt.node is node
    for seq in pool.sequences.values():
        assert seq.key in seq.node.entries and len(seq.tokens) == seq.node.depth
        # Its anchors are stored checkpoints that know it (none kept alive after it left the pool).
        for ckpt in seq.anchors:
            assert ckpt.node is not None and seq.key in ckpt.anchor_of, (seq.key, ckpt)
    for node in nodes:
        for ckpt in node.checkpoints.values():
            assert all(ckpt in pool.sequences[key].anchors for key in ckpt.anchor_of)
    # Every evictable unit is filed under a key no higher than its priority now, so the heap's
    # top is always the true lowest priority.
    index = pool._index
    for unit in pool._units():
        current = pool._priority(unit)
        if current is None:
            continue
        filed = index._filed.get(id(unit))
        assert filed is not None and filed <= current, (unit, filed, current)


def test_eviction_structure_stays_consistent_under_random_operations():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    prefixes = [LONG_SYSTEM, list(range(500, 540)), [3] * 70]
    op = st.one_of(
        st.tuples(st.just("run"), st.integers(0, 2), st.lists(st.integers(1, 6), max_size=12), st.integers(0, 3)),
        st.tuples(st.just("hold"), st.integers(0, 2), st.lists(st.integers(1, 6), max_size=12), st.integers(0, 3)),
        st.tuples(st.just("release"), st.integers(0, 5), st.booleans(), st.integers(0, 0)),
        st.tuples(st.just("evict"), st.integers(0, 100), st.booleans(), st.integers(0, 0)),
    )

    @settings(max_examples=120, deadline=None)
    @given(st.booleans(), st.lists(op, min_size=1, max_size=40))
    def scenario(needs_snapshots, ops):
        pool = make_pool(needs_snapshots=needs_snapshots, capacity=900 * BYTES_PER_TOKEN, interval=8, max_lattice=4)
        held = []
        histories: list[list[int]] = []
        for kind, a, b, c in ops:
            if kind in ("run", "hold"):
                base = histories[a % len(histories)] if histories and c % 2 else prefixes[a]
                prompt = base + b + [7]
                hints = [len(prefixes[a])] if len(prefixes[a]) < len(prompt) else []
                if kind == "run":
                    run(pool, prompt, generated=[c + 1], hints=hints)
                    histories.append(prompt + [c + 1])
                else:
                    held.append((hold(pool, prompt, hints), prompt))
                    pinned = held[-1][0][0].sequence
                    if pinned is not None:
                        assert pinned.pins == 1
            elif kind == "release" and held:
                (lease, taken), prompt = held.pop(a % len(held))
                if b:
                    release(pool, lease, taken, prompt)
                else:
                    pool.discard(lease)
            elif kind == "evict":
                pool.evict_to(pool.nbytes * a // 100)
            for (lease, _), _ in held:  # what a running request holds is still there
                if lease.sequence is not None:
                    assert pool.sequences.get(lease.sequence.key) is lease.sequence
            check_consistency(pool)
        for (lease, taken), prompt in held:
            release(pool, lease, taken, prompt)
        check_consistency(pool)
        assert pool.stats().leases == 0 and pool.stats().pinned_sequences == 0
        assert pool.nbytes <= pool.capacity_bytes

    scenario()


def test_prefixes_are_shared_only_inside_a_namespace():
    for needs_snapshots in (True, False):
        pool = make_pool(needs_snapshots)
        secret = SYSTEM + [5, 6, 7, 8]
        run(pool, secret, generated=[1, 2], namespace="a" * 32)
        # Another namespace sees nothing of it, not even the shared first tokens.
        assert pool.plan(secret, namespace="b" * 32).match_length == 0
        assert pool.plan(secret).match_length == 0  # nor the default one
        plan = run(pool, SYSTEM + [9, 9], namespace="b" * 32)
        assert plan.restore_point == 0 and plan.source is None
        # Inside its own namespace it restores as ever, and the other's copy stays its own.
        assert pool.plan(secret + [1, 2, 3], namespace="a" * 32).restore_point >= len(secret)
        assert pool.plan(SYSTEM + [9, 9, 4], namespace="b" * 32).restore_point > 0
        assert pool.plan(SYSTEM + [9, 9, 4], namespace="a" * 32).restore_point <= len(SYSTEM)
        assert {s.namespace for s in pool.sequences.values()} == {"a" * 32, "b" * 32}
        pool.evict_to(0)
        assert pool.nbytes == 0 and not pool.trie.root.children  # eviction prunes every namespace's paths


def test_units_that_left_the_pool_hold_nothing_while_the_heap_still_lists_them():
    """Dead heap entries are dropped lazily; they must not keep snapshots or caches alive meanwhile."""
    pool = make_pool(capacity=2_000 * BYTES_PER_TOKEN, interval=8)
    for i in range(60):
        run(pool, SYSTEM + [i % 7, i, i + 1] * 20, generated=[1, 2, 3], hints=[len(SYSTEM)])
    dead = [unit for _, _, unit in pool._index._heap if not pool._alive(unit)]
    assert dead, "the test needs evictions"
    for unit in dead:
        if hasattr(unit, "cache"):
            assert unit.cache is None and unit.tokens == []
        else:
            assert unit.snapshot is None and unit.logits is None

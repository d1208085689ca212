"""The checkpoint pool: stored sequences, checkpoints along them, lookup, eviction.

No MLX here: cache objects are opaque and handled through `ops` (see
`worker.cache_adapters.ModelCacheOps`), so the lookup and eviction logic is
tested alone with small fakes.

- A *sequence* is a live model cache holding the full-attention KV of its tokens.
  It is the only place KV lives: checkpoints never copy KV.
- A *checkpoint* is a snapshot of the non-rewindable layers (recurrent state,
  sliding windows) at one token position, kept on the trie path of that prefix.
- A lookup picks the restore point: the deepest position p <= the common prefix
  where every layer is exactly restorable (KV trimmed to p, the rest from a
  checkpoint at p), leaving one prompt token to compute unless logits were stored.
- Continuing a sequence reuses its cache in place (no copy); a prompt that
  leaves a stored prompt part-way *forks*: the new sequence gets its own prefix.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from protocol.messages import PoolStats, RestoreKind
from worker.eviction import LANDMARKS, WHOLE, EvictionIndex, EvictionPolicy, UnitFacts, checkpoint_tier
from worker.placement import DEFAULT_CHECKPOINT_INTERVAL, SnapshotBudget, place
from worker.trie import Match, Node, TokenTrie

log = logging.getLogger("mlx_cache_proxy.worker")

# A shared prefix shorter than this (a chat template's header) is not worth keeping a sequence for.
MIN_SHARED_PREFIX = 64


class CacheOps(Protocol):
    needs_snapshots: bool

    def new_cache(self) -> Any: ...
    def snapshot(self, cache: Any, position: int) -> Any: ...  # has .nbytes
    def restore(self, cache: Any, position: int, snap: Any) -> Any: ...
    def fork(self, cache: Any, position: int, snap: Any) -> Any: ...
    def shrink(self, cache: Any, position: int, snap: Any) -> Any: ...
    def compact(self, cache: Any) -> Any: ...
    def nbytes(self, cache: Any) -> int: ...


@dataclass
class Checkpoint:
    position: int
    kind: RestoreKind
    snapshot: Any  # None for models whose layers all rewind
    logits: Any = None  # the logits after `position` tokens, when stored (prompt ends)
    logits_nbytes: int = 0
    last_used: int = 0
    node: Node | None = None  # where it sits in the trie (None: not stored, or gone)
    pins: int = 0  # running requests holding it: never evicted while > 0
    hits: int = 0  # times restored from
    anchor_of: set[int] = field(default_factory=set)  # keys of sequences it is an anchor of (_anchor)

    @property
    def nbytes(self) -> int:
        return (self.snapshot.nbytes if self.snapshot is not None else 0) + self.logits_nbytes


@dataclass
class Sequence:
    """A stored sequence: a live cache that has consumed exactly `tokens`."""

    key: int
    tokens: list[int]
    cache: Any
    prompt_end: int  # where its latest prompt ended; the rest is generated output
    nbytes: int = 0
    last_used: int = 0
    node: Node | None = None
    prefix_only: bool = False  # cut back to a prefix other sequences share: evicted after tails
    compacted: bool = False  # its KV buffers hold exactly its tokens
    pins: int = 0  # running requests holding it (taken over in place): never evicted while > 0
    hits: int = 0  # times taken over
    mark: Node | None = None  # the node marking its prompt end (for in-place lookups), or an ancestor after a split
    anchors: list[Checkpoint] = field(default_factory=list)  # checkpoints that leave only with it (_anchor)
    namespace: str = ""  # its cache namespace: only prompts of the same one restore from it


@dataclass
class RestorePlan:
    """What a lookup decided for one prompt."""

    prompt: list[int]
    restore_point: int = 0
    kind: RestoreKind = RestoreKind.NONE
    source: Sequence | None = None
    in_place: bool = False  # take over `source` (its tail beyond the prompt is only generated output)
    checkpoint: Checkpoint | None = None
    match: Match | None = None  # valid until the pool changes: check a plan out at once
    match_length: int = 0  # tokens shared with the deepest stored path
    checkpoints_to_take: dict[int, RestoreKind] = field(default_factory=dict)
    hints: tuple[int, ...] = ()  # the message ends the proxy sent
    namespace: str = ""  # looked up, and stored, in this cache namespace only

    @property
    def logits(self) -> Any:
        return self.checkpoint.logits if self.checkpoint is not None and self.restore_point == len(self.prompt) else None


@dataclass
class Lease:
    """A cache checked out of the pool for one request, and what it pins there until it ends.

    The engine holds it as an opaque handle: it uses `cache` and `plan` and hands
    the lease back through `commit` or `discard`, which unpin.
    """

    cache: Any
    sequence: Sequence | None  # the stored sequence taken over in place, if any (pinned)
    plan: RestorePlan
    from_disk: bool = False
    pinned: list[Checkpoint] = field(default_factory=list)
    open: bool = True


@dataclass
class TakenCheckpoint:
    position: int
    kind: RestoreKind
    snapshot: Any
    logits: Any = None
    logits_nbytes: int = 0


class CheckpointPool:
    def __init__(
        self,
        ops: CacheOps,
        capacity_bytes: int,
        checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL,
        max_lattice_points: int = 16,
        on_evict: Callable[[Sequence, list[Checkpoint]], None] | None = None,
        policy: EvictionPolicy | None = None,
        snapshot_sizes: tuple[float, float] = (0.0, 0.0),  # KV bytes per token, bytes of one snapshot
        lattice_by_bytes: bool = True,  # False: the interval was chosen; only max_lattice_points bounds it
    ):
        self.ops = ops
        self.on_evict = on_evict  # sees each evicted sequence and the checkpoints on its path
        self.capacity_bytes = capacity_bytes
        self.checkpoint_interval = checkpoint_interval
        self.max_lattice_points = max_lattice_points
        self.trie = TokenTrie()
        self.sequences: dict[int, Sequence] = {}
        self._keys = itertools.count(1)
        self._clock = itertools.count(1)
        self.evictions = 0
        self._checkpoint_bytes = 0
        self._checkpoint_count = 0
        self._sequence_bytes = 0
        self._leases: list[Lease] = []
        self.policy = policy or EvictionPolicy()
        self._index = EvictionIndex(self._priority, self._alive)
        self._kv_bytes_per_token = 1.0  # learnt from the sequences committed (scores count bytes in tokens of KV)
        self.budget = SnapshotBudget(*snapshot_sizes, max_lattice_points, lattice_by_bytes)  # what a sequence spends on snapshots

    # ------------------------------------------------------------- figures

    @property
    def nbytes(self) -> int:
        return self._checkpoint_bytes + self._sequence_bytes

    def stats(self) -> PoolStats:
        return PoolStats(
            bytes=self.nbytes,
            capacity_bytes=self.capacity_bytes,
            sequences=len(self.sequences),
            checkpoints=self._checkpoint_count,
            evictions=self.evictions,
            leases=len(self._leases),
            pinned_sequences=sum(1 for s in self.sequences.values() if s.pins > 0),
            pinned_checkpoints=len({id(c) for lease in self._leases for c in lease.pinned}),
        )

    # ------------------------------------------------------------- lookup

    def lattice_stride(self, length: int) -> int:
        """Lattice spacing for a sequence of `length` tokens: doubles so the count stays bounded."""
        stride = self.checkpoint_interval
        while length // stride > self.budget.lattice_points(length):
            stride *= 2
        return stride

    def plan(
        self, prompt: list[int], hints: Iterable[int] = (), splits: Iterable[tuple[int, int]] = (), namespace: str = ""
    ) -> RestorePlan:
        match = self.trie.match(prompt, namespace)
        plan = RestorePlan(prompt, match=match, match_length=match.length, namespace=namespace)
        self._choose_restore_point(plan, match)
        if not self._continue_at_an_end(plan, match) and plan.restore_point > 0:
            self._choose_source(plan, match)
        if plan.source is None:  # nothing usable: a cold start
            plan.restore_point, plan.kind, plan.checkpoint = 0, RestoreKind.NONE, None
        plan.hints = tuple(sorted(hints))
        plan.checkpoints_to_take = self._checkpoints_to_take(plan, plan.hints, splits)
        return plan

    def _choose_restore_point(self, plan: RestorePlan, match: Match) -> None:
        n = len(plan.prompt)
        for depth, ckpt in match.checkpoints(n):
            if depth < n or ckpt.logits is not None:
                if self.ops.needs_snapshots or depth >= min(match.length, n - 1):
                    plan.restore_point, plan.kind, plan.checkpoint = depth, ckpt.kind, ckpt
                break
        if not self.ops.needs_snapshots and plan.restore_point < min(match.length, n - 1):
            plan.restore_point, plan.kind, plan.checkpoint = min(match.length, n - 1), RestoreKind.TRIM, None

    @staticmethod
    def _first_message_marker(plan: RestorePlan, taken: list[TakenCheckpoint], end: int) -> list[TakenCheckpoint]:
        """A model whose layers all rewind keeps no states, but where its first message ends is worth
        a mark (no bytes): an evicted sequence is cut back to it (`_first_message_point`)."""
        first = plan.hints[0] if plan.hints else 0
        if not MIN_SHARED_PREFIX <= first <= end or any(t.position == first for t in taken):
            return []
        return [TakenCheckpoint(first, RestoreKind.HINT, None)]

    def _keep_prefix_end(self, seq: Sequence, tick: int) -> None:
        """Before a kept prefix (a system prompt) is continued in place, snapshot its end as a hint.

        While it stood alone its live cache was that state; once a request extends
        it, the next conversation sharing the prefix forks from this checkpoint.
        """
        node = self.trie.node_covering(seq.node, len(seq.tokens))
        if len(seq.tokens) not in node.checkpoints:
            snapshot = self.ops.snapshot(seq.cache, len(seq.tokens))
            self._add_checkpoint(seq, Checkpoint(len(seq.tokens), RestoreKind.HINT, snapshot, last_used=tick))

    def _continue_at_an_end(self, plan: RestorePlan, match: Match) -> bool:
        """Take over a stored sequence whose every token starts the prompt, at its end, if that is deeper.

        Its live cache is the state at its end, so a sequence keeps no snapshot
        there (a hybrid's generation end costs nothing beyond the sequence).
        """
        if not self.ops.needs_snapshots:
            return False
        limit = min(match.length, len(plan.prompt) - 1)
        for node in reversed(match.path):
            if node.depth > limit or not node.entries:
                continue
            if node.depth <= plan.restore_point:
                return False
            for key in node.entries:
                seq = self.sequences[key]
                if not seq.pins:
                    plan.restore_point, plan.kind, plan.checkpoint = node.depth, RestoreKind.GENERATION_END, None
                    plan.source, plan.in_place = seq, True
                    return True
        return False

    def _choose_source(self, plan: RestorePlan, match: Match) -> None:
        """A stored sequence holding the prefix up to the restore point, found without a walk of the pool.

        Preferred: one to take over in place, i.e. whose only unshared part is
        generated output (a conversation going on; nothing of value is lost):
        its prompt end is marked on the matched path. Else any sequence under the
        restore point to fork from. A sequence a running request took over is
        neither taken over nor forked: the request owns its cache.
        """
        p = plan.restore_point
        best_in_place, best_shared = None, -1
        for node in match.path:
            for key, prompt_end in node.marks.items():
                if prompt_end > match.length:
                    continue
                seq = self.sequences[key]
                if seq.pins:
                    continue
                shared = match.branch_depth(seq.node)
                if shared >= max(p, seq.prompt_end) and shared > best_shared:
                    best_in_place, best_shared = seq, shared
        if best_in_place is not None:
            plan.source, plan.in_place = best_in_place, True
            return
        plan.source = self._any_unpinned_under(match.node_at(p))

    def _any_unpinned_under(self, node: Node | None) -> Sequence | None:
        """A stored sequence under `node` no request holds (the walk skips only what is pinned)."""
        stack = [node] if node is not None else []
        while stack:
            n = stack.pop()
            for key in n.entries:
                seq = self.sequences[key]
                if not seq.pins:
                    return seq
            stack.extend(c for c in n.children.values() if c.entry_count)
        return None

    def plan_restored(
        self,
        prompt: list[int],
        hints: Iterable[int],
        checkpoint: Checkpoint,
        splits: Iterable[tuple[int, int]] = (),
        namespace: str = "",
    ) -> RestorePlan:
        """A plan for a cache restored elsewhere (the disk tier) at `checkpoint.position`."""
        plan = RestorePlan(prompt, checkpoint.position, checkpoint.kind, None, False, checkpoint, namespace=namespace)
        plan.match_length = checkpoint.position
        plan.hints = tuple(sorted(hints))
        plan.checkpoints_to_take = self._checkpoints_to_take(plan, plan.hints, splits)
        return plan

    def _checkpoints_to_take(self, plan: RestorePlan, hints: Iterable[int], splits: Iterable[tuple[int, int]]) -> dict[int, RestoreKind]:
        n, p = len(plan.prompt), plan.restore_point
        placement = place(
            n,
            p,
            lattice_stride=self.lattice_stride(n),
            hints=hints,
            splits=sorted(splits),  # (position, SplitKind)
            # A prompt leaving a stored one within a template header shares too little to keep a state for.
            fork_at=plan.match_length if p < plan.match_length < n and plan.match_length >= MIN_SHARED_PREFIX else 0,
            budget=self.budget.extra(n),
            snapshots=self.ops.needs_snapshots,
        )
        wanted = dict(placement.positions)
        if p == n and plan.logits is not None:
            del wanted[n]  # restored with its logits: nothing to take there
        return wanted

    # ------------------------------------------------------------- leases

    def lease(
        self, prompt: list[int], hints: Iterable[int] = (), splits: Iterable[tuple[int, int]] = (), namespace: str = ""
    ) -> Lease:
        """Plan and check out in one step: the cache restored to the deepest usable point, pinned."""
        return self.checkout(self.plan(prompt, hints, splits, namespace))

    def lease_restored(
        self,
        prompt: list[int],
        hints: Iterable[int],
        cache: Any,
        checkpoint: Checkpoint,
        splits: Iterable[tuple[int, int]] = (),
        namespace: str = "",
    ) -> Lease:
        """A lease over a cache restored elsewhere (the disk tier, a running request's prefix)."""
        lease = Lease(cache, None, self.plan_restored(prompt, hints, checkpoint, splits, namespace))
        self._leases.append(lease)
        return lease

    def checkout(self, plan: RestorePlan) -> Lease:
        """The cache restored to a plan made just now (no pool change in between), ready for prefill."""
        tick = next(self._clock)
        p, source = plan.restore_point, plan.source
        snap = plan.checkpoint.snapshot if plan.checkpoint is not None else None
        pinned = []
        if plan.checkpoint is not None:
            plan.checkpoint.last_used = tick
            plan.checkpoint.hits += 1
            self._pin(plan.checkpoint)
            pinned.append(plan.checkpoint)
        if source is None:
            lease = Lease(self.ops.new_cache(), None, plan, pinned=pinned)
        elif not plan.in_place:
            # A fork uses the shared prefix only (its checkpoint was refreshed above): the
            # source's own tail is no more recently used than before.
            lease = Lease(self.ops.fork(source.cache, p, snap), None, plan, pinned=pinned)
        else:
            if source.pins:
                raise RuntimeError("a plan took over a sequence another request holds")
            source.last_used = tick
            source.hits += 1
            at_its_end = snap is None and p == len(source.tokens)  # its live cache is the state at p
            if at_its_end and source.prefix_only and self.ops.needs_snapshots:
                self._keep_prefix_end(source, tick)
            source.pins += 1
            self._index.forget(source)
            # Take the sequence over: its tail beyond p goes now, the rest is re-attached at commit.
            # Nothing here is proportional to the stored length: KV is trimmed by its offset.
            cache = source.cache if at_its_end else self.ops.restore(source.cache, p, snap)
            source.cache = None  # the request owns it until commit (no second reference keeps old KV alive)
            del source.tokens[p:]
            self._move_to(source, self.trie.node_ending_at(plan.match, p))
            lease = Lease(cache, source, plan, pinned=pinned)
        self._leases.append(lease)
        return lease

    def commit(self, lease: Lease, tokens: list[int], prompt_end: int, taken: list[TakenCheckpoint]) -> None:
        """Store the cache of a finished (or aborted) request, which has consumed `tokens`; unpin."""
        self._close(lease)
        if not tokens:  # aborted before its first token: nothing to keep
            if lease.sequence is not None:
                self._drop_sequence(lease.sequence)
            return
        tick = next(self._clock)
        seq = lease.sequence
        if seq is None:
            seq = Sequence(next(self._keys), [], lease.cache, prompt_end, namespace=lease.plan.namespace)
            self.sequences[seq.key] = seq
        seq.cache, seq.prompt_end, seq.last_used = lease.cache, prompt_end, tick
        seq.prefix_only = seq.compacted = False
        self._set_nbytes(seq, self.ops.nbytes(seq.cache))
        if self._kv_bytes_per_token == 1.0:
            self._kv_bytes_per_token = max(1.0, seq.nbytes / len(tokens))
        self._move(seq, list(tokens))
        if not self.ops.needs_snapshots:
            taken = [*taken, *self._first_message_marker(lease.plan, taken, len(tokens))]
        for t in taken:
            if t.position <= len(tokens):
                self._add_checkpoint(seq, Checkpoint(t.position, t.kind, t.snapshot, t.logits, t.logits_nbytes, tick))
        self._thin_lattice(seq)
        self._drop_superseded(seq, prompt_end, tick)
        self._anchor(seq)
        self._cap_snapshots(seq)
        self._touch(seq.node)
        self.evict_to(self.capacity_bytes)

    def discard(self, lease: Lease) -> None:
        """Forget a checked-out cache whose state is unknown (the request failed); unpin."""
        self._close(lease)
        if lease.sequence is not None:
            self._drop_sequence(lease.sequence)

    def _close(self, lease: Lease) -> None:
        if not lease.open:
            raise RuntimeError("a lease was handed back twice")
        lease.open = False
        self._leases.remove(lease)
        for ckpt in lease.pinned:
            ckpt.pins -= 1
            if ckpt.node is not None:  # still stored (a path pruned under it takes it along)
                self._index.file(ckpt)
            elif ckpt.pins == 0:
                _let_go(ckpt)
        if lease.sequence is not None:
            lease.sequence.pins -= 1
            self._index.file(lease.sequence)

    def _pin(self, ckpt: Checkpoint) -> None:
        ckpt.pins += 1
        self._index.forget(ckpt)

    @property
    def leases(self) -> int:
        return len(self._leases)

    def _add_checkpoint(self, seq: Sequence, ckpt: Checkpoint) -> None:
        """File `ckpt` in the node of `seq`'s path whose range holds its position (no node is split for it)."""
        node = self.trie.node_covering(seq.node, ckpt.position)
        old = node.checkpoints.get(ckpt.position)
        if old is not None:
            # Same prefix, same state: keep the one with logits, refresh its age.
            if old.logits is None and ckpt.logits is not None:
                old.logits, old.logits_nbytes = ckpt.logits, ckpt.logits_nbytes
                self._checkpoint_bytes += ckpt.logits_nbytes
            old.last_used = ckpt.last_used
            self._index.file(old)
            return
        ckpt.node = node
        node.checkpoints[ckpt.position] = ckpt
        self._checkpoint_bytes += ckpt.nbytes
        self._checkpoint_count += 1
        self._index.file(ckpt)
        self._refile_above(node, ckpt)

    def _anchor(self, seq: Sequence) -> None:
        """Hold the checkpoints without which `seq` is of little use: they leave only with it.

        - The deepest checkpoint at or before its prompt end: the next turn restores
          there when the template re-renders the generated reply differently.
        - Where its first message ends (a system prompt, at least MIN_SHARED_PREFIX
          tokens): what other conversations share, and what an evicted sequence is
          cut back to (`_first_message_point`).
        """
        self._release_anchors(seq)
        if seq.node is None:
            return
        held = []
        if self.ops.needs_snapshots and seq.prompt_end > 0:  # (every position of a rewinding model restores)
            node = self.trie.node_covering(seq.node, seq.prompt_end)
            at_prompt_end = self._deepest_below(node, seq.prompt_end + 1, lambda c: c.snapshot is not None)
            if at_prompt_end is not None:
                held.append(at_prompt_end)
        first = self._first_message_point(seq, at_most=len(seq.tokens))
        if first is not None and first[1] not in held:
            held.append(first[1])
        for ckpt in held:
            ckpt.anchor_of.add(seq.key)
            self._index.file(ckpt)
        seq.anchors = held

    def _release_anchors(self, seq: Sequence) -> None:
        held, seq.anchors = seq.anchors, []
        for ckpt in held:
            ckpt.anchor_of.discard(seq.key)
            if ckpt.node is not None:
                self._index.file(ckpt)

    def _refile_above(self, node: Node, ckpt: Checkpoint) -> None:
        """Re-file the checkpoints for which `ckpt`, just added, is the next one down: they now save less.

        Those deeper in its node, and on each branch below down to the first
        checkpoint that would serve instead (a landmark, for a landmark).
        """
        landmark = ckpt.kind in LANDMARKS

        def shields(n: Node, above: int = -1) -> bool:
            return any(d > above and (not landmark or c.kind in LANDMARKS) for d, c in n.checkpoints.items())

        for depth, other in node.checkpoints.items():
            if depth > ckpt.position:
                self._index.file(other)
        if shields(node, ckpt.position):
            return
        stack = list(node.children.values())
        while stack:
            n = stack.pop()
            for other in n.checkpoints.values():
                self._index.file(other)
            if not shields(n):
                stack.extend(n.children.values())

    def _thin_lattice(self, seq: Sequence) -> None:
        stride = self.lattice_stride(len(seq.tokens))
        for node in self.trie.path_to(seq.node):
            for depth, ckpt in list(node.checkpoints.items()):
                if ckpt.kind is RestoreKind.LATTICE and depth % stride and not ckpt.pins:
                    self._forget_checkpoint(node, depth)

    def _drop_superseded(self, seq: Sequence, prompt_end: int, tick: int) -> None:
        """Once a prompt has gone past them, generation ends, earlier tails and stored logits serve no one.

        Earlier tails: the ladder of an earlier prompt end this prompt went past
        (a conversation going on). A prompt that left an earlier one before its
        end (an edit, another question) keeps that prompt's ladder: the next edit
        restores from it. A later prompt that branches at a passed message end
        restores from the hint the proxy sent for that spot.
        """
        path = self.trie.path_to(seq.node)
        passed = max(
            (d for node in path for d, c in node.checkpoints.items()
             if d < prompt_end and c.kind in (RestoreKind.PROMPT_END, RestoreKind.GENERATION_END)),
            default=0,
        )  # fmt: skip
        for node in path:
            for depth, ckpt in list(node.checkpoints.items()):
                if depth >= prompt_end or ckpt.pins:
                    continue
                if ckpt.kind is RestoreKind.GENERATION_END:
                    self._forget_checkpoint(node, depth)
                elif ckpt.kind is RestoreKind.TAIL and depth < passed and ckpt.last_used < tick:
                    self._forget_checkpoint(node, depth)  # an earlier prompt's tail
                elif ckpt.logits is not None:
                    self._checkpoint_bytes -= ckpt.logits_nbytes
                    ckpt.logits, ckpt.logits_nbytes = None, 0

    def snapshot_cap(self, length: int) -> int:
        """Snapshots one sequence may keep on its own path: its lattice, and twice one prompt's extras."""
        return self.budget.lattice_points(length) + 2 * self.budget.extra(length) + 1

    def _cap_snapshots(self, seq: Sequence) -> None:
        """Keep a sequence's own checkpoints (not shared, not its anchor) within `snapshot_cap`, lowest score out."""
        if not self.ops.needs_snapshots:
            return
        own = []
        for ckpt in self.checkpoints_on_path(seq):
            if ckpt.pins or ckpt.snapshot is None:
                continue
            protects, anchor, facts = self.checkpoint_facts(ckpt)
            if not protects and not anchor:
                own.append((self.policy.score(facts), ckpt.position, ckpt))
        excess = len(own) - self.snapshot_cap(len(seq.tokens))
        for _, _, ckpt in sorted(own, key=lambda t: t[:2])[: max(0, excess)]:
            self._forget_checkpoint(ckpt.node, ckpt.position)

    # ------------------------------------------------------------- eviction

    def evict_to(self, target_bytes: int) -> int:
        """Evict until the pool holds <= target_bytes (or only pinned units are left); returns bytes freed.

        The order is the policy's (`worker.eviction.EvictionPolicy`); what a
        running request holds is never touched.
        """
        before = self.nbytes
        while self.nbytes > target_bytes:
            victim = self._index.pop()
            if victim is None:
                break
            if isinstance(victim, Sequence):
                if not victim.compacted:
                    self._compact(victim)
                    continue
                self.evictions += 1
                self._evict_sequence(victim)
            else:
                self.evictions += 1
                self._forget_checkpoint(victim.node, victim.position)
        if self._index.stale(len(self.sequences) + self._checkpoint_count):
            self._index.rebuild(self._units())
        return before - self.nbytes

    def _units(self) -> list[Any]:
        units: list[Any] = list(self.sequences.values())
        units += [c for node in self.trie.nodes() for c in node.checkpoints.values()]
        return units

    # What the policy asks (worker.eviction.PoolView).

    @property
    def disk_tier(self) -> bool:
        return self.on_evict is not None

    def _priority(self, unit: Any):
        if unit.pins:
            return None
        if isinstance(unit, Sequence):
            return self.policy.sequence_priority(self, unit)
        return self.policy.checkpoint_priority(self, unit)

    def _alive(self, unit: Any) -> bool:
        if isinstance(unit, Sequence):
            return self.sequences.get(unit.key) is unit
        return unit.node is not None

    def sequence_facts(self, seq: Sequence) -> tuple[bool, bool, bool, UnitFacts]:
        saved = max(1, len(seq.tokens) - self._shared_depth(seq))
        # Evicting it frees the part it does not share (it is cut back to the shared prefix).
        held = seq.nbytes * saved / max(1, len(seq.tokens)) / self._kv_bytes_per_token
        facts = UnitFacts(saved, held, seq.last_used, seq.hits, WHOLE)
        return seq.compacted, self._redundant(seq), seq.prefix_only, facts

    def checkpoint_facts(self, ckpt: Checkpoint) -> tuple[bool, bool, UnitFacts]:
        protects = self._protects_a_prefix(ckpt.node)
        anchor = not protects and (bool(ckpt.anchor_of) or self._is_anchor(ckpt))
        saved = max(1, ckpt.position - self._lower_restore_point(ckpt))
        held = ckpt.nbytes / self._kv_bytes_per_token
        facts = UnitFacts(saved, held, ckpt.last_used, ckpt.hits, checkpoint_tier(ckpt.kind))
        return protects, anchor, facts

    def _lower_restore_point(self, ckpt: Checkpoint) -> int:
        """The next checkpoint below `ckpt` on its path that would serve instead (0: none).

        For a landmark, only landmarks count: the lattice and the ladder below it thin first.
        """
        landmark = ckpt.kind in LANDMARKS
        lower = self._deepest_below(ckpt.node, ckpt.position, lambda c: not landmark or c.kind in LANDMARKS)
        return lower.position if lower is not None else 0

    def _deepest_below(self, node: Node | None, below: int, accept: Callable[[Checkpoint], bool]) -> Checkpoint | None:
        """The deepest checkpoint `accept` takes at depth < `below`, from `node` up the path to the root."""
        while node is not None and node is not self.trie.root:
            depths = [d for d, c in node.checkpoints.items() if d < below and accept(c)]
            if depths:
                return node.checkpoints[max(depths)]
            node = node.parent
        return None

    def _shared_depth(self, seq: Sequence) -> int:
        """How many of `seq`'s tokens other stored sequences share (kept if it goes), or 0 if too few."""
        node = seq.node.parent if seq.node is not None else None
        while node is not None and node is not self.trie.root:
            if node.entry_count > 1:
                return node.depth if node.depth >= MIN_SHARED_PREFIX else 0
            node = node.parent
        return 0

    def _touch(self, node: Node | None) -> None:
        """Re-file the units on the path to `node`: the change there may have lowered their priority."""
        for path_node in self.trie.path_to(node) if node is not None else ():
            for key in path_node.entries:
                self._index.file(self.sequences[key])
            for ckpt in path_node.checkpoints.values():
                self._index.file(ckpt)

    def _touch_surviving(self, path: list[Node]) -> None:
        """`_touch` the deepest node of `path` that is still in the trie (pruning may have cut the rest)."""
        alive = [n for n in path if n.parent is not None]
        if alive:
            self._touch(alive[-1])

    def _is_anchor(self, ckpt: Checkpoint) -> bool:
        """Is `ckpt` the deepest checkpoint on the path of some stored sequence (its only restore point)?

        A walk below its node that stops at the first deeper checkpoint of each branch.
        """
        node, depth = ckpt.node, ckpt.position
        if any(d > depth for d in node.checkpoints):
            return False
        if node.entries and node.depth >= depth:
            return True
        stack = list(node.children.values())
        while stack:
            n = stack.pop()
            if n.checkpoints:
                continue  # every sequence from here down has a deeper restore point
            if n.entries:
                return True
            stack.extend(n.children.values())
        return False

    def _protects_a_prefix(self, node: Node) -> bool:
        """Checkpoints here serve a prefix several sequences share, or one kept after its tail went."""
        if node.entry_count > 1:
            return True
        while node is not None and not node.entries:  # one entry below: follow the one branch to it
            node = next(iter(node.children.values()), None)
        return node is not None and any(self.sequences[key].prefix_only for key in node.entries)

    def _compact(self, seq: Sequence) -> None:
        """Give back the unused room at the end of KV buffers (grown in steps); loses nothing.

        Only under pressure: a compacted sequence copies its KV once more when it grows.
        """
        seq.cache = self.ops.compact(seq.cache)
        seq.compacted = True
        self._set_nbytes(seq, self.ops.nbytes(seq.cache))
        self._index.file(seq)

    def _redundant(self, seq: Sequence) -> bool:
        """Another stored sequence holds every token of this one (and its checkpoints' path)."""
        return bool(seq.node.children) or len(seq.node.entries) > 1

    def _evict_sequence(self, seq: Sequence) -> None:
        redundant = self._redundant(seq)
        if self.on_evict is not None and not redundant:
            self.on_evict(seq, self.checkpoints_on_path(seq))
        keep = None if redundant else self._shared_restore_point(seq) or self._first_message_point(seq)
        if keep is None:
            self._drop_sequence(seq)
        else:
            self._shrink(seq, *keep)

    def _shared_restore_point(self, seq: Sequence) -> tuple[int, Checkpoint | None] | None:
        """The deepest restore point within the prefix `seq` shares with other sequences, if worth keeping."""
        node, branch = seq.node.parent, 0
        while node is not None and node is not self.trie.root:
            if self.trie.entry_count_under(node) > 1:
                branch = node.depth
                break
            node = node.parent
        if branch < MIN_SHARED_PREFIX or branch >= len(seq.tokens):
            return None
        if not self.ops.needs_snapshots:
            return branch, None
        for path_node in reversed(self.trie.path_to(node)):
            for depth in sorted(path_node.checkpoints, reverse=True):
                ckpt = path_node.checkpoints[depth]
                if MIN_SHARED_PREFIX <= depth <= branch and ckpt.snapshot is not None:
                    return depth, ckpt
        return None

    def _first_message_point(self, seq: Sequence, at_most: int | None = None) -> tuple[int, Checkpoint] | None:
        """Where `seq`'s first message ends, if that is a prefix worth keeping (a system prompt).

        Other conversations (agents, new chats) start the same way, as
        mlx_lm.server's "system" segments assume; the hint the proxy sent for
        that message end holds the state there.
        """
        for node in self.trie.path_to(seq.node):
            hints = [
                d for d, c in node.checkpoints.items()
                if c.kind is RestoreKind.HINT and (c.snapshot is not None or not self.ops.needs_snapshots)
            ]  # fmt: skip
            if hints:
                first = min(hints)
                if MIN_SHARED_PREFIX <= first and (first < len(seq.tokens) or first == at_most):
                    return first, node.checkpoints[first]
                return None
        return None

    def _shrink(self, seq: Sequence, position: int, ckpt: Checkpoint | None) -> None:
        """Cut `seq` back to `position`, into buffers of that length: the tail's memory is freed."""
        snapshot = ckpt.snapshot if ckpt is not None else None
        seq.cache = self.ops.shrink(seq.cache, position, snapshot)
        del seq.tokens[position:]
        seq.prompt_end = min(seq.prompt_end, position)
        self._set_nbytes(seq, self.ops.nbytes(seq.cache))
        seq.prefix_only = seq.compacted = True
        self._move_to(seq, self.trie.insert(seq.tokens, seq.namespace))
        self._anchor(seq)
        self._index.file(seq)

    def checkpoints_on_path(self, seq: Sequence) -> list[Checkpoint]:
        return [c for node in self.trie.path_to(seq.node) for c in node.checkpoints.values()]

    def _set_nbytes(self, seq: Sequence, nbytes: int) -> None:
        self._sequence_bytes += nbytes - seq.nbytes
        seq.nbytes = nbytes

    def _drop_sequence(self, seq: Sequence) -> None:
        self._release_anchors(seq)
        path = self.trie.path_to(seq.node) if seq.node is not None else []
        self._detach(seq)
        if self.sequences.pop(seq.key, None) is not None:
            self._sequence_bytes -= seq.nbytes
        self._index.forget(seq)
        seq.cache, seq.tokens, seq.anchors = None, [], []  # the eviction heap may hold it a while yet
        self._touch_surviving(path)

    def _move(self, seq: Sequence, tokens: list[int]) -> None:
        seq.tokens = tokens
        self._move_to(seq, self.trie.insert(tokens, seq.namespace))

    def _move_to(self, seq: Sequence, node: Node) -> None:
        """Re-attach `seq` at `node`, attaching first so the shared path survives pruning."""
        old = seq.node
        self.trie.attach_entry_at(node, seq.key)
        seq.node = node
        self._unmark(seq)
        end = min(seq.prompt_end, node.depth)
        if end > 0:
            seq.mark = self.trie.node_covering(node, end)
            seq.mark.marks[seq.key] = end
        if old is not None and old is not node:
            path = self.trie.path_to(old)
            self._release(self.trie.detach_entry(old, seq.key))
            self._touch_surviving(path)
        self._touch(node)
        self._refile_newly_sharing(seq)

    def _refile_newly_sharing(self, seq: Sequence) -> None:
        """The one sequence that shares more with `seq` than with any other before it came: it saves less now."""
        node = seq.node
        while node is not None and node.entry_count < 2:
            node = node.parent
        if node is None or node.entry_count != 2:
            return
        stack = [node]
        while stack:
            n = stack.pop()
            for key in n.entries:
                if key != seq.key:
                    self._index.file(self.sequences[key])
                    return
            stack.extend(c for c in n.children.values() if c.entry_count)

    def _release(self, dropped: list[Checkpoint]) -> None:
        """Checkpoints that left the trie (forgotten, or pruned with their path) leave the pool's books."""
        for ckpt in dropped:
            self._checkpoint_bytes -= ckpt.nbytes
            self._checkpoint_count -= 1
            ckpt.node = None
            self._index.forget(ckpt)
            self._unanchor(ckpt)
            if ckpt.pins == 0:  # a running request's plan may still read a pinned one
                _let_go(ckpt)

    def _unanchor(self, ckpt: Checkpoint) -> None:
        """`ckpt` is gone: the sequences it anchored drop it (their lists would keep its snapshot alive)."""
        for key in ckpt.anchor_of:
            self.sequences[key].anchors.remove(ckpt)
        ckpt.anchor_of.clear()

    def _unmark(self, seq: Sequence) -> None:
        node = seq.mark
        while node is not None and seq.key not in node.marks:
            node = node.parent  # a split moved the mark up to a new node
        if node is not None:
            del node.marks[seq.key]
        seq.mark = None

    def _detach(self, seq: Sequence) -> None:
        self._unmark(seq)
        if seq.node is None:
            return
        self._release(self.trie.detach_entry(seq.node, seq.key))
        seq.node = None

    def _forget_checkpoint(self, node: Node, depth: int) -> None:
        self._release([self.trie.remove_checkpoint(node, depth)])
        # No unit left saves less for it (the next one up saves more): nothing to re-file.

    def clear(self) -> None:
        for seq in list(self.sequences.values()):
            if not seq.pins:
                self._drop_sequence(seq)


def _let_go(ckpt: Checkpoint) -> None:
    """A checkpoint that left the pool keeps no arrays: the eviction heap drops dead entries lazily,
    and each would otherwise hold its snapshot (tens of MB on a real hybrid) until a rebuild."""
    ckpt.snapshot, ckpt.logits, ckpt.logits_nbytes = None, None, 0

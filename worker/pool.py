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
from worker.trie import Match, Node, TokenTrie

log = logging.getLogger("mlx_cache_proxy.worker")

# A shared prefix shorter than this (a chat template's header) is not worth keeping a sequence for.
MIN_SHARED_PREFIX = 64
# Tail checkpoints, this many tokens before a prompt's end: the next prompt often shares all but
# a short final suffix (the same document, another question), inside one message no hint splits.
TAIL_OFFSETS = (32, 64, 128)


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

    @property
    def logits(self) -> Any:
        return self.checkpoint.logits if self.checkpoint is not None and self.restore_point == len(self.prompt) else None


@dataclass
class Lease:
    """A cache checked out of the pool for one request."""

    cache: Any
    sequence: Sequence | None  # the stored sequence taken over in place, if any
    plan: RestorePlan
    from_disk: bool = False


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
        checkpoint_interval: int = 256,
        max_lattice_points: int = 16,
        on_evict: Callable[[Sequence, list[Checkpoint]], None] | None = None,
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

    # ------------------------------------------------------------- figures

    @property
    def nbytes(self) -> int:
        return self._checkpoint_bytes + sum(s.nbytes for s in self.sequences.values())

    def stats(self) -> PoolStats:
        return PoolStats(
            bytes=self.nbytes,
            capacity_bytes=self.capacity_bytes,
            sequences=len(self.sequences),
            checkpoints=self._checkpoint_count,
            evictions=self.evictions,
        )

    # ------------------------------------------------------------- lookup

    def lattice_stride(self, length: int) -> int:
        """Lattice spacing for a sequence of `length` tokens: doubles so the count stays bounded."""
        stride = self.checkpoint_interval
        while length // stride > self.max_lattice_points:
            stride *= 2
        return stride

    def plan(self, prompt: list[int], hints: Iterable[int] = ()) -> RestorePlan:
        match = self.trie.match(prompt)
        plan = RestorePlan(prompt, match=match, match_length=match.length)
        self._choose_restore_point(plan, match)
        if plan.restore_point > 0:
            self._choose_source(plan, match)
        if plan.source is None:  # nothing usable: a cold start
            plan.restore_point, plan.kind, plan.checkpoint = 0, RestoreKind.NONE, None
        plan.checkpoints_to_take = self._checkpoints_to_take(plan, hints)
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

    def _choose_source(self, plan: RestorePlan, match: Match) -> None:
        node = match.node_at(plan.restore_point)
        candidates = [self.sequences[key] for _, key in self.trie.entries_under(node)]
        if not candidates:
            return
        # Prefer taking over a sequence whose only unshared part is generated output:
        # that is a conversation going on, and nothing of value is lost.
        best_in_place, best_shared = None, -1
        for seq in candidates:
            shared = match.branch_depth(seq.node)
            if shared >= seq.prompt_end and shared > best_shared:
                best_in_place, best_shared = seq, shared
        if best_in_place is not None:
            plan.source, plan.in_place = best_in_place, True
        else:
            plan.source = max(candidates, key=lambda s: s.last_used)

    def plan_restored(self, prompt: list[int], hints: Iterable[int], checkpoint: Checkpoint) -> RestorePlan:
        """A plan for a cache restored elsewhere (the disk tier) at `checkpoint.position`."""
        plan = RestorePlan(prompt, checkpoint.position, checkpoint.kind, None, False, checkpoint)
        plan.match_length = checkpoint.position
        plan.checkpoints_to_take = self._checkpoints_to_take(plan, hints)
        return plan

    def _checkpoints_to_take(self, plan: RestorePlan, hints: Iterable[int]) -> dict[int, RestoreKind]:
        n, p = len(plan.prompt), plan.restore_point
        wanted: dict[int, RestoreKind] = {}
        if self.ops.needs_snapshots:
            stride = self.lattice_stride(n)
            for pos in range((p // stride + 1) * stride, n, stride):
                wanted[pos] = RestoreKind.LATTICE
            for pos in hints:
                if p < pos < n:
                    wanted[pos] = RestoreKind.HINT
            for offset in TAIL_OFFSETS:
                if p < n - offset:
                    wanted.setdefault(n - offset, RestoreKind.TAIL)
            if p < plan.match_length < n:
                wanted[plan.match_length] = RestoreKind.FORK
        if p < n or plan.logits is None:
            wanted[n] = RestoreKind.PROMPT_END
        return wanted

    # ------------------------------------------------------------- checkout / commit

    def checkout(self, plan: RestorePlan) -> Lease:
        """The cache restored to the plan's restore point, ready for prefill."""
        tick = next(self._clock)
        p, source = plan.restore_point, plan.source
        snap = plan.checkpoint.snapshot if plan.checkpoint is not None else None
        if plan.checkpoint is not None:
            plan.checkpoint.last_used = tick
        if source is None:
            return Lease(self.ops.new_cache(), None, plan)
        if not plan.in_place:
            # A fork uses the shared prefix only (its checkpoint was refreshed above): the
            # source's own tail is no more recently used than before.
            return Lease(self.ops.fork(source.cache, p, snap), None, plan)
        source.last_used = tick
        # Take the sequence over: its tail beyond p goes now, the rest is re-attached at commit.
        # Nothing here is proportional to the stored length: KV is trimmed by its offset.
        cache = self.ops.restore(source.cache, p, snap)
        del source.tokens[p:]
        self._move_to(source, self.trie.node_ending_at(plan.match, p))
        return Lease(cache, source, plan)

    def commit(self, lease: Lease, tokens: list[int], prompt_end: int, taken: list[TakenCheckpoint]) -> None:
        """Store the cache of a finished (or aborted) request, which has consumed `tokens`."""
        tick = next(self._clock)
        seq = lease.sequence
        if seq is None:
            seq = Sequence(next(self._keys), [], lease.cache, prompt_end)
            self.sequences[seq.key] = seq
        seq.cache, seq.prompt_end, seq.last_used = lease.cache, prompt_end, tick
        seq.prefix_only = seq.compacted = False
        seq.nbytes = self.ops.nbytes(seq.cache)
        self._move(seq, list(tokens))
        for t in taken:
            if t.position <= len(tokens):
                self._add_checkpoint(seq.tokens, Checkpoint(t.position, t.kind, t.snapshot, t.logits, t.logits_nbytes, tick))
        self._thin_lattice(seq.tokens)
        self._drop_superseded(seq.tokens, prompt_end, tick)
        self.evict_to(self.capacity_bytes)

    def discard(self, lease: Lease) -> None:
        """Forget a checked-out cache whose state is unknown (the request failed)."""
        if lease.sequence is not None:
            self._drop_sequence(lease.sequence)

    def _add_checkpoint(self, tokens: list[int], ckpt: Checkpoint) -> None:
        node = self.trie.insert(tokens[: ckpt.position])
        old = node.checkpoints.get(ckpt.position)
        if old is not None:
            # Same prefix, same state: keep the one with logits, refresh its age.
            if old.logits is None and ckpt.logits is not None:
                old.logits, old.logits_nbytes = ckpt.logits, ckpt.logits_nbytes
                self._checkpoint_bytes += ckpt.logits_nbytes
            old.last_used = ckpt.last_used
            return
        node.checkpoints[ckpt.position] = ckpt
        self._checkpoint_bytes += ckpt.nbytes
        self._checkpoint_count += 1

    def _thin_lattice(self, tokens: list[int]) -> None:
        stride = self.lattice_stride(len(tokens))
        for node in self.trie.path_to(self.trie.insert(tokens)):
            for depth, ckpt in list(node.checkpoints.items()):
                if ckpt.kind is RestoreKind.LATTICE and depth % stride:
                    self._forget_checkpoint(node, depth)

    def _drop_superseded(self, tokens: list[int], prompt_end: int, tick: int) -> None:
        """Once a prompt has gone past them, generation ends, earlier tails and stored logits serve no one.

        A later prompt that branches there restores from the message-boundary
        hint the proxy sends for that spot, a few tokens further on.
        """
        for node in self.trie.path_to(self.trie.insert(tokens[:prompt_end])):
            for depth, ckpt in list(node.checkpoints.items()):
                if depth >= prompt_end:
                    continue
                if ckpt.kind is RestoreKind.GENERATION_END:
                    self._forget_checkpoint(node, depth)
                elif ckpt.kind is RestoreKind.TAIL and ckpt.last_used < tick:
                    self._forget_checkpoint(node, depth)  # an earlier prompt's tail
                elif ckpt.logits is not None:
                    self._checkpoint_bytes -= ckpt.logits_nbytes
                    ckpt.logits, ckpt.logits_nbytes = None, 0

    # ------------------------------------------------------------- eviction

    def evict_to(self, target_bytes: int) -> int:
        """Evict until the pool holds <= target_bytes; returns bytes freed.

        Order: sequences another stored sequence covers (nothing is lost); then,
        least recently used first, unshared checkpoints and the unshared tails of
        sequences (a sequence is cut back to the prefix it shares with others, or
        dropped when it shares none worth keeping); shared prefixes last.
        """
        before = self.nbytes
        self._compact_until(target_bytes)
        while self.nbytes > target_bytes:
            victim = self._next_victim()
            if victim is None:
                break
            self.evictions += 1
            if isinstance(victim, Sequence):
                self._evict_sequence(victim)
            else:
                node, depth = victim
                self._forget_checkpoint(node, depth)
        return before - self.nbytes

    def _next_victim(self) -> Sequence | tuple[Node, int] | None:
        """The next unit to evict: lowest (group, age, tier) first.

        Group 0: sequences another covers. Group 1, least recently used first:
        checkpoints, and sequences (cut back to a shared prefix, or dropped); a
        sequence's anchor (the deepest checkpoint on its path, without which a
        hybrid's KV cannot be restored) only leaves with it. Group 2: what keeps a
        shared prefix. With a disk tier a sequence leaves before its checkpoints,
        so it is written whole.
        """
        seq_tier, ckpt_tier = (0, 1) if self.on_evict is not None else (1, 0)
        anchors = {id(c) for seq in self.sequences.values() if (c := self._anchor(seq)) is not None}
        best, best_key = None, None
        for seq in self.sequences.values():
            if self._redundant(seq):
                key = (0, seq.last_used, 0)
            else:
                key = (2 if seq.prefix_only else 1, seq.last_used, seq_tier)
            if best_key is None or key < best_key:
                best, best_key = seq, key
        for node in self.trie.nodes():
            if not node.checkpoints:
                continue
            group = 2 if self._protects_a_prefix(node) else 1
            for depth, ckpt in node.checkpoints.items():
                key = (group, ckpt.last_used, 2 if id(ckpt) in anchors else ckpt_tier)
                if best_key is None or key < best_key:
                    best, best_key = (node, depth), key
        return best

    def _anchor(self, seq: Sequence) -> Checkpoint | None:
        for node in reversed(self.trie.path_to(seq.node)):
            depths = [d for d in node.checkpoints if d <= len(seq.tokens)]
            if depths:
                return node.checkpoints[max(depths)]
        return None

    def _protects_a_prefix(self, node: Node) -> bool:
        """Checkpoints here serve a prefix several sequences share, or one kept after its tail went."""
        entries = [self.sequences[key] for _, key in self.trie.entries_under(node)]
        return len(entries) > 1 or any(seq.prefix_only for seq in entries)

    def _compact_until(self, target_bytes: int) -> None:
        """Give back the unused room at the end of KV buffers (grown in steps), oldest first; loses nothing.

        Only under pressure: a compacted sequence copies its KV once more when it grows.
        """
        for seq in sorted(self.sequences.values(), key=lambda s: s.last_used):
            if self.nbytes <= target_bytes:
                return
            if not seq.compacted:
                seq.cache = self.ops.compact(seq.cache)
                seq.nbytes, seq.compacted = self.ops.nbytes(seq.cache), True

    def _redundant(self, seq: Sequence) -> bool:
        """Another stored sequence holds every token of this one (and its checkpoints' path)."""
        return bool(seq.node.children) or len(seq.node.entries) > 1

    def _evict_sequence(self, seq: Sequence) -> None:
        redundant = self._redundant(seq)
        if self.on_evict is not None and not redundant:
            self.on_evict(seq, self.checkpoints_on_path(seq))
        keep = None if redundant else self._shared_restore_point(seq)
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

    def _shrink(self, seq: Sequence, position: int, ckpt: Checkpoint | None) -> None:
        """Cut `seq` back to `position`, into buffers of that length: the tail's memory is freed."""
        snapshot = ckpt.snapshot if ckpt is not None else None
        seq.cache = self.ops.shrink(seq.cache, position, snapshot)
        del seq.tokens[position:]
        seq.prompt_end = min(seq.prompt_end, position)
        seq.nbytes = self.ops.nbytes(seq.cache)
        seq.prefix_only = seq.compacted = True
        self._move_to(seq, self.trie.insert(seq.tokens))

    def checkpoints_on_path(self, seq: Sequence) -> list[Checkpoint]:
        return [c for node in self.trie.path_to(seq.node) for c in node.checkpoints.values()]

    def _drop_sequence(self, seq: Sequence) -> None:
        self._detach(seq)
        self.sequences.pop(seq.key, None)
        seq.cache = None

    def _move(self, seq: Sequence, tokens: list[int]) -> None:
        seq.tokens = tokens
        self._move_to(seq, self.trie.insert(tokens))

    def _move_to(self, seq: Sequence, node: Node) -> None:
        """Re-attach `seq` at `node`, attaching first so the shared path survives pruning."""
        old = seq.node
        node.entries.add(seq.key)
        seq.node = node
        if old is not None and old is not node:
            self._release(self.trie.detach_entry(old, seq.key))

    def _release(self, dropped: list[Checkpoint]) -> None:
        for ckpt in dropped:
            self._checkpoint_bytes -= ckpt.nbytes
            self._checkpoint_count -= 1

    def _detach(self, seq: Sequence) -> None:
        if seq.node is None:
            return
        self._release(self.trie.detach_entry(seq.node, seq.key))
        seq.node = None

    def _forget_checkpoint(self, node: Node, depth: int) -> None:
        ckpt = self.trie.remove_checkpoint(node, depth)
        self._checkpoint_bytes -= ckpt.nbytes
        self._checkpoint_count -= 1

    def clear(self) -> None:
        for seq in list(self.sequences.values()):
            self._drop_sequence(seq)

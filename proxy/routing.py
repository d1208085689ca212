"""Which replica of a model runs a request: the one with most of its prompt cached, unless waiting
for it costs more than the cache saves.

Each worker tells what its pool can restore as prefix-block events (protocol.CacheEvents: chained
hashes of PREFIX_BLOCK_TOKENS-token blocks, the cache namespace in the seed). `PrefixIndex` keeps,
per model, block hash -> the replicas holding it; a request's own block hashes
(`protocol.prefix_hash.block_hashes` of its prompt and namespace) then give each replica's cached
prefix by one walk down the chain. A request routed to a replica counts there at once (pending,
for PENDING_TTL_S, until the worker's own events confirm it): a burst of requests sharing a prefix,
or the n choices of one request, go where the first one went.

The policy (`choose`), with c the replica holding the longest prefix (ties: the less loaded) and l
the least loaded (ties: the longer prefix):

    wait(r) = max(0, waiting(r) + running(r) - max_running(r) + 1) / max_running(r) * mean_turn_seconds(r)
    gain    = (cached_tokens(c) - cached_tokens(l)) / prefill_tokens_per_second * cache_weight
    c if gain >= wait(c) - wait(l), else l

wait(r) is the queueing a new request meets: none while r has a free turn (its batch is not full),
so the cache wins until its replica's batch fills; between replicas that cache nothing of it, the
one with the fewer running requests wins. A replica whose queue is full, or that is down, is not a
candidate while another is. The knobs:
--route-cache-weight (0: balance by load alone; large: follow the cache whatever the wait) and
--route-prefill-tps (0: measured from each worker's Results, DEFAULT_PREFILL_TPS until then).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Sequence

from protocol.messages import CacheEvents
from protocol.prefix_hash import PREFIX_BLOCK_TOKENS

PENDING_TTL_S = 60.0
DEFAULT_PREFILL_TPS = 2000.0
DEFAULT_CACHE_WEIGHT = 1.0


class RouteReason(str, Enum):
    CACHE = "cache"  # the replica with the longest cached prefix
    LOAD = "load"  # the least loaded one: nothing cached anywhere, or the gain did not pay for the wait
    ONLY = "only"  # one candidate: one replica, or the others down or full


@dataclass
class _ReplicaBlocks:
    confirmed: set[int] = field(default_factory=set)  # what the worker's events say it holds
    pending: dict[int, float] = field(default_factory=dict)  # hash -> expiry: routed here, not yet confirmed


class PrefixIndex:
    """Block hash -> the replicas (small ints) whose pools can restore that prefix."""

    def __init__(self, block_tokens: int = PREFIX_BLOCK_TOKENS, pending_ttl_s: float = PENDING_TTL_S) -> None:
        self.block_tokens = block_tokens
        self.pending_ttl_s = pending_ttl_s
        self._holders: dict[int, set[int]] = {}
        self._replicas: dict[int, _ReplicaBlocks] = {}

    def blocks(self, replica: int) -> int:
        state = self._replicas.get(replica)
        return len(state.confirmed) if state is not None else 0

    def apply(self, replica: int, events: CacheEvents) -> None:
        """A worker's events; a reset (or a block size not ours) forgets what it held before."""
        if events.block_tokens != self.block_tokens:
            self.forget(replica)  # hashes of another block size match nothing here
            return
        state = self._replicas.setdefault(replica, _ReplicaBlocks())
        if events.reset:
            self._drop_confirmed(replica, state)
        for h in events.removed:
            state.confirmed.discard(h)
            state.pending.pop(h, None)
            self._discard(h, replica)
        for h in events.stored:
            state.confirmed.add(h)
            state.pending.pop(h, None)
            self._holders.setdefault(h, set()).add(replica)

    def forget(self, replica: int) -> None:
        """The replica's worker is gone (its pool with it)."""
        state = self._replicas.pop(replica, None)
        if state is None:
            return
        self._drop_confirmed(replica, state)
        for h in state.pending:
            self._discard(h, replica)

    def note_routed(self, replica: int, hashes: Sequence[int], now: Optional[float] = None) -> None:
        """A request with these blocks went to `replica`: count them there until the worker says otherwise."""
        expiry = (time.monotonic() if now is None else now) + self.pending_ttl_s
        state = self._replicas.setdefault(replica, _ReplicaBlocks())
        for h in hashes:
            if h not in state.confirmed:
                state.pending[h] = expiry
                self._holders.setdefault(h, set()).add(replica)

    def expire(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for replica, state in self._replicas.items():
            stale = [h for h, expiry in state.pending.items() if expiry <= now]
            for h in stale:
                del state.pending[h]
                self._discard(h, replica)

    def matched_blocks(self, hashes: Sequence[int], replicas: Sequence[int]) -> dict[int, int]:
        """For each of `replicas`, how many leading blocks of `hashes` it holds."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for depth, h in enumerate(hashes):
            holders = self._holders.get(h)
            still = alive & holders if holders else set()
            for gone in alive - still:
                matched[gone] = depth
            alive = still
            if not alive:
                return matched
        for replica in alive:
            matched[replica] = len(hashes)
        return matched

    def _drop_confirmed(self, replica: int, state: _ReplicaBlocks) -> None:
        for h in state.confirmed:
            if h not in state.pending:
                self._discard(h, replica)
        state.confirmed = set()

    def _discard(self, h: int, replica: int) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]


# ----------------------------------------------------------------- the policy


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's figures at the moment of a decision."""

    replica: int
    waiting: int
    running: int
    max_running: int = 1
    max_waiting: int = 32
    mean_turn_s: float = 1.0  # how long a request holds its turn, on average
    prefill_tps: float = 0.0  # measured prompt tokens per second; 0: not known yet
    up: bool = True

    @property
    def full(self) -> bool:
        return self.waiting >= self.max_waiting and self.running >= self.max_running

    @property
    def wait_s(self) -> float:
        """Seconds a new request would wait for a turn: the turns ahead of it beyond the free ones."""
        ahead = max(0, self.waiting + self.running - self.max_running + 1)
        return ahead / max(1, self.max_running) * self.mean_turn_s

    @property
    def busy(self) -> float:
        return (self.waiting + self.running) / max(1, self.max_running)


@dataclass(frozen=True)
class RoutePolicy:
    cache_weight: float = DEFAULT_CACHE_WEIGHT
    prefill_tps: float = 0.0  # 0: each replica's measured figure


@dataclass(frozen=True)
class Decision:
    replica: int
    reason: RouteReason
    cached_tokens: int  # the prefix the chosen replica is believed to hold


def choose(loads: Sequence[ReplicaLoad], matched_tokens: dict[int, int], policy: RoutePolicy) -> Decision:
    """The replica for one request (see the module docstring); `loads` must not be empty."""
    candidates = [r for r in loads if r.up and not r.full] or [r for r in loads if r.up] or list(loads)
    if len(candidates) == 1:
        only = candidates[0]
        return Decision(only.replica, RouteReason.ONLY, matched_tokens.get(only.replica, 0))
    cached = {r.replica: matched_tokens.get(r.replica, 0) for r in candidates}
    best = max(candidates, key=lambda r: (cached[r.replica], -r.wait_s, -r.busy))
    least = min(candidates, key=lambda r: (r.wait_s, r.busy, -cached[r.replica]))
    if best is least or cached[best.replica] == cached[least.replica]:
        reason = RouteReason.CACHE if cached[least.replica] > 0 else RouteReason.LOAD
        return Decision(least.replica, reason, cached[least.replica])
    if policy.cache_weight <= 0:
        return Decision(least.replica, RouteReason.LOAD, cached[least.replica])
    tps = policy.prefill_tps or best.prefill_tps or DEFAULT_PREFILL_TPS
    gain_s = (cached[best.replica] - cached[least.replica]) / tps * policy.cache_weight
    if gain_s >= best.wait_s - least.wait_s:
        return Decision(best.replica, RouteReason.CACHE, cached[best.replica])
    return Decision(least.replica, RouteReason.LOAD, cached[least.replica])


class Router:
    """One model's routing: its PrefixIndex, the policy, and the decisions counted per replica."""

    def __init__(self, policy: RoutePolicy = RoutePolicy(), block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        self.policy = policy
        self.index = PrefixIndex(block_tokens)
        self.decisions: Counter[tuple[int, RouteReason]] = Counter()

    def route(self, loads: Sequence[ReplicaLoad], hashes: Sequence[int], prompt_tokens: int) -> Decision:
        self.index.expire()
        blocks = self.index.matched_blocks(hashes, [r.replica for r in loads if r.up])
        # At most the prompt less one token: the last one is always computed.
        tokens = {r: min(n * self.index.block_tokens, max(0, prompt_tokens - 1)) for r, n in blocks.items()}
        decision = choose(loads, tokens, self.policy)
        self.decisions[(decision.replica, decision.reason)] += 1
        self.index.note_routed(decision.replica, hashes)
        return decision

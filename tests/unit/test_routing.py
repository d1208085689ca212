"""Routing among replicas: the prefix index fed by cache events, and the cache-or-load policy."""

from protocol.messages import CacheEvents
from protocol.prefix_hash import block_hashes
from proxy.routing import PrefixIndex, ReplicaLoad, RouteReason, RoutePolicy, Router, choose

B = 4


def index_with(**held: list[int]) -> PrefixIndex:
    index = PrefixIndex(B)
    for replica, tokens in held.items():
        index.apply(int(replica[1:]), CacheEvents(B, stored=block_hashes(tokens, "", B)))
    return index


def test_the_longest_held_prefix_per_replica():
    prompt = list(range(16))
    index = index_with(r0=prompt[:8], r1=prompt[:12], r2=[9] * 16)
    assert index.matched_blocks(block_hashes(prompt, "", B), [0, 1, 2]) == {0: 2, 1: 3, 2: 0}


def test_another_namespace_matches_nothing():
    prompt = list(range(16))
    index = index_with(r0=prompt)
    assert index.matched_blocks(block_hashes(prompt, "tenant", B), [0]) == {0: 0}


def test_removed_reset_and_forget():
    prompt = list(range(8))
    hashes = block_hashes(prompt, "", B)
    index = index_with(r0=prompt, r1=prompt)
    index.apply(0, CacheEvents(B, removed=[hashes[1]]))
    assert index.matched_blocks(hashes, [0, 1]) == {0: 1, 1: 2}
    index.apply(1, CacheEvents(B, stored=[], reset=True))
    index.forget(0)
    assert index.matched_blocks(hashes, [0, 1]) == {0: 0, 1: 0}


def test_a_routed_request_counts_at_once_and_expires_unless_confirmed():
    hashes = block_hashes(list(range(8)), "", B)
    index = PrefixIndex(B, pending_ttl_s=10)
    index.note_routed(1, hashes, now=0)
    assert index.matched_blocks(hashes, [0, 1]) == {0: 0, 1: 2}
    index.apply(1, CacheEvents(B, stored=hashes[:1]))
    index.expire(now=11)
    assert index.matched_blocks(hashes, [1]) == {1: 1}


def load(replica, waiting=0, running=0, **kw):
    return ReplicaLoad(replica, waiting, running, max_running=kw.pop("max_running", 4), **kw)


def test_a_long_cached_prefix_is_worth_a_short_wait():
    loads = [load(0, waiting=2, running=4, mean_turn_s=2.0), load(1)]  # replica 0: 1.5 s of expected wait
    decision = choose(loads, {0: 4000, 1: 0}, RoutePolicy(prefill_tps=1000))  # saves 4 s
    assert (decision.replica, decision.reason) == (0, RouteReason.CACHE)


def test_a_short_cached_prefix_is_not_worth_a_long_wait():
    loads = [load(0, waiting=3, running=4, mean_turn_s=2.0), load(1)]
    decision = choose(loads, {0: 256, 1: 0}, RoutePolicy(prefill_tps=1000))
    assert (decision.replica, decision.reason) == (1, RouteReason.LOAD)


def test_the_cache_weight_knob():
    loads = [load(0, waiting=2, running=4, mean_turn_s=2.0), load(1)]
    assert choose(loads, {0: 4000}, RoutePolicy(cache_weight=0, prefill_tps=1000)).replica == 1
    assert choose([load(0, running=1), load(1)], {0: 4000}, RoutePolicy(cache_weight=0)).replica == 1
    far = [load(0, waiting=30, running=4, mean_turn_s=2.0), load(1)]
    assert choose(far, {0: 256}, RoutePolicy(cache_weight=1000, prefill_tps=1000)).replica == 0


def test_a_free_turn_means_no_wait_so_the_cache_wins():
    decision = choose([load(0, running=3), load(1)], {0: 128}, RoutePolicy())
    assert (decision.replica, decision.reason) == (0, RouteReason.CACHE)


def test_nothing_cached_goes_to_the_least_loaded_and_down_or_full_replicas_are_skipped():
    assert choose([load(0, running=1), load(1)], {}, RoutePolicy()).reason is RouteReason.LOAD
    assert choose([load(0, running=1), load(1)], {}, RoutePolicy()).replica == 1
    down = [load(0, up=False), load(1, running=3)]
    assert choose(down, {0: 9000}, RoutePolicy()).replica == 1
    full = [load(0, waiting=2, running=4, max_waiting=2), load(1, running=4, waiting=1)]
    assert choose(full, {0: 9000}, RoutePolicy()).replica == 1
    assert choose([load(0, up=False), load(1, up=False, running=1)], {}, RoutePolicy()).replica == 0  # all down: one waits


def test_the_router_counts_decisions_and_sends_siblings_together():
    router = Router(RoutePolicy(prefill_tps=1000), block_tokens=B)
    prompt = list(range(64))
    hashes = block_hashes(prompt, "", B)
    loads = [load(0), load(1)]
    first = router.route(loads, hashes, len(prompt))
    # The n choices of one request (or a burst sharing the prompt): the first one's replica holds it now.
    loads = [load(r, running=1 if r == first.replica else 0, mean_turn_s=0.01) for r in (0, 1)]
    second = router.route(loads, hashes, len(prompt))
    assert second.replica == first.replica and second.reason is RouteReason.CACHE
    assert second.cached_tokens == len(prompt) - 1  # the last prompt token is always computed
    assert sum(router.decisions.values()) == 2

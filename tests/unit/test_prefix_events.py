"""The worker's prefix-block events: what the pool can restore, as changes, and whole for a new session."""

from protocol.prefix_hash import block_hashes
from worker.prefix_events import MAX_HASHES_PER_MESSAGE, PrefixReporter, StoredSequence

B = 4


def seq(key, tokens, namespace=""):
    return StoredSequence(key, tokens, namespace)


def stored(messages):
    return {h for m in messages for h in m.stored}


def removed(messages):
    return {h for m in messages for h in m.removed}


def test_a_stored_sequence_reports_its_whole_blocks_once():
    reporter = PrefixReporter(B)
    tokens = list(range(10))  # two whole blocks
    first = reporter.update([seq(1, tokens)])
    assert stored(first) == set(block_hashes(tokens, "", B)) and len(stored(first)) == 2
    assert reporter.update([seq(1, tokens)]) == []  # nothing changed: nothing sent


def test_a_block_stays_while_any_sequence_covers_it():
    reporter = PrefixReporter(B)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9]
    reporter.update([seq(1, a), seq(2, b)])
    shared, only_a = block_hashes(a, "", B)
    events = reporter.update([seq(2, b)])  # a evicted: its second block goes, the shared first stays
    assert removed(events) == {only_a} and not stored(events)
    events = reporter.update([])
    assert shared in removed(events)


def test_a_grown_or_shrunk_sequence_is_rehashed():
    reporter = PrefixReporter(B)
    tokens = [1, 2, 3, 4]
    reporter.update([seq(1, tokens)])
    grown = tokens + [5, 6, 7, 8]  # a new list: the commit of a longer conversation
    assert stored(reporter.update([seq(1, grown)])) == {block_hashes(grown, "", B)[1]}
    del grown[4:]  # cut back in place (an eviction's shrink)
    assert removed(reporter.update([seq(1, grown)])) == {block_hashes(tokens + [5, 6, 7, 8], "", B)[1]}


def test_namespaces_never_share_a_block():
    reporter = PrefixReporter(B)
    events = reporter.update([seq(1, [1, 2, 3, 4], "a"), seq(2, [1, 2, 3, 4], "b")])
    assert len(stored(events)) == 2


def test_a_reset_carries_the_whole_set_in_bounded_messages():
    reporter = PrefixReporter(B)
    long = list(range(B * (MAX_HASHES_PER_MESSAGE + 10)))
    reporter.update([seq(1, long)])
    events = reporter.update([seq(1, long)], reset=True)
    assert [m.reset for m in events] == [True, False]
    assert all(len(m.stored) <= MAX_HASHES_PER_MESSAGE for m in events)
    assert stored(events) == set(block_hashes(long, "", B))
    empty = PrefixReporter(B).update([], reset=True)
    assert len(empty) == 1 and empty[0].reset and not empty[0].stored

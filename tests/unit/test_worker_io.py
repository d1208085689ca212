"""Pure pieces of the worker's IO side: sizes, the request book, the outbox, the parent watch."""

from __future__ import annotations

import argparse
import select
import subprocess
import time

import pytest

from protocol.messages import Generate, Ping, SamplingParams
from worker.io_loop import Outbox, ParentWatch, RequestBook
from worker.main import parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [("123", 123), ("512M", 512 << 20), ("8G", 8 << 30), ("8g", 8 << 30), ("1.5G", 3 << 29), ("64KiB", 64 << 10), ("2TB", 2 << 40)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "G", "8X", "-1G", "8 G B"])
def test_parse_bytes_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def _request(rid: str) -> Generate:
    return Generate(request_id=rid, prompt_tokens=[1, 2], sampling=SamplingParams())


def test_book_abort_of_a_queued_request_removes_it():
    book = RequestBook()
    assert book.enqueue(_request("a")) and book.enqueue(_request("b"))
    assert not book.enqueue(_request("b"))  # an id in use
    assert book.abort("b").request_id == "b"
    assert book.start("b") is None  # the model thread skips it
    assert book.abort("b") is None  # a second abort finds nothing


def test_book_abort_of_a_running_request_sets_its_event_only():
    book = RequestBook()
    book.enqueue(_request("a"))
    book.enqueue(_request("b"))
    event, other = book.start("a"), book.start("b")
    assert book.running_ids() == ["a", "b"] and not event.is_set()
    assert not book.enqueue(_request("a"))
    assert book.abort("a") is None and event.is_set() and not other.is_set()
    book.finish("a")
    assert book.running_ids() == ["b"] and book.enqueue(_request("a"))


def test_book_abort_all():
    book = RequestBook()
    for rid in "abc":
        book.enqueue(_request(rid))
    event = book.start("a")
    second = book.start("b")
    assert [r.request_id for r in book.abort_all()] == ["c"]
    assert event.is_set() and second.is_set() and book.start("c") is None


def test_outbox_wakes_the_poll_and_keeps_order():
    outbox = Outbox()
    try:
        assert select.select([outbox.fileno()], [], [], 0)[0] == []
        for _ in range(10000):  # more wake-ups than the pipe holds must not block
            outbox.put(Ping())
        assert select.select([outbox.fileno()], [], [], 0)[0] == [outbox.fileno()]
        assert len(outbox.drain()) == 10000
        assert select.select([outbox.fileno()], [], [], 0)[0] == []
        assert outbox.drain() == []
    finally:
        outbox.close()


def test_parent_watch_sees_a_dead_unreaped_parent():
    parent = subprocess.Popen(["sleep", "600"])
    try:
        watch = ParentWatch(parent.pid)
        assert not watch.gone()
        parent.kill()
        deadline = time.monotonic() + 2.0
        while not watch.gone() and time.monotonic() < deadline:  # the kill lands asynchronously
            time.sleep(0.02)
        assert watch.gone()  # a zombie still answers kill(pid, 0)
        parent.wait(timeout=5)
        assert watch.gone()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=5)

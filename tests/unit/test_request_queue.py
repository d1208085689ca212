"""The per-worker FIFO: one at a time, in order, bounded, cancellation-safe."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import QueueFull, ShuttingDown, WorkerUnavailable
from proxy.request_queue import RequestQueue, TicketState


async def test_first_request_runs_at_once():
    queue = RequestQueue(max_waiting=2)
    ticket = queue.enter()
    assert ticket.state is TicketState.RUNNING
    assert await ticket.wait(0)
    assert queue.running and queue.waiting == 0


async def test_fifo_order_and_one_at_a_time():
    queue = RequestQueue(max_waiting=10)
    order: list[int] = []
    active = 0

    async def request(i: int) -> None:
        nonlocal active
        ticket = queue.enter()
        try:
            await ticket.wait()
            active += 1
            assert active == 1
            order.append(i)
            await asyncio.sleep(0.01)
            active -= 1
        finally:
            ticket.release()

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(request(i)))
        await asyncio.sleep(0)  # arrival order = creation order
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert not queue.running and queue.waiting == 0


async def test_bound_counts_waiting_requests():
    queue = RequestQueue(max_waiting=1)
    running = queue.enter()
    waiting = queue.enter()
    assert waiting.state is TicketState.WAITING
    with pytest.raises(QueueFull) as info:
        queue.enter()
    assert info.value.status == 429
    assert int(info.value.headers()["Retry-After"]) >= 1
    running.release()
    assert waiting.state is TicketState.RUNNING
    queue.enter().release()  # a place is free again
    waiting.release()


async def test_zero_waiting_allowed():
    queue = RequestQueue(max_waiting=0)
    ticket = queue.enter()
    with pytest.raises(QueueFull):
        queue.enter()
    ticket.release()
    queue.enter().release()


async def test_cancelled_waiter_leaves_the_queue():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    first, second = queue.enter(), queue.enter()
    assert (first.position, second.position) == (1, 2)

    async def wait_then_leave(ticket):
        try:
            await ticket.wait()
        finally:
            ticket.release()

    task = asyncio.create_task(wait_then_leave(first))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert first.state is TicketState.DONE
    assert queue.waiting == 1 and second.position == 1
    running.release()
    assert second.state is TicketState.RUNNING
    assert await second.wait(0.1)
    second.release()
    assert not queue.running


async def test_turn_given_to_a_waiter_that_is_cancelled_is_passed_on():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    doomed, next_one = queue.enter(), queue.enter()
    running.release()  # doomed gets the turn...
    assert doomed.state is TicketState.RUNNING
    doomed.release()  # ...but its client is gone: the turn moves on
    assert next_one.state is TicketState.RUNNING
    next_one.release()


async def test_wait_timeout_returns_false_and_keeps_place():
    queue = RequestQueue(max_waiting=1)
    running = queue.enter()
    waiting = queue.enter()
    assert not await waiting.wait(0.01)
    assert waiting.state is TicketState.WAITING and queue.waiting == 1
    running.release()
    assert await waiting.wait(0.01)
    waiting.release()


async def test_release_is_idempotent_and_context_manager_releases():
    queue = RequestQueue(max_waiting=1)
    with queue.enter() as ticket:
        assert ticket.state is TicketState.RUNNING
    assert ticket.state is TicketState.DONE
    ticket.release()
    assert not queue.running


# ----------------------------------------------------------------- worker down, shutting down


async def test_held_queue_keeps_the_turn_until_resumed():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    queued = queue.enter()
    queue.hold()  # the worker died under `running`
    running.release()
    assert queued.state is TicketState.WAITING and not queue.running
    assert queued.position == 1  # the restart is ahead of it
    late = queue.enter()  # a request arriving while the worker is down waits too
    assert late.state is TicketState.WAITING
    queue.resume()
    assert queued.state is TicketState.RUNNING and await queued.wait(0.1)
    queued.release()
    assert late.state is TicketState.RUNNING
    late.release()


async def test_held_queue_counts_the_bound():
    queue = RequestQueue(max_waiting=1)
    queue.hold()
    queue.enter()
    with pytest.raises(QueueFull):
        queue.enter()


async def test_fail_waiting_wakes_waiters_with_the_error():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    old = queue.enter()
    cutoff = old.entered_at
    await asyncio.sleep(0.01)
    new = queue.enter()
    waiter = asyncio.create_task(old.wait())
    await asyncio.sleep(0)
    assert queue.fail_waiting(lambda: WorkerUnavailable("gone"), entered_before=cutoff) == 1
    with pytest.raises(WorkerUnavailable):
        await waiter
    assert old.state is TicketState.DONE
    old.release()  # idempotent after a failure
    assert queue.waiting == 1 and new.position == 1
    running.release()
    assert new.state is TicketState.RUNNING
    new.release()


async def test_closed_queue_fails_waiting_and_refuses_new_but_lets_the_running_one_finish():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    waiting = [queue.enter(), queue.enter()]
    assert queue.close(lambda: ShuttingDown("bye")) == 2
    for ticket in waiting:
        with pytest.raises(ShuttingDown):
            await ticket.wait(0.1)
    with pytest.raises(ShuttingDown):
        queue.enter()
    assert running.state is TicketState.RUNNING
    running.release()
    assert not queue.running

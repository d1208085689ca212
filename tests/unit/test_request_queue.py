"""The per-worker FIFO: up to max_running at once (one by default), in order, bounded, cancellation-safe."""

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
    assert queue.running_count == 1 and queue.waiting == 0


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
    assert queue.running_count == 0 and queue.waiting == 0


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
    assert queue.running_count == 0


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
    assert queue.running_count == 0


# ----------------------------------------------------------------- worker down, shutting down


async def test_held_queue_keeps_the_turn_until_resumed():
    queue = RequestQueue(max_waiting=5)
    running = queue.enter()
    queued = queue.enter()
    queue.hold()  # the worker died under `running`
    running.release()
    assert queued.state is TicketState.WAITING and queue.running_count == 0
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
    assert queue.running_count == 0


# ----------------------------------------------------------------- several at once (continuous batching)


async def test_several_run_at_once_up_to_the_limit_and_the_rest_wait_in_order():
    queue = RequestQueue(max_waiting=5, max_running=3)
    tickets = [queue.enter() for _ in range(5)]
    assert [t.state for t in tickets[:3]] == [TicketState.RUNNING] * 3
    assert all([await t.wait(0) for t in tickets[:3]])
    assert [t.state for t in tickets[3:]] == [TicketState.WAITING] * 2
    assert queue.running_count == 3 and queue.waiting == 2
    tickets[1].release()  # any running one finishing frees a turn for the oldest waiter
    assert tickets[3].state is TicketState.RUNNING and tickets[4].state is TicketState.WAITING
    assert queue.running_count == 3 and queue.waiting == 1
    for ticket in tickets:
        ticket.release()
    assert queue.running_count == 0 and queue.waiting == 0


async def test_fifo_hand_on_never_exceeds_the_limit():
    queue = RequestQueue(max_waiting=20, max_running=3)
    started: list[int] = []
    active = peak = 0

    async def request(i: int, hold_s: float) -> None:
        nonlocal active, peak
        with queue.enter() as ticket:
            await ticket.wait()
            started.append(i)
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(hold_s)
            active -= 1

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(request(i, 0.005 * (1 + i % 3))))
        await asyncio.sleep(0)  # arrival order = creation order
    await asyncio.gather(*tasks)
    assert started == list(range(10))  # turns go out in arrival order, whoever frees them
    assert peak == 3
    assert queue.running_count == 0 and queue.waiting == 0


async def test_429_only_past_max_waiting_with_every_turn_taken():
    queue = RequestQueue(max_waiting=2, max_running=2)
    running = [queue.enter(), queue.enter()]
    waiting = [queue.enter(), queue.enter()]
    assert [t.state for t in waiting] == [TicketState.WAITING] * 2
    with pytest.raises(QueueFull) as info:
        queue.enter()
    assert info.value.status == 429 and int(info.value.headers()["Retry-After"]) >= 1
    running[0].release()
    assert waiting[0].state is TicketState.RUNNING
    queue.enter().release()  # a waiting place is free again
    for ticket in running + waiting:
        ticket.release()


async def test_retry_after_accounts_for_the_turns_running_in_parallel():
    one, four = RequestQueue(max_waiting=10), RequestQueue(max_waiting=10, max_running=4)
    for queue in (one, four):
        queue._mean_service_s = 10.0
        for _ in range(queue.max_running + 7):  # every turn taken, 7 waiting
            queue.enter()
    assert one.retry_after() == 80  # 8 turn lengths, one at a time
    assert four.retry_after() == 20  # the same line drains four at a time


async def test_positions_count_the_waiting_line_only():
    queue = RequestQueue(max_waiting=5, max_running=2)
    running = [queue.enter(), queue.enter()]
    first, second, third = queue.enter(), queue.enter(), queue.enter()
    assert [t.position for t in running] == [0, 0]
    assert (first.position, second.position, third.position) == (1, 2, 3)
    second.release()  # a waiter leaving moves those behind it up
    assert (first.position, third.position) == (1, 2)
    running[0].release()
    assert (first.position, third.position) == (0, 1)
    for ticket in (running[1], first, third):
        ticket.release()


async def test_hold_and_resume_with_several_running():
    queue = RequestQueue(max_waiting=5, max_running=3)
    running = [queue.enter() for _ in range(3)]
    queued = [queue.enter(), queue.enter()]
    queue.hold()  # the worker died under all three
    for ticket in running:
        ticket.release()
    assert queue.running_count == 0 and [t.state for t in queued] == [TicketState.WAITING] * 2
    late = [queue.enter(), queue.enter()]  # arrivals while the worker is down wait too
    assert [t.position for t in queued + late] == [1, 2, 3, 4]
    queue.resume()
    assert [t.state for t in queued + late[:1]] == [TicketState.RUNNING] * 3
    assert late[1].state is TicketState.WAITING and late[1].position == 1
    for ticket in queued + late:
        ticket.release()
    assert queue.running_count == 0


async def test_set_max_running_hands_out_new_turns_and_a_lower_limit_lets_the_running_finish():
    queue = RequestQueue(max_waiting=10)
    tickets = [queue.enter() for _ in range(5)]
    assert queue.running_count == 1
    queue.set_max_running(4)  # the worker said hello with max_batch=4
    assert [t.state for t in tickets] == [TicketState.RUNNING] * 4 + [TicketState.WAITING]
    queue.set_max_running(2)  # a worker that runs fewer: nobody is taken back
    assert queue.running_count == 4
    for ticket in tickets[:2]:
        ticket.release()
    assert tickets[4].state is TicketState.WAITING  # still 2 running: no free turn
    tickets[2].release()
    assert tickets[4].state is TicketState.RUNNING and queue.running_count == 2
    for ticket in tickets:
        ticket.release()
    with pytest.raises(ValueError):
        queue.set_max_running(0)


async def test_set_max_running_while_held_waits_for_resume():
    queue = RequestQueue(max_waiting=5)
    queue.hold()
    waiting = [queue.enter(), queue.enter()]
    queue.set_max_running(2)  # the new worker's Hello arrives before the supervisor resumes
    assert [t.state for t in waiting] == [TicketState.WAITING] * 2
    queue.resume()
    assert [t.state for t in waiting] == [TicketState.RUNNING] * 2
    for ticket in waiting:
        ticket.release()


async def test_closed_queue_lets_every_running_request_finish():
    queue = RequestQueue(max_waiting=5, max_running=2)
    running = [queue.enter(), queue.enter()]
    waiting = queue.enter()
    assert queue.close(lambda: ShuttingDown("bye")) == 1
    with pytest.raises(ShuttingDown):
        await waiting.wait(0.1)
    assert [t.state for t in running] == [TicketState.RUNNING] * 2
    for ticket in running:
        ticket.release()
    assert queue.running_count == 0

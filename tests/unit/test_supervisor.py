"""The supervisor against a scripted remote worker: death by silence, reconnection, the wait bound."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from protocol.codec import decode, encode
from protocol.messages import Connect, MemoryStats, Ping, PoolStats, Stats
from proxy.config import ModelSpec, WorkerOptions
from proxy.errors import WorkerUnavailable
from proxy.request_queue import RequestQueue, TicketState
from proxy.supervisor import Backoff, WorkerState, WorkerSupervisor, worker_argv
from tests.unit.test_worker_client import HELLO

OPTIONS = WorkerOptions(
    heartbeat_interval=0.05,
    heartbeat_timeout=0.3,
    start_timeout=5.0,
    restart_backoff=0.01,
    restart_backoff_max=0.05,
    unavailable_timeout=5.0,
)


class FakeRemoteWorker:
    """A ROUTER that answers like a worker while `alive`; a dead one says nothing, and
    answers the Connects it missed when it comes back (as a worker that was loading does)."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.alive = True
        self.hello = HELLO  # what it answers a Connect with
        self.connects = 0
        self._missed: list[list[bytes]] = []
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            envelope, frame = await self.socket.recv_multipart()
            message = decode(frame)
            if isinstance(message, Connect):
                self.connects += 1
                if self.alive:
                    await self.socket.send_multipart([envelope, encode(self.hello)])
                else:
                    self._missed.append(envelope)
            elif isinstance(message, Ping) and self.alive:
                stats = Stats(memory=MemoryStats(), pool=PoolStats())
                await self.socket.send_multipart([envelope, encode(stats)])

    async def come_back(self) -> None:
        self.alive = True
        for envelope in self._missed:
            await self.socket.send_multipart([envelope, encode(self.hello)])
        self._missed.clear()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.socket.close(linger=0)


@pytest.fixture
async def remote():
    context = zmq.asyncio.Context()
    worker = FakeRemoteWorker(context)
    yield worker
    await worker.close()
    context.destroy(linger=0)


def supervisor_for(remote: FakeRemoteWorker, **options) -> tuple[WorkerSupervisor, RequestQueue]:
    queue = RequestQueue(max_waiting=4)
    spec = ModelSpec(model_id="m", path=None, endpoint=remote.endpoint)
    opts = WorkerOptions(**{**OPTIONS.__dict__, **options})
    return WorkerSupervisor(spec, opts, "unused", zmq.asyncio.Context.instance(), queue), queue


async def wait_for_state(supervisor: WorkerSupervisor, state: WorkerState, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while supervisor.state is not state:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_backoff_doubles_up_to_its_cap_and_starts_over():
    backoff = Backoff(0.5, 30.0)
    assert [backoff.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    backoff.reset()
    assert backoff.next() == 0.5
    at_once = Backoff(0.0, 30.0)
    assert [at_once.next() for _ in range(3)] == [0.0, 0.1, 0.2]


async def test_silent_remote_worker_is_reconnected_and_queued_requests_run(remote):
    supervisor, queue = supervisor_for(remote)
    try:
        await supervisor.start()
        first_client = supervisor.client
        running = queue.enter()
        remote.alive = False  # silence: the heartbeat watchdog declares it dead
        await wait_for_state(supervisor, WorkerState.DOWN)
        assert queue.held and not first_client.alive
        supervisor.check_available()  # down, but within the bound: new requests may queue
        running.release()
        queued = queue.enter()
        assert queued.state is TicketState.WAITING  # not handed to a dead worker
        await asyncio.sleep(0.1)
        await remote.come_back()
        assert await queued.wait(5.0)  # the turn comes once the worker answered again
        assert supervisor.state is WorkerState.UP and supervisor.client is not first_client
        assert supervisor.client.alive and supervisor.restarts == 1
        queued.release()
    finally:
        await supervisor.close()


async def test_requests_wait_only_up_to_the_bound_then_503(remote):
    supervisor, queue = supervisor_for(remote, unavailable_timeout=0.3)
    try:
        await supervisor.start()
        remote.alive = False
        await wait_for_state(supervisor, WorkerState.DOWN)
        ticket = queue.enter()
        with pytest.raises(WorkerUnavailable, match="did not come back"):
            await ticket.wait(5.0)
        with pytest.raises(WorkerUnavailable):
            supervisor.check_available()  # down longer than the bound: refused at once
        assert supervisor.restarts == 0
    finally:
        await supervisor.close()  # cancels the reconnection attempts
    assert supervisor.state is WorkerState.STOPPED


async def test_no_restart_once_shutting_down(remote):
    supervisor, queue = supervisor_for(remote)
    try:
        await supervisor.start()
        supervisor.stop_restarting()
        remote.alive = False
        await wait_for_state(supervisor, WorkerState.DOWN)
        await asyncio.sleep(0.2)
        assert remote.connects == 1 and supervisor.restarts == 0
    finally:
        await supervisor.close()


async def test_backoff_grows_while_the_worker_keeps_dying_and_starts_over_after_a_healthy_period(remote):
    supervisor, _ = supervisor_for(remote, restart_backoff=0.1, restart_backoff_max=10.0, restart_backoff_reset=0.5)
    delays: list[float] = []
    next_delay = supervisor._backoff.next
    supervisor._backoff.next = lambda: delays.append(next_delay()) or delays[-1]
    try:
        await supervisor.start()
        for healthy_for in (0.0, 0.0, 0.7):
            await asyncio.sleep(healthy_for)
            supervisor.client.fail("test: the worker died")
            await wait_for_state(supervisor, WorkerState.UP)
        assert delays == [0.1, 0.2, 0.1]  # doubled twice, then reset by 0.7s of health
        assert supervisor.restarts == 3
    finally:
        await supervisor.close()


async def test_the_queue_runs_as_many_as_each_hello_says(remote):
    remote.hello = replace(HELLO, max_batch=3)
    supervisor, queue = supervisor_for(remote)
    try:
        await supervisor.start()
        assert queue.max_running == 3
        running = [queue.enter() for _ in range(4)]
        assert [t.state for t in running] == [TicketState.RUNNING] * 3 + [TicketState.WAITING]
        remote.alive = False
        await wait_for_state(supervisor, WorkerState.DOWN)
        for ticket in running[:3]:  # their requests failed with the worker
            ticket.release()
        queued = [running[3], queue.enter()]
        assert [t.state for t in queued] == [TicketState.WAITING] * 2  # held: nothing to a dead worker
        remote.hello = replace(HELLO, max_batch=1)  # it comes back running one at a time
        await remote.come_back()
        assert await queued[0].wait(5.0)
        assert queue.max_running == 1 and queued[1].state is TicketState.WAITING
        for ticket in queued:
            ticket.release()
    finally:
        await supervisor.close()


def test_a_local_worker_is_asked_for_max_batch_only_when_one_was_chosen():
    spec = ModelSpec(model_id="m", path=Path("/models/m"))
    argv = worker_argv(spec, WorkerOptions(max_batch=4), "ipc:///tmp/w.sock")
    assert argv[argv.index("--max-batch") + 1] == "4"
    assert "--max-batch" not in worker_argv(spec, WorkerOptions(), "ipc:///tmp/w.sock")  # the worker's default

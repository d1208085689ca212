"""A bounded soak on loopback: 200 requests from 8 concurrent clients, some of which give up.

Seeded: the same prompts, modes and aborts every run. Clients abort by closing a
stream part-way or by a short timeout on a whole request. Afterwards every
request that was not aborted said exactly what a cold run says, nothing was lost
or hung, the same worker is still up with its pool inside --cache-bytes, and the
next request is answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

import aiohttp
import openai
import pytest

from tests.e2e.conftest import Server, running_proxy

pytestmark = pytest.mark.slow

SEED = 20261122
N_REQUESTS = 200
CLIENTS = 8
CACHE_BYTES = 2 * 1024**2
SOAK_BOUND_S = 90.0
REQUEST_TIMEOUT_S = 30.0
SYSTEM = "You are a terse assistant who answers in a few words. " * 12  # a prefix the prompts share


def conversations() -> list[tuple[list[dict], int]]:
    """(messages, max_tokens): single questions, and two-turn chats that fork from them."""
    out = []
    for i, topic in enumerate(["rivers", "mountains", "stars", "bread", "trains", "cats"]):
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {topic}."}]
        out.append((first, 4 + i % 5))
        second = first + [{"role": "assistant", "content": f"{topic} are fine."},
                          {"role": "user", "content": "And more?"}]  # fmt: skip
        out.append((second, 4 + (i + 2) % 5))
    out.append(([{"role": "user", "content": "hi"}], 8))
    return out


@dataclass
class Job:
    index: int
    prompt: int
    stream: bool
    abort_after_events: Optional[int] = None  # streamed: close after this many data events
    abort_timeout: Optional[float] = None  # whole request: give up after this many seconds


def plan(n_prompts: int) -> list[Job]:
    rng = random.Random(SEED)
    jobs = []
    for index in range(N_REQUESTS):
        job = Job(index, rng.randrange(n_prompts), stream=rng.random() < 0.5)
        if rng.random() < 0.25:
            if job.stream and rng.random() < 0.7:
                job.abort_after_events = rng.randint(1, 3)
            else:
                job.abort_timeout = rng.uniform(0.002, 0.08)
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------- one client request


async def run_job(session: aiohttp.ClientSession, url: str, job: Job, messages: list[dict], max_tokens: int) -> Optional[str]:
    """The reply's text; None when this client gave up on purpose."""
    body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "stream": job.stream}
    request = _streamed(session, url, body, job.abort_after_events) if job.stream else _whole(session, url, body)
    if job.abort_timeout is not None:
        try:
            return await asyncio.wait_for(request, job.abort_timeout)
        except asyncio.TimeoutError:
            return None
    return await asyncio.wait_for(request, REQUEST_TIMEOUT_S)


async def _whole(session: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with session.post(url, json=body) as response:
        payload = await response.json()
        assert response.status == 200, payload
        return payload["choices"][0]["message"]["content"] or ""


async def _streamed(session: aiohttp.ClientSession, url: str, body: dict, abort_after: Optional[int]) -> Optional[str]:
    text, events, finished = "", 0, False
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                assert finished, "[DONE] without a finish_reason"
                return text
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            events += 1
            if abort_after is not None and events >= abort_after:
                return None  # leaving the block closes the connection mid-stream
            choice = chunk["choices"][0]
            text += choice["delta"].get("content") or ""
            finished = finished or choice["finish_reason"] is not None
    if abort_after is not None:
        return None  # the reply was shorter than the planned abort point
    raise AssertionError("the stream ended without [DONE]")


# ----------------------------------------------------------------- the soak


def health(server: Server) -> dict:
    with urllib.request.urlopen(f"{server.root}/health", timeout=5) as response:
        return json.loads(response.read())


async def watch_pool(server: Server, peaks: list[int], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{server.root}/health") as response:
                pool = (await response.json())["workers"][0].get("pool")  # none while a worker restarts
                if pool is not None:
                    assert pool["capacity_bytes"] == CACHE_BYTES
                    peaks.append(pool["bytes"])
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def expected(nocache_proxy) -> list[str]:
    c = openai.OpenAI(base_url=nocache_proxy.base_url, api_key="x", max_retries=0, timeout=60)
    model = c.models.list().data[0].id
    return [
        c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens).choices[0].message.content or ""
        for messages, max_tokens in conversations()
    ]


async def test_soak_with_client_aborts(tiny_model, log_dir, expected):
    prompts = conversations()
    jobs = plan(len(prompts))
    with running_proxy(tiny_model, log_dir, "--cache-bytes", str(CACHE_BYTES), name="soak") as server:
        pid = health(server)["workers"][0]["pid"]
        url = f"{server.base_url}/chat/completions"
        todo: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            todo.put_nowait(job)
        results: dict[int, Optional[str]] = {}

        async def client_loop() -> None:
            async with aiohttp.ClientSession() as session:
                while not todo.empty():
                    job = todo.get_nowait()
                    messages, max_tokens = prompts[job.prompt]
                    results[job.index] = await run_job(session, url, job, messages, max_tokens)

        peaks: list[int] = []
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(watch_pool(server, peaks, stop_watch))
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), SOAK_BOUND_S)
        finally:
            stop_watch.set()
            await watcher
        took = time.monotonic() - started

        assert len(results) == N_REQUESTS  # none lost
        answered = {i: text for i, text in results.items() if text is not None}
        aborted = N_REQUESTS - len(answered)
        planned_aborts = sum(j.abort_after_events is not None or j.abort_timeout is not None for j in jobs)
        assert 10 <= aborted <= planned_aborts
        wrong = [i for i, text in answered.items() if text != expected[jobs[i].prompt]]
        assert not wrong, f"{len(wrong)} replies differ from a cold run, e.g. request {wrong[0]}"

        # Still the same worker, idle, its pool inside the budget; and it answers.
        deadline = time.monotonic() + 10
        while (status := health(server)["workers"][0])["queue"]["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # aborted requests may still be draining
        assert status["alive"] and status["pid"] == pid
        assert status["queue"] == {"waiting": 0, "running": False, "max_waiting": status["queue"]["max_waiting"]}
        assert peaks and max(peaks + [status["pool"]["bytes"]]) <= CACHE_BYTES
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        messages, max_tokens = prompts[0]
        reply = c.chat.completions.create(model="default_model", messages=messages, max_tokens=max_tokens)
        assert reply.choices[0].message.content == expected[0]
        log = server.log()
        # Nothing went wrong in the proxy (any logger: ours, aiohttp's, asyncio's). Worker lines
        # ("... worker[pid] LEVEL ...") are left out: its disk tier logs the entries it skips.
        proxy_errors = re.findall(r"^\S+ \S+ (?:ERROR|CRITICAL) .*$", log, re.MULTILINE)
        assert not proxy_errors, proxy_errors[:3]
        assert "Task exception was never retrieved" not in log
        assert "status=client_gone" in log
    assert server.process.returncode == 0
    print(f"soak: {N_REQUESTS} requests, {aborted} aborted, {took:.1f}s, pool peak {max(peaks)} B")


# ----------------------------------------------------------------- batched, with a worker killed mid-way

BATCHED_REQUESTS = 300
BATCHED_CLIENTS = 12
BATCHED_BOUND_S = 240.0


async def _answer_or_failure(session, url, job, messages, max_tokens) -> tuple[str, Optional[str]]:
    """("ok", text), ("aborted", None), or ("failed", why) for a request the killed worker was running."""
    try:
        text = await run_job(session, url, job, messages, max_tokens)
    except AssertionError as exc:
        return "failed", str(exc)
    return ("aborted", None) if text is None else ("ok", text)


async def test_batched_soak_with_aborts_and_a_worker_kill(tiny_model, log_dir, expected):
    """300 requests from 12 clients, batching on, random aborts, kill -9 of the worker at the half.

    None is lost: every request gets its reply, its planned abort, or (only those the killed worker
    was running) an error that names the worker; the queued ones finish on the restarted worker.
    Afterwards the pool is inside its budget and holds no lease.
    """
    prompts = conversations()
    rng = random.Random(SEED + 1)
    jobs = []
    for index in range(BATCHED_REQUESTS):
        job = Job(index, rng.randrange(len(prompts)), stream=rng.random() < 0.5)
        if rng.random() < 0.2:
            if job.stream:
                job.abort_after_events = rng.randint(1, 3)
            else:
                job.abort_timeout = rng.uniform(0.005, 0.1)
        jobs.append(job)
    with running_proxy(tiny_model, log_dir, "--cache-bytes", str(CACHE_BYTES), name="soak-batched") as server:
        first_pid = health(server)["workers"][0]["pid"]
        max_batch = health(server)["workers"][0]["max_batch"]
        assert max_batch > 1
        url = f"{server.base_url}/chat/completions"
        todo: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            todo.put_nowait(job)
        results: dict[int, tuple[str, Optional[str]]] = {}
        killed = asyncio.Event()

        async def client_loop() -> None:
            async with aiohttp.ClientSession() as session:
                while not todo.empty():
                    job = todo.get_nowait()
                    messages, max_tokens = prompts[job.prompt]
                    results[job.index] = await _answer_or_failure(session, url, job, messages, max_tokens)
                    if len(results) == BATCHED_REQUESTS // 2 and not killed.is_set():
                        killed.set()
                        os.kill(first_pid, signal.SIGKILL)

        peaks: list[int] = []
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(watch_pool(server, peaks, stop_watch))
        try:
            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(BATCHED_CLIENTS))), BATCHED_BOUND_S)
        finally:
            stop_watch.set()
            await watcher

        assert killed.is_set() and len(results) == BATCHED_REQUESTS  # none lost
        failed = {i: why for i, (kind, why) in results.items() if kind == "failed"}
        # Only what the killed worker had in flight fails, and says why.
        assert len(failed) <= max_batch, failed
        assert all("unavailable" in why or "worker" in why for why in failed.values()), failed
        answered = {i: text for i, (kind, text) in results.items() if kind == "ok"}
        wrong = [i for i, text in answered.items() if text != expected[jobs[i].prompt]]
        assert not wrong, f"{len(wrong)} replies differ from a cold run, e.g. request {wrong[0]}"
        assert len(answered) >= BATCHED_REQUESTS * 0.7

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = health(server)["workers"][0]
            if not status["queue"]["running"] and status["pool"].get("leases") == 0:
                break
            await asyncio.sleep(0.2)
        assert status["alive"] and status["pid"] != first_pid  # restarted
        assert status["pool"]["leases"] == 0 and status["pool"]["pinned_sequences"] == 0
        assert max(peaks + [status["pool"]["bytes"]]) <= CACHE_BYTES
    print(f"batched soak: {BATCHED_REQUESTS} requests, {len(failed)} failed with the killed worker, "
          f"{BATCHED_REQUESTS - len(answered) - len(failed)} aborted")

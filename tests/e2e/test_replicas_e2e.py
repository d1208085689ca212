"""Two local replicas of the tiny model: agents keep their caches, and a replica killed mid-run loses nothing.

Eight agents, each with its own system prompt and a history that grows turn by turn, run at
once against one worker, then against two replicas (--replicas 2). Routing must keep each agent
on the replica holding its history: the cached tokens stay within 5% of the single worker's. The
throughput of both runs is printed (this machine has 2 cores shared with other work: the tiny
model on CPU is compute-bound, so the figure is reported, not asserted), with the routing
decisions from /metrics.

Then a replica's worker is killed with SIGKILL while agents run: every request still completes
(those waiting for it, or not yet past their prefill, are routed to the other replica; one whose
output had begun fails with a 503 that the client retries), and the replica rejoins.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest

from tests.e2e.conftest import Server, running_proxy

pytestmark = pytest.mark.slow

AGENTS = 8
TURNS = 4
MAX_TOKENS = 8


def system_prompt(agent: int) -> str:
    return f"You are agent {agent} of a team; your task is number {agent * 7919}. " + (
        f"Agent {agent} keeps notes on its own work and answers in a few words. " * 12
    )


def run_agent(server: Server, agent: int, turns: int, out: list[dict], errors: list, max_retries: int = 0) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=max_retries, timeout=300)
    messages = [{"role": "system", "content": system_prompt(agent)}]
    try:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Step {turn} for agent {agent}: what next?"})
            reply = client.chat.completions.create(
                model="default_model", messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            usage = reply.usage
            out.append({
                "agent": agent, "turn": turn, "prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
                "cached": usage.prompt_tokens_details.cached_tokens or 0,
            })  # fmt: skip
            messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append((agent, repr(exc)))


def run_workload(server: Server, turns: int = TURNS, max_retries: int = 0, during=None) -> tuple[list[dict], list, float]:
    results: list[dict] = []
    errors: list = []
    threads = [threading.Thread(target=run_agent, args=(server, i, turns, results, errors, max_retries))
               for i in range(AGENTS)]  # fmt: skip
    start = time.monotonic()
    for thread in threads:
        thread.start()
    if during is not None:
        during(results)
    for thread in threads:
        thread.join(600)
    return results, errors, time.monotonic() - start


def route_decisions(server: Server) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"{server.root}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("mlx_cache_proxy_route_decisions_total{"):
            labels, value = line[line.index("{") + 1 : line.index("}")], float(line.rsplit(" ", 1)[1])
            fields = dict(part.split("=") for part in labels.split(","))
            out[(fields["replica"].strip('"'), fields["reason"].strip('"'))] = value
    return out


def health(server: Server) -> dict:
    try:
        with urllib.request.urlopen(f"{server.root}/health", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def summary(results: list[dict], seconds: float) -> dict:
    completion = sum(r["completion"] for r in results)
    prompt = sum(r["prompt"] for r in results)
    return {
        "requests": len(results), "cached": sum(r["cached"] for r in results), "prompt": prompt,
        "seconds": round(seconds, 2), "requests_per_s": round(len(results) / seconds, 3),
        "tokens_per_s": round((prompt + completion) / seconds, 1),
    }  # fmt: skip


def test_two_replicas_keep_each_agents_cache(tiny_model, log_dir):
    common = ("--disk-cache-bytes", "0")
    with running_proxy(tiny_model, log_dir, *common, name="replicas-one") as one:
        single, errors, seconds = run_workload(one)
        assert not errors, errors
        alone = summary(single, seconds)
    with running_proxy(tiny_model, log_dir, "--replicas", "2", *common, name="replicas-two") as two:
        assert len(health(two)["workers"]) == 2
        double, errors, seconds = run_workload(two)
        assert not errors, errors
        both = summary(double, seconds)
        decisions = route_decisions(two)
    print(f"\nreplicas: one worker {alone}\nreplicas: two replicas {both}")
    print(f"replicas: throughput ratio {both['tokens_per_s'] / alone['tokens_per_s']:.2f}x (2 cores, shared)")
    print(f"replicas: routing decisions {decisions}")
    assert len(double) == len(single) == AGENTS * TURNS
    assert both["cached"] >= 0.95 * alone["cached"] > 0
    assert sum(decisions.values()) == AGENTS * TURNS
    # Every later turn follows its agent's history; the first turns spread by load over both replicas.
    assert sum(v for (_, reason), v in decisions.items() if reason == "cache") >= AGENTS * (TURNS - 1)
    assert all(sum(v for (r, _), v in decisions.items() if r == replica) > 0 for replica in ("0", "1"))


def test_a_replica_killed_mid_run_loses_no_request(tiny_model, log_dir):
    with running_proxy(tiny_model, log_dir, "--replicas", "2", "--max-batch", "2", "--disk-cache-bytes", "0",
                       name="replicas-kill") as server:  # fmt: skip
        workers = health(server)["workers"]
        victim = next(w for w in workers if w["replica"] == "1")["pid"]

        def kill_when_busy(results: list[dict]) -> None:
            deadline = time.monotonic() + 120
            while len(results) < AGENTS and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)

        # The openai client's default retries: a request whose output had begun on the killed
        # replica gets a 503 with Retry-After, and is asked again.
        results, errors, _ = run_workload(server, turns=TURNS + 2, max_retries=2, during=kill_when_busy)
        assert not errors, errors
        assert len(results) == AGENTS * (TURNS + 2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(w["ready"] for w in health(server)["workers"]):
            time.sleep(0.5)
        after = health(server)
        assert all(w["ready"] for w in after["workers"]), after  # the replica rejoined
        assert next(w for w in after["workers"] if w["replica"] == "1")["restarts"] == 1
        log = server.log()
        moved = log.count("move to the others")
        refused = log.count('" 503 ')  # answered 503 (output had begun), retried by the client
        print(f"\nreplicas: after kill -9, {len(results)} requests completed; waiting-request moves logged: "
              f"{moved}; 503s the client retried: {refused}")


def test_local_replicas_keep_a_disk_tier_each_and_one_that_cannot_start_fails_start_up(tiny_model, log_dir, tmp_path):
    import subprocess
    import sys

    from tests.e2e.conftest import REPO, free_port
    from worker.disk_lock import DirectoryLock
    from worker.fingerprint import model_fingerprint

    disk = tmp_path / "disk"
    with running_proxy(tiny_model, log_dir, "--replicas", "2", "--cache-dir", str(disk), name="replica-disks") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert sorted(p.name for p in disk.iterdir()) == ["replica-0", "replica-1"]  # no lock between them

    held = disk / "replica-0" / model_fingerprint(tiny_model)  # another process holds replica 0's tier
    held.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(held)
    lock.acquire()
    try:
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--model", str(tiny_model), "--port", str(free_port()),
                "--replicas", "2", "--cache-dir", str(disk)]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr[-2000:]
        assert time.monotonic() - started < 60
        assert "is in use by another worker" in done.stderr + done.stdout
    finally:
        lock.release()

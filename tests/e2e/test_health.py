"""Readiness against liveness: a stopped worker makes /health 503 within seconds, and 200 again when it answers.

SIGSTOP freezes the whole worker, its IO thread too, so nothing answers the
proxy's pings: that is what a hung process looks like. It is not restarted
for a few seconds' silence (--heartbeat-timeout decides its death), and
/health/live stays 200 throughout.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest

from tests.e2e.conftest import running_proxy
from tests.e2e.test_faults import ask, health, restarts, wait_until, worker

pytestmark = pytest.mark.slow


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_stopped_worker_makes_health_503_within_seconds_and_200_when_it_answers_again(tiny_model, log_dir):
    with running_proxy(tiny_model, log_dir, "--unresponsive-after", "2", name="health") as server:
        pid = worker(server)["pid"]
        assert status_of(f"{server.root}/health") == 200 and status_of(f"{server.root}/health/live") == 200
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_until(lambda: status_of(f"{server.root}/health") == 503, 10, "/health to say 503")
            assert time.monotonic() - stopped_at < 6
            body = health(server)
            assert body["status"] == "degraded"
            assert body["problems"] and body["problems"][0].startswith(f"{tiny_model}:")
            assert "not answering" in body["problems"][0]
            assert not worker(server)["ready"] and worker(server)["alive"]
            assert status_of(f"{server.root}/health/live") == 200
            assert status_of(f"{server.root}/v1/health/live") == 200
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: status_of(f"{server.root}/health") == 200, 10, "/health to say 200 again")
        assert worker(server)["pid"] == pid and restarts(server) == 0  # silence alone kills nothing
        assert ask(server, "hello again")

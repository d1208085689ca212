"""Batching figures in /metrics, /health and the request log line, fed the way requests and heartbeats feed them."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from protocol.messages import CacheFacts, MemoryStats, PoolStats, RestoreKind, Stats, Timings
from proxy.logs import JsonFormatter
from proxy.config import ModelSpec
from proxy.served_model import Replica, ServedModel
from proxy.metrics import Metrics, WorkerView
from proxy.request_log import RequestRecord
from proxy.request_queue import RequestQueue
from proxy.routes import _worker_health
from tests.unit.test_worker_client import HELLO

FACTS = CacheFacts(10, 0, 10, 0, RestoreKind.NONE, PoolStats())


def finished(generated: int, timings: Timings | None) -> RequestRecord:
    record = RequestRecord("req-1", "m", prompt_tokens=10, model_key="m", generated_tokens=generated)
    record.facts, record.timings, record.finish_reason = FACTS, timings, "length"
    record.started = record.first_token = record.finished = record.arrived
    return record


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    found = metrics.registry.get_sample_value(f"mlx_cache_proxy_{name}", {"model": "m", **labels})
    if found is None:  # a worker's figure: one per replica
        found = metrics.registry.get_sample_value(f"mlx_cache_proxy_{name}", {"model": "m", "replica": "0", **labels})
    return found


def test_time_per_output_token_and_decode_step_time_per_finished_request():
    metrics = Metrics()
    metrics.observe_record(finished(5, Timings(decode_s=0.2, decode_steps=4, batch_size_max=3)))

    assert sample(metrics, "time_per_output_token_seconds_count") == 1
    assert sample(metrics, "time_per_output_token_seconds_sum") == pytest.approx(0.05)  # 0.2 s over 4 intervals
    assert sample(metrics, "time_per_output_token_seconds_bucket", le="0.05") == 1
    assert sample(metrics, "time_per_output_token_seconds_bucket", le="0.03") == 0
    assert sample(metrics, "decode_step_seconds_sum") == pytest.approx(0.05)
    assert sample(metrics, "queue_wait_seconds_count") == 1  # still observed alongside


def test_requests_without_decode_intervals_or_steps_observe_nothing():
    metrics = Metrics()
    metrics.observe_record(finished(1, Timings(decode_s=0.001, decode_steps=0)))  # one token: no interval
    metrics.observe_record(finished(3, None))  # no Result: no worker timings

    assert not sample(metrics, "time_per_output_token_seconds_count")
    assert not sample(metrics, "decode_step_seconds_count")
    assert sample(metrics, "requests_total", status="200", finish_reason="length") == 2


def test_batch_size_limit_and_pinned_leases_come_from_the_worker_view():
    metrics = Metrics()
    pool = PoolStats(sequences=5, checkpoints=9, leases=3, pinned_sequences=2, pinned_checkpoints=4)
    metrics.watch_workers(lambda: [WorkerView("m", 1, 3, 0, pool, MemoryStats(), max_running=8)])

    assert sample(metrics, "running_requests") == 3
    assert sample(metrics, "max_running_requests") == 8
    assert sample(metrics, "pool_leases") == 3
    assert sample(metrics, "pool_pinned_sequences") == 2
    assert sample(metrics, "pool_pinned_checkpoints") == 4


def test_the_log_line_and_its_json_show_the_batch_size_the_request_ran_in():
    record = finished(5, Timings(decode_steps=4, batch_size_max=3, batch_size_mean=2.5))
    assert " batch=3 " in f" {record.line()} " and record.fields()["batch_size_max"] == 3

    unfinished = finished(0, None)
    assert " batch=- " in f" {unfinished.line()} " and unfinished.fields()["batch_size_max"] is None

    log_record = logging.makeLogRecord({"msg": record.line(), **record.fields()})
    assert json.loads(JsonFormatter().format(log_record))["batch_size_max"] == 3


async def test_health_shows_the_running_requests_and_the_batch_limit():
    queue = RequestQueue(max_waiting=4, max_running=2)
    tickets = [queue.enter() for _ in range(3)]
    stats = Stats(memory=MemoryStats(), pool=PoolStats(leases=2, pinned_sequences=1), running_requests=["a", "b"])
    client = SimpleNamespace(hello=replace(HELLO, max_batch=2), stats=stats, endpoint="ipc://w", alive=True,
                             failure=None, last_seen=time.monotonic())
    supervisor = SimpleNamespace(client=client, process=None, restarts=0, link_refused=None)
    served = ServedModel(ModelSpec("m", None), [Replica(0, supervisor, queue)], tokenizer=None)

    health = _worker_health(served)

    assert health["running_requests"] == 2 and "running_request" not in health  # a count: no ids on an open route
    assert health["queue"] == {"waiting": 1, "running": 2, "max_waiting": 4}
    assert health["max_batch"] == 2
    assert (health["pool"]["leases"], health["pool"]["pinned_sequences"]) == (2, 1)
    for ticket in tickets:
        ticket.release()


def test_build_info_and_process_metrics_are_exported():
    from proxy.process_metrics import PortableProcessCollector
    from proxy.version import versions

    metrics = Metrics()
    assert metrics.registry.get_sample_value("mlx_cache_proxy_build_info", versions()) == 1
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"):
        assert metrics.registry.get_sample_value(name) is not None, name
    # the collector macOS gets (no /proc) yields the same names
    samples = {s.name: s.value for family in PortableProcessCollector().collect() for s in family.samples}
    assert samples["process_cpu_seconds_total"] > 0 and samples["process_open_fds"] > 0
    assert abs(samples["process_start_time_seconds"] - time.time()) < 3600

"""Prometheus metrics: what an operator needs to see whether the cache is working.

Names start with `mlx_cache_proxy_`, use base units, counters end in `_total`,
and everything is labelled by model. Request figures are observed here as each
request ends; worker figures (pool, memory, disk) come from the workers' latest
ZeroMQ heartbeat through a collector that runs at scrape time: nothing scrapes
the worker itself. `build_info` names the versions running; `process_*` are the
proxy process's own (Prometheus' standard names, `proxy.process_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.messages import CacheFacts, MemoryStats, PoolStats, RestoreKind, Timings
from proxy.process_metrics import register_process_metrics
from proxy.request_log import RequestRecord
from proxy.version import versions

PREFIX = "mlx_cache_proxy"

# `*_created` series double the output and help no dashboard.
disable_created_metrics()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# From a cached turn (tens of ms) to a cold 60K-token prefill (minutes).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Refusals that protect the service rather than report a client mistake.
GUARD_CODES = frozenset({"context_length_exceeded", "insufficient_memory", "queue_full"})

QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Per output token and per decode step: a tiny model alone (1 ms) to a big one in a full batch (1 s).
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class WorkerView:
    """What the collector reads about one served model at scrape time."""

    model: str
    queue_depth: int
    running: int  # requests holding a turn: the batch in flight at the worker
    restarts: int
    pool: Optional[PoolStats]
    memory: Optional[MemoryStats]
    memory_limit: int = 0  # the worker's memory budget, from its Hello
    max_running: int = 1  # requests the worker runs at once, from its Hello
    replica: str = "0"  # which of the model's workers (--replicas, or several --worker NAME=...)
    up: bool = True
    prefix_blocks: int = 0  # prefix blocks its pool holds, as its events told the router
    routed: dict[str, int] = field(default_factory=dict)  # routing decisions that chose it, by reason


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        build = versions()
        Gauge(f"{PREFIX}_build_info", "Always 1; the labels name the versions running", list(build),
              registry=r).labels(**build).set(1)  # fmt: skip
        register_process_metrics(r)
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered, by HTTP status and finish reason",
            ["model", "status", "finish_reason"], registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens received", ["model"], registry=r)
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens", "Prompt tokens restored from the cache, not computed", ["model"], registry=r
        )
        self.recomputed_tokens = Counter(
            f"{PREFIX}_recomputed_tokens", "Prompt tokens computed (prefilled)", ["model"], registry=r
        )
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.lookups = Counter(f"{PREFIX}_cache_lookups", "Cache lookups (one per request)", ["model"], registry=r)
        self.hits = Counter(
            f"{PREFIX}_cache_hits", "Lookups that restored at least one token", ["model", "restore_kind"], registry=r
        )
        self.rejections = Counter(
            f"{PREFIX}_guard_rejections", "Requests refused by a guard, by reason", ["model", "reason"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From request arrival to the first generated token",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prefill = Histogram(
            f"{PREFIX}_prefill_seconds", "Worker time restoring and prefilling one prompt",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_request_duration_seconds", "From request arrival to its last byte",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time a request waited for its worker", ["model"],
            buckets=QUEUE_BUCKETS, registry=r,
        )
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Worker decode time per generated token after the first, one observation per request",
            ["model"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.decode_step = Histogram(
            f"{PREFIX}_decode_step_seconds",
            "Mean time of one batched decode step a request took part in, one observation per request",
            ["model"], buckets=TOKEN_BUCKETS, registry=r,
        )

    # ------------------------------------------------------------- observing requests

    def observe_cache(self, model: str, facts: CacheFacts) -> None:
        self.lookups.labels(model).inc()
        self.prompt_tokens.labels(model).inc(facts.prompt_tokens)
        self.cached_tokens.labels(model).inc(facts.cached_tokens)
        self.recomputed_tokens.labels(model).inc(facts.recomputed_tokens)
        if facts.cached_tokens > 0:
            kind = "disk" if facts.restored_from_disk else RestoreKind(facts.restore_kind).value
            self.hits.labels(model, kind).inc()

    def observe_request(
        self,
        model: str,
        status: int,
        finish_reason: str,
        generated_tokens: int = 0,
        ttft_s: Optional[float] = None,
        prefill_s: Optional[float] = None,
        total_s: Optional[float] = None,
        queue_wait_s: Optional[float] = None,
    ) -> None:
        self.requests.labels(model, str(status), finish_reason or "none").inc()
        if generated_tokens:
            self.generated_tokens.labels(model).inc(generated_tokens)
        for histogram, value in (
            (self.ttft, ttft_s), (self.prefill, prefill_s), (self.e2e, total_s), (self.queue_wait, queue_wait_s)
        ):
            if value is not None:
                histogram.labels(model).observe(value)

    def observe_decode(self, model: str, timings: Timings, generated_tokens: int) -> None:
        """Per-token and per-step decode time of one finished request."""
        if generated_tokens >= 2:  # decode_s runs from the first token: one token has no interval
            self.time_per_output_token.labels(model).observe(timings.decode_s / (generated_tokens - 1))
        if timings.decode_steps > 0:
            self.decode_step.labels(model).observe(timings.decode_s / timings.decode_steps)

    def rejected(self, model: str, reason: str) -> None:
        self.rejections.labels(model, reason).inc()

    def observe_record(self, record: RequestRecord) -> None:
        """A request that reached its queue, as it is logged."""
        if record.facts is not None:
            self.observe_cache(record.model_key, record.facts)
        if record.error_code in GUARD_CODES:
            self.rejected(record.model_key, record.error_code)
        timings = record.timings
        if timings is not None:
            self.observe_decode(record.model_key, timings, record.generated_tokens)
        self.observe_request(
            record.model_key,
            record.http_status,
            record.finish_reason or ("error" if record.error_code else ""),
            record.generated_tokens,
            ttft_s=record.seconds(record.first_token),
            prefill_s=(timings.restore_s + timings.prefill_s) if timings is not None else None,
            total_s=record.seconds(record.finished),
            queue_wait_s=record.seconds(record.started),
        )

    def observe_refusal(self, model: str, status: int, code: str | None) -> None:
        """A generation request answered with an error before it reached its queue."""
        if code in GUARD_CODES:
            self.rejected(model, code)
        self.observe_request(model, status, "error")

    # ------------------------------------------------------------- worker figures

    def watch_workers(self, views: Callable[[], Iterable[WorkerView]]) -> None:
        """Export worker figures read at scrape time from `views()`."""
        self.registry.register(_WorkerCollector(views))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector(Collector):
    def __init__(self, views: Callable[[], Iterable[WorkerView]]):
        self._views = views

    def describe(self):
        return []  # figures only exist once workers report; nothing to describe up front

    def collect(self):
        gauges = {
            name: GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["model", "replica"])
            for name, doc in (
                ("worker_up", "1 while the worker is up (handshake done, not dead), else 0"),
                ("prefix_blocks", "Prefix blocks the worker's pool can restore, as its cache events tell the router"),
                ("queue_depth", "Requests waiting for their worker"),
                ("running_requests", "Requests holding a turn at the worker: the running batch size"),
                ("max_running_requests", "Requests the worker runs at once (its max_batch)"),
                ("pool_bytes", "Bytes held by the checkpoint pool"),
                ("pool_capacity_bytes", "Byte budget of the checkpoint pool"),
                ("pool_checkpoints", "Checkpoints held by the pool"),
                ("pool_sequences", "Sequences (KV caches) held by the pool"),
                ("pool_leases", "Caches checked out to running requests"),
                ("pool_pinned_sequences", "Pool sequences held by a running request (not evictable)"),
                ("pool_pinned_checkpoints", "Pool checkpoints held by a running request (not evictable)"),
                ("mlx_active_memory_bytes", "MLX active memory of the worker"),
                ("mlx_peak_memory_bytes", "MLX peak memory of the worker since it started"),
                ("memory_limit_bytes", "The worker's memory budget"),
                ("disk_bytes", "Bytes held by the disk tier"),
                ("disk_entries", "Sequences held by the disk tier"),
                ("disk_pending_bytes", "Bytes of sequences waiting in worker memory to be written to disk"),
            )
        }
        counters = {
            name: CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model", "replica"])
            for name, doc in (
                ("pool_evictions", "Pool units evicted (since the worker started)"),
                ("worker_restarts", "Times the worker process was restarted"),
                ("disk_hits", "Restores that came from the disk tier"),
                ("disk_read_bytes", "Bytes read from the disk tier"),
                ("disk_written_bytes", "Bytes written to the disk tier"),
                ("disk_load_seconds", "Seconds spent loading from the disk tier"),
                ("disk_write_failures", "Disk tier writes that failed (full disk, I/O error) and were dropped"),
            )
        }
        routed = CounterMetricFamily(
            f"{PREFIX}_route_decisions", "Requests routed to the replica, by reason: cache (longest cached "
            "prefix), load (least loaded), only (one candidate)", labels=["model", "replica", "reason"],
        )  # fmt: skip
        for view in self._views():
            m = [view.model, view.replica]
            gauges["worker_up"].add_metric(m, 1 if view.up else 0)
            gauges["prefix_blocks"].add_metric(m, view.prefix_blocks)
            for reason, count in sorted(view.routed.items()):
                routed.add_metric([*m, reason], count)
            gauges["queue_depth"].add_metric(m, view.queue_depth)
            gauges["running_requests"].add_metric(m, view.running)
            gauges["max_running_requests"].add_metric(m, view.max_running)
            counters["worker_restarts"].add_metric(m, view.restarts)
            if view.pool is not None:
                gauges["pool_bytes"].add_metric(m, view.pool.bytes)
                gauges["pool_capacity_bytes"].add_metric(m, view.pool.capacity_bytes)
                gauges["pool_checkpoints"].add_metric(m, view.pool.checkpoints)
                gauges["pool_sequences"].add_metric(m, view.pool.sequences)
                gauges["pool_leases"].add_metric(m, view.pool.leases)
                gauges["pool_pinned_sequences"].add_metric(m, view.pool.pinned_sequences)
                gauges["pool_pinned_checkpoints"].add_metric(m, view.pool.pinned_checkpoints)
                counters["pool_evictions"].add_metric(m, view.pool.evictions)
                disk = view.pool.disk
                if disk is not None:
                    gauges["disk_bytes"].add_metric(m, disk.bytes)
                    gauges["disk_entries"].add_metric(m, disk.entries)
                    counters["disk_hits"].add_metric(m, disk.hits)
                    counters["disk_read_bytes"].add_metric(m, disk.read_bytes)
                    counters["disk_written_bytes"].add_metric(m, disk.written_bytes)
                    counters["disk_load_seconds"].add_metric(m, disk.load_seconds)
                    counters["disk_write_failures"].add_metric(m, disk.write_failures)
                    gauges["disk_pending_bytes"].add_metric(m, disk.pending_bytes)
            if view.memory_limit:
                gauges["memory_limit_bytes"].add_metric(m, view.memory_limit)
            if view.memory is not None:
                gauges["mlx_active_memory_bytes"].add_metric(m, view.memory.active)
                gauges["mlx_peak_memory_bytes"].add_metric(m, view.memory.peak)
        yield from gauges.values()
        yield from counters.values()
        yield routed

"""The proxy's configuration: plain frozen records, built by `proxy.serve`.

Nothing here parses a command line or touches the disk, so tests build a
`ProxyConfig` directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from protocol.curve import ClientKeys

DEFAULT_MODEL_ID = "default"
# mlx_lm.server's name for "the model given on the command line".
DEFAULT_MODEL_ALIAS = "default_model"

GIB = 1024**3

# An alias holding one of these is an fnmatch pattern (`claude-*`), not a name.
NAME_PATTERN_CHARS = "*?["


def is_name_pattern(name: str) -> bool:
    return any(c in name for c in NAME_PATTERN_CHARS)


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its public id and where its worker is."""

    model_id: str  # exactly as given with --model (or --worker NAME=...)
    path: Optional[Path]  # local model directory: tokenizer, and a local worker's --model
    endpoint: Optional[str] = None  # a worker already running elsewhere; None: start one
    aliases: tuple[str, ...] = ()  # other names, or fnmatch patterns (`claude-*`), it answers to
    link_keys: Optional["ClientKeys"] = None  # CURVE to a remote worker: our key pair and its public key
    # A local replica's own directory under --cache-dir (a disk tier is locked by one worker): "" for one worker
    disk_subdir: str = ""


@dataclass(frozen=True)
class WorkerOptions:
    """How local workers are started and how every worker is watched."""

    cache_bytes: Optional[int] = None  # None: the worker's default (worker/memory_guard.py)
    checkpoint_interval: Optional[int] = None
    no_cache: bool = False
    prefill_step: Optional[int] = None
    max_batch: Optional[int] = None  # requests a local worker runs at once; None: the worker's default
    heartbeat_interval: float = 1.0  # asked of local workers; the proxy pings at this pace too
    heartbeat_timeout: float = 60.0  # silence after which a worker counts as dead
    unresponsive_after: float = 5.0  # silence after which /health says not ready (the worker is not killed)
    start_timeout: float = 600.0  # model load + handshake
    stop_timeout: float = 10.0  # Shutdown -> exit, before SIGTERM
    abort_timeout: float = 30.0  # Abort -> the worker's last message for that request
    cache_dir: str = ""  # the disk tier's directory; "" turns it off
    disk_cache_bytes: int = 32 * GIB
    memory_limit: int = 0  # per worker; 0: the worker picks its device's budget
    max_kv_size: int = 0  # per request: prompt + max_tokens; 0: the model's context limit
    log_level: str = "info"
    log_format: str = "text"
    log_file: str = ""  # workers log here too, so one rotated file holds everything
    stderr_level: str = ""  # "": log_level
    restart_backoff: float = 0.5  # before the first restart of a dead worker; doubles per failed attempt
    restart_backoff_max: float = 30.0  # the back-off's cap
    restart_backoff_reset: float = 60.0  # a worker up this long starts the back-off over when it dies
    unavailable_timeout: float = 120.0  # requests wait this long for a dead worker to come back, then 503


@dataclass(frozen=True)
class ProxyConfig:
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    max_queue: int = 32  # waiting requests per worker (the running one not counted)
    upstream: Optional[str] = None
    default_model: Optional[str] = None  # serves requests for unknown model names; None: they get 404
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    default_max_tokens: int = 512
    keepalive_interval: float = 5.0  # SSE comment while nothing else is sent
    progress_every: int = 512  # prompt tokens between Progress messages
    shutdown_timeout: float = 30.0  # for the running requests on SIGTERM
    max_hints: int = 8  # message boundaries hinted to the worker
    max_body_bytes: int = 16 * 1024**2
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # none: no key needed (proxy/auth.py)
    protect_metrics: bool = False  # /metrics needs a key too
    cors_origins: tuple[str, ...] = ()  # proxy/cors.py
    body_timeout: float = 30.0  # the whole request body, from the end of its headers (proxy/request_body.py)
    idle_timeout: float = 15.0  # keep-alive and request-header limit (proxy/listener.py)
    max_connections: int = 0  # 0: from the open-file limit (proxy/connections.py)
    reasoning_field: str = "both"  # reasoning, reasoning_content or both, in chat messages and deltas
    route_cache_weight: float = 1.0  # replicas: proxy/routing.py
    route_prefill_tps: float = 0.0  # replicas: 0 = measured


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from "8589934592", "512M", "8G", "1.5GiB", "64kb" (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512M, 8G, 1073741824)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])

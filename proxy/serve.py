"""`mlx-cache-proxy serve`: the OpenAI-compatible proxy and its workers.

Exit codes: 0 after a stop, 1 when a worker cannot start, 2 for a configuration
error (options, models, an address that cannot be used), 3 when the port is in
use (checked first, before any model is resolved or loaded).

SIGTERM/SIGINT only ask aiohttp's loop to stop; the shutdown itself is the
app's: stop listening, let running requests finish (bounded by
--shutdown-timeout), stop the workers, exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

from proxy.config import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_MODEL_ID,
    ModelSpec,
    ProxyConfig,
    WorkerOptions,
    is_name_pattern,
)
from proxy.listener import EXIT_PORT_IN_USE, ListenError, ListenOptions, bind_sockets, run_app
from proxy.logs import setup_logging
from proxy.options import OptionError, default_cache_dir, resolve

log = logging.getLogger("mlx_cache_proxy")

# The worker's own watchdog allows 15 s to stop plus 120 s to save (worker/main.py).
WORKER_SAVE_TIMEOUT_S = 140.0


def _local_replicas(spec: ModelSpec, replicas: int) -> list[ModelSpec]:
    """`replicas` local workers of `spec`, each with its own disk tier directory when there are several."""
    if replicas == 1:
        return [spec]
    return [dataclasses.replace(spec, disk_subdir=f"replica-{i}") for i in range(replicas)]


def model_specs(
    models: list[str], workers: list[str], aliases: list[str] = (), replicas: int = 1
) -> tuple[ModelSpec, ...]:
    """Resolve --model, --worker and --alias values; the first model also answers to 'default_model'.

    A spec per worker: each --model (and the built-in default) `replicas` times, and --worker names
    given more than once are replicas of one model (proxy/routing.py picks one per request).
    """
    from proxy.model_source import ModelSourceError, check_model_dir, resolve_model_path

    specs: list[ModelSpec] = []
    for model in models:
        specs.append(ModelSpec(model_id=model, path=check_model_dir(resolve_model_path(model, download=True), model)))
    for item in workers:
        name, sep, endpoint = item.partition("=")
        if not sep or not name or not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"--worker {item!r}: expected NAME=tcp://host:port or NAME=ipc://path")
        try:
            path = resolve_model_path(name)
        except ModelSourceError:
            path = None  # the tokenizer is looked up again from the worker's Hello
        specs.append(ModelSpec(model_id=name, path=path, endpoint=endpoint))
    if not specs:
        from worker.tiny_models import default_model_dir

        specs.append(ModelSpec(model_id=DEFAULT_MODEL_ID, path=default_model_dir()))
    names = [s.model_id for s in specs]
    local = [s.model_id for s in specs if s.endpoint is None]
    remote = [s.model_id for s in specs if s.endpoint is not None]
    duplicates = sorted({n for n in names if local.count(n) > 1 or (n in local and n in remote)})
    if duplicates:
        raise ValueError(f"model names given twice: {', '.join(duplicates)} (use --replicas N for several local workers)")
    endpoints = [s.endpoint for s in specs if s.endpoint is not None]
    if len(set(endpoints)) < len(endpoints):
        raise ValueError("a --worker endpoint is given twice")
    specs = [r for s in specs for r in (_local_replicas(s, replicas) if s.endpoint is None else [s])]
    specs = with_aliases(specs, aliases)
    first = specs[0]
    if not any(DEFAULT_MODEL_ALIAS in (s.model_id, *s.aliases) for s in specs):
        specs = [
            dataclasses.replace(s, aliases=(*s.aliases, DEFAULT_MODEL_ALIAS)) if s.model_id == first.model_id else s
            for s in specs
        ]
    return tuple(specs)


def with_aliases(specs: list[ModelSpec], aliases: list[str]) -> list[ModelSpec]:
    """Each --alias NAME=MODEL added to the spec of MODEL (a --model or --worker name)."""
    by_id = {s.model_id: [] for s in specs}
    for item in aliases:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"--alias {item!r}: expected NAME=MODEL, e.g. 'claude-*=MODEL'")
        if model not in by_id:
            raise ValueError(f"--alias {item!r}: {model!r} is not a served model (served: {', '.join(by_id)})")
        if name in by_id:
            raise ValueError(f"--alias {item!r}: {name!r} is already a served model's name")
        if any(name in names for names in by_id.values()):
            raise ValueError(f"--alias {item!r}: the name {name!r} is given twice")
        by_id[model].append(name)  # one list per name: every replica of the model gets it
    return [dataclasses.replace(s, aliases=(*s.aliases, *by_id[s.model_id])) for s in specs]


def default_model(specs: tuple[ModelSpec, ...], name: str, upstream: Optional[str]) -> Optional[str]:
    """The --default-model value, checked: a served model's name or exact alias."""
    if not name:
        return None
    if upstream:
        raise ValueError("--default-model and --upstream both take requests for unknown models: give one")
    if not any(name == s.model_id or name in s.aliases for s in specs) or is_name_pattern(name):
        served = ", ".join(s.model_id for s in specs)
        raise ValueError(f"--default-model {name!r} is not a served model or alias (served: {served})")
    return name


def with_link_keys(specs: tuple[ModelSpec, ...], public_keys: list[str], secret_key: str) -> tuple[ModelSpec, ...]:
    """Attach CURVE keys to the --worker specs named by --worker-public-key NAME=FILE or NAME@ENDPOINT=FILE.

    NAME=FILE applies to every --worker of that name; NAME@ENDPOINT=FILE to the one at ENDPOINT
    (replicas on several machines, each with its own key), and wins over NAME=FILE.
    A non-loopback tcp:// worker without keys is refused: its link would be open to anyone on the way.
    """
    from protocol.curve import ClientKeys, is_loopback_endpoint, load_public_key, load_secret_key

    remote = {(s.model_id, s.endpoint) for s in specs if s.endpoint is not None}
    server_keys: dict[tuple[str, str], bytes] = {}  # (name, endpoint or "") -> the worker's public key
    for item in public_keys:
        target, sep, path = item.partition("=")
        name, at, endpoint = target.partition("@")
        if not sep or not name or not path or (at and not endpoint):
            raise ValueError(f"--worker-public-key {item!r}: expected NAME=FILE or NAME@ENDPOINT=FILE")
        if not any(n == name and (not at or e == endpoint) for n, e in remote):
            given = f"{name}={endpoint}" if at else f"{name}=..."
            raise ValueError(f"--worker-public-key {item!r}: no --worker {given} is given")
        server_keys[(name, endpoint)] = load_public_key(path)
    if server_keys and not secret_key:
        raise ValueError("--worker-public-key needs --curve-secret-key (this proxy's proxy.key_secret)")
    if secret_key and not server_keys:
        raise ValueError("--curve-secret-key is given but no --worker-public-key names a worker to use it with")
    own = load_secret_key(secret_key) if secret_key else None
    out = []
    for spec in specs:
        key = server_keys.get((spec.model_id, spec.endpoint or "")) or server_keys.get((spec.model_id, ""))
        if spec.endpoint is not None and key is not None and own is not None:
            spec = dataclasses.replace(spec, link_keys=ClientKeys(own[0], own[1], key))
        elif spec.endpoint is not None and not is_loopback_endpoint(spec.endpoint):
            raise ValueError(
                f"--worker {spec.model_id}={spec.endpoint} is not on this machine: give --worker-public-key "
                f"{spec.model_id}=worker.key and --curve-secret-key proxy.key_secret (see `mlx-cache-proxy keys`)"
            )
        out.append(spec)
    return tuple(out)


def config_from_options(values: dict) -> ProxyConfig:
    """The proxy's configuration from resolved option values (see `proxy.options`)."""
    cache_dir = "" if values["no_cache"] or values["disk_cache_bytes"] == 0 else (
        values["cache_dir"] or default_cache_dir()
    )
    models = with_link_keys(
        model_specs(values["model"], values["worker"], values["alias"], values["replicas"]),
        values["worker_public_key"],
        values["curve_secret_key"],
    )
    return ProxyConfig(
        models=models,
        host=values["host"],
        port=values["port"],
        max_queue=values["max_queue"],
        upstream=values["upstream"].rstrip("/") if values["upstream"] else None,
        default_model=default_model(models, values["default_model"], values["upstream"]),
        worker=WorkerOptions(
            cache_bytes=values["cache_bytes"],
            checkpoint_interval=values["checkpoint_interval"],
            no_cache=values["no_cache"],
            prefill_step=values["prefill_step"],
            max_batch=values["max_batch"],
            heartbeat_timeout=values["heartbeat_timeout"],
            unresponsive_after=values["unresponsive_after"],
            start_timeout=values["worker_start_timeout"],
            cache_dir=cache_dir,
            disk_cache_bytes=values["disk_cache_bytes"],
            memory_limit=values["memory_limit"],
            max_kv_size=values["max_kv_size"],
            log_level=values["log_level"],
            log_format=values["log_format"],
            log_file=values["log_file"],
            stderr_level=values["stderr_level"],
            # A worker writes its pool to the disk tier as it stops: give it the time.
            stop_timeout=WORKER_SAVE_TIMEOUT_S if cache_dir else WorkerOptions.stop_timeout,
        ),
        default_max_tokens=values["max_tokens"],
        keepalive_interval=values["keepalive_interval"],
        shutdown_timeout=values["shutdown_timeout"],
        max_body_bytes=values["max_body_bytes"],
        reasoning_field=values["reasoning_field"],
        route_cache_weight=values["route_cache_weight"],
        route_prefill_tps=values["route_prefill_tps"],
        **edge_options(values),
    )


def edge_options(values: dict) -> dict:
    """The HTTP edge's fields of ProxyConfig (keys, CORS, timeouts, connection cap), checked."""
    from proxy.auth import ApiKeys, read_key_file
    from proxy.connections import connection_cap
    from proxy.cors import CorsPolicy

    keys = list(values["api_key"]) + (read_key_file(values["api_key_file"]) if values["api_key_file"] else [])
    ApiKeys(keys)
    CorsPolicy(values["cors_origin"])
    return dict(
        api_keys=tuple(keys),
        protect_metrics=values["protect_metrics"],
        cors_origins=tuple(values["cors_origin"]),
        body_timeout=values["body_timeout"],
        idle_timeout=values["idle_timeout"],
        max_connections=connection_cap(values["max_connections"]),
    )


def main(argv: Optional[list[str]] = None) -> int:
    from proxy.model_source import ModelSourceError

    try:
        values = resolve(argv)
    except OptionError as exc:
        print(f"mlx-cache-proxy serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(values["log_level"], values["log_format"], values["log_file"], stderr_level=values["stderr_level"])
    try:  # first: a port in use must not cost a model download or load (nor, under launchd, a reload loop)
        sockets = bind_sockets(values["host"], values["port"])
    except ListenError as exc:
        print(f"mlx-cache-proxy serve: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE if exc.in_use else 2
    try:
        config = config_from_options(values)
    except (ModelSourceError, ValueError) as exc:
        print(f"mlx-cache-proxy serve: {exc}", file=sys.stderr)
        return 2

    from proxy.app import create_app
    from proxy.worker_client import WorkerStartError

    try:
        run_app(create_app(config), ListenOptions(
            config.host, config.port, config.max_connections, config.idle_timeout, config.shutdown_timeout), sockets)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_PORT_IN_USE if exc.in_use else 2
    except WorkerStartError as exc:
        log.error("%s", exc)
        return 1
    log.info("stopped")
    return 0

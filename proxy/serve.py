"""`mlx-cache-proxy serve`: the OpenAI-compatible proxy and its workers.

SIGTERM/SIGINT only ask aiohttp's loop to stop; the shutdown itself is the
app's: stop listening, let running requests finish (bounded by
--shutdown-timeout), stop the workers, exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

from proxy.config import DEFAULT_MODEL_ALIAS, DEFAULT_MODEL_ID, ModelSpec, ProxyConfig, WorkerOptions
from proxy.logs import setup_logging
from proxy.options import OptionError, default_cache_dir, resolve

log = logging.getLogger("mlx_cache_proxy")

# The worker's own watchdog allows 15 s to stop plus 120 s to save (worker/main.py).
WORKER_SAVE_TIMEOUT_S = 140.0


def model_specs(models: list[str], workers: list[str]) -> tuple[ModelSpec, ...]:
    """Resolve --model and --worker values; the first model also answers to 'default_model'."""
    from proxy.model_source import ModelSourceError, resolve_model_path

    specs: list[ModelSpec] = []
    for model in models:
        specs.append(ModelSpec(model_id=model, path=resolve_model_path(model, download=True)))
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
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names given twice: {', '.join(duplicates)}")
    first = specs[0]
    if DEFAULT_MODEL_ALIAS not in names:
        specs[0] = dataclasses.replace(first, aliases=(*first.aliases, DEFAULT_MODEL_ALIAS))
    return tuple(specs)


def with_link_keys(specs: tuple[ModelSpec, ...], public_keys: list[str], secret_key: str) -> tuple[ModelSpec, ...]:
    """Attach CURVE keys to the --worker specs named by --worker-public-key NAME=FILE.

    A non-loopback tcp:// worker without keys is refused: its link would be open to anyone on the way.
    """
    from protocol.curve import ClientKeys, is_loopback_endpoint, load_public_key, load_secret_key

    by_name = {s.model_id: s for s in specs}
    server_keys: dict[str, bytes] = {}
    for item in public_keys:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--worker-public-key {item!r}: expected NAME=FILE")
        if name not in by_name or by_name[name].endpoint is None:
            raise ValueError(f"--worker-public-key {item!r}: no --worker {name}=... is given")
        server_keys[name] = load_public_key(path)
    if server_keys and not secret_key:
        raise ValueError("--worker-public-key needs --curve-secret-key (this proxy's proxy.key_secret)")
    if secret_key and not server_keys:
        raise ValueError("--curve-secret-key is given but no --worker-public-key names a worker to use it with")
    own = load_secret_key(secret_key) if secret_key else None
    out = []
    for spec in specs:
        if spec.model_id in server_keys and own is not None:
            spec = dataclasses.replace(spec, link_keys=ClientKeys(own[0], own[1], server_keys[spec.model_id]))
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
    return ProxyConfig(
        models=with_link_keys(
            model_specs(values["model"], values["worker"]), values["worker_public_key"], values["curve_secret_key"]
        ),
        host=values["host"],
        port=values["port"],
        max_queue=values["max_queue"],
        upstream=values["upstream"].rstrip("/") if values["upstream"] else None,
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
            # A worker writes its pool to the disk tier as it stops: give it the time.
            stop_timeout=WORKER_SAVE_TIMEOUT_S if cache_dir else WorkerOptions.stop_timeout,
        ),
        default_max_tokens=values["max_tokens"],
        keepalive_interval=values["keepalive_interval"],
        shutdown_timeout=values["shutdown_timeout"],
        max_body_bytes=values["max_body_bytes"],
        reasoning_field=values["reasoning_field"],
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
    setup_logging(values["log_level"], values["log_format"], values["log_file"])
    try:
        config = config_from_options(values)
    except (ModelSourceError, ValueError) as exc:
        print(f"mlx-cache-proxy serve: {exc}", file=sys.stderr)
        return 2

    from proxy.app import create_app
    from proxy.listener import ListenOptions, run_app
    from proxy.worker_client import WorkerStartError

    try:
        run_app(create_app(config), ListenOptions(
            config.host, config.port, config.max_connections, config.idle_timeout, config.shutdown_timeout))
    except WorkerStartError as exc:
        log.error("%s", exc)
        return 1
    log.info("stopped")
    return 0

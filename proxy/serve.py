"""`mlx-cache-proxy serve`: the OpenAI-compatible proxy and its workers.

SIGTERM/SIGINT only ask aiohttp's loop to stop; the shutdown itself is the
app's: stop listening, let running requests finish (bounded by
--shutdown-timeout), stop the workers, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from aiohttp import web

from proxy.config import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_MODEL_ID,
    GIB,
    ModelSpec,
    ProxyConfig,
    WorkerOptions,
    parse_size,
)

log = logging.getLogger("mlx_cache_proxy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-cache-proxy serve",
        description="OpenAI-compatible caching proxy in front of MLX workers.",
    )
    p.add_argument("--model", action="append", default=[], metavar="PATH_OR_HF_ID",
                   help="a model to serve (repeatable); listed and requested under exactly this name. "
                        "Without --model or --worker: the built-in tiny model, as 'default'")
    p.add_argument("--worker", action="append", default=[], metavar="NAME=ENDPOINT",
                   help="a worker already running elsewhere (tcp://host:port or ipc://path), "
                        "serving model NAME; no process is started")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait per worker; more get 429 (default 32)")
    p.add_argument("--upstream", metavar="URL",
                   help="forward requests for models served nowhere here to this OpenAI-compatible server")
    p.add_argument("--cache-bytes", type=_size, default=8 * GIB, metavar="BYTES",
                   help="prefix-cache pool size per worker, e.g. 512M, 8G (default 8G)")
    p.add_argument("--checkpoint-interval", type=int, metavar="N",
                   help="tokens between lattice checkpoints (worker default if unset)")
    p.add_argument("--no-cache", action="store_true", help="disable the prefix cache")
    p.add_argument("--prefill-step", type=int, metavar="N", help="prefill chunk size (worker default if unset)")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request (default 512)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long running requests may take to finish on SIGTERM (default 30)")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a worker silent this long counts as dead (default 60)")
    p.add_argument("--worker-start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="model load + handshake limit (default 600)")
    p.add_argument("--keepalive-interval", type=float, default=5.0, metavar="SECONDS",
                   help="SSE keep-alive comment interval while a stream waits or prefills (default 5)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


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
        specs[0] = ModelSpec(first.model_id, first.path, first.endpoint, (*first.aliases, DEFAULT_MODEL_ALIAS))
    return tuple(specs)


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    for name, low in (("max_queue", 0), ("max_tokens", 1), ("keepalive_interval", 0.01)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}")
    return ProxyConfig(
        models=model_specs(args.model, args.worker),
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        upstream=args.upstream.rstrip("/") if args.upstream else None,
        worker=WorkerOptions(
            cache_bytes=args.cache_bytes,
            checkpoint_interval=args.checkpoint_interval,
            no_cache=args.no_cache,
            prefill_step=args.prefill_step,
            heartbeat_timeout=args.heartbeat_timeout,
            start_timeout=args.worker_start_timeout,
        ),
        default_max_tokens=args.max_tokens,
        keepalive_interval=args.keepalive_interval,
        shutdown_timeout=args.shutdown_timeout,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from proxy.model_source import ModelSourceError

    try:
        config = config_from_args(args)
    except (ModelSourceError, ValueError) as exc:
        print(f"mlx-cache-proxy serve: {exc}", file=sys.stderr)
        return 2

    from proxy.app import create_app
    from proxy.worker_client import WorkerStartError

    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            shutdown_timeout=config.shutdown_timeout,
            handler_cancellation=True,  # a client that goes away cancels its handler: that aborts
            print=lambda text: log.info("%s", text.strip()),
        )
    except WorkerStartError as exc:
        log.error("%s", exc)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

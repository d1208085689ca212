"""The aiohttp application: `create_app(config)`.

Long-lived resources open and close in cleanup contexts, in order: the
upstream HTTP session, then the workers (started concurrently, since each
loads a model). Shutdown is the mirror image: on_shutdown stops taking new
requests, aiohttp lets running handlers finish (bounded by its shutdown
timeout), then the cleanup contexts stop the workers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

import zmq.asyncio
from aiohttp import web

from proxy import anthropic_api
from proxy.anthropic_routes import add_anthropic_routes
from proxy.auth import ApiKeys, auth_middleware
from proxy.config import ProxyConfig
from proxy.cors import install_cors
from proxy.errors import ApiError, InternalError, NotFound, RequestTooLarge
from proxy.metrics import Metrics, WorkerView
from proxy.request_body import body_deadline_middleware
from proxy.routing import RoutePolicy
from proxy.routes import GENERATION_ENTERED, MODEL_ID, add_routes
from proxy.served_model import ModelRegistry, ServedModel, close_served_model, open_served_model
from proxy.state import CONFIG, LIFECYCLE, METRICS, REGISTRY, UPSTREAM_SESSION, Lifecycle
from proxy.supervisor import ipc_endpoint, remove_socket_dir, socket_dir
from proxy.tokenize_routes import add_tokenize_routes
from proxy.upstream import new_session

log = logging.getLogger("mlx_cache_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: ProxyConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    # Outermost first: CORS preflights need no key; errors of the key check and of the body take the route's shape.
    app.middlewares.extend([
        *install_cors(app, config.cors_origins),
        api_errors,
        *([auth_middleware(ApiKeys(config.api_keys), config.protect_metrics)] if config.api_keys else []),
        body_deadline_middleware(config.body_timeout, _error_response),
    ])
    app[CONFIG] = config
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics()
    app[METRICS].watch_workers(lambda: worker_views(app))
    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(workers)
    app.on_shutdown.append(stop_accepting)
    add_routes(app)
    add_anthropic_routes(app)
    add_tokenize_routes(app)
    return app


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an error object with the right status: Anthropic's on its routes, else OpenAI's."""
    try:
        return await handler(request)
    except ApiError as error:
        if MODEL_ID in request and not request.get(GENERATION_ENTERED):
            request.app[METRICS].observe_refusal(request[MODEL_ID], error.status, error.code)
        return _error_response(request, error)
    except web.HTTPNotFound:
        return _error_response(request, NotFound(f"no route for {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as exc:
        error = NotFound(f"{request.method} is not allowed on {request.path}")
        error.status, error.code = 405, "method_not_allowed"
        response = _error_response(request, error)
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        return _error_response(
            request, RequestTooLarge(f"the request body is larger than {limit} bytes (--max-body-bytes)")
        )
    except web.HTTPException:
        raise
    except ConnectionResetError:
        # The client left while its response was being started: nobody to answer (status 499 in the log).
        log.info("client of %s %s went away before the response began", request.method, request.path)
        return web.Response(status=499)  # never reaches anyone; aiohttp drops it quietly
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error_response(request, InternalError("internal error; see the server log"))


def _error_response(request: web.Request, error: ApiError) -> web.Response:
    if anthropic_api.is_anthropic_path(request.path):
        return anthropic_api.error_response(error)
    return error.response()


def worker_views(app: web.Application) -> list[WorkerView]:
    registry = app.get(REGISTRY)
    if registry is None:
        return []
    views = []
    for served in registry.models:
        for replica in served.replicas:
            stats, hello = replica.client.stats, replica.client.hello
            views.append(
                WorkerView(
                    model=served.model_id,
                    queue_depth=replica.queue.waiting,
                    running=replica.queue.running_count,
                    restarts=replica.supervisor.restarts,
                    pool=stats.pool if stats is not None else None,
                    memory=stats.memory if stats is not None else (hello.memory if hello is not None else None),
                    memory_limit=hello.memory_limit if hello is not None else 0,
                    max_running=replica.queue.max_running,
                    replica=replica.label,
                    up=replica.up,
                    prefix_blocks=served.router.index.blocks(replica.index),
                    routed={reason.value: n for (i, reason), n in served.router.decisions.items() if i == replica.index},
                )
            )
    return views


async def stop_accepting(app: web.Application) -> None:
    app[LIFECYCLE].accepting = False
    for served in app[REGISTRY].models if REGISTRY in app else ():
        served.begin_shutdown()  # queued requests get a 503 now; the running ones go on
    log.info("shutting down: no new requests; waiting for running ones")


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    if app[CONFIG].upstream is None:
        yield
        return
    async with new_session() as session:
        app[UPSTREAM_SESSION] = session
        yield


async def workers(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    context = zmq.asyncio.Context()
    sockets = socket_dir()
    policy = RoutePolicy(cache_weight=config.route_cache_weight, prefill_tps=config.route_prefill_tps)
    by_model: dict[str, list[int]] = {}
    for i, spec in enumerate(config.models):  # specs of one name are that model's replicas
        by_model.setdefault(spec.model_id, []).append(i)
    opening = [
        asyncio.ensure_future(open_served_model(
            [config.models[i] for i in indices], config, context, [ipc_endpoint(sockets, i) for i in indices], policy,
        ))  # fmt: skip
        for indices in by_model.values()
    ]
    results = await asyncio.gather(*opening, return_exceptions=True)
    served: list[ServedModel] = [r for r in results if isinstance(r, ServedModel)]
    failures = [r for r in results if isinstance(r, BaseException)]
    try:
        if failures:
            raise failures[0]
        app[REGISTRY] = ModelRegistry(served, config.default_model)
        yield
    finally:
        await asyncio.gather(*(close_served_model(s, config) for s in served), return_exceptions=True)
        context.term()
        remove_socket_dir(sockets)

"""HTTP handlers: /v1/chat/completions, /v1/completions, /v1/models, /health, /health/live.

`/health` is readiness: 200 only while every worker is up and has been heard
from within `unresponsive_after` seconds (its IO thread answers Ping apart from
the model, so a few seconds' silence means a stopped or hung process), else 503
naming the worker and why; the worker is not restarted for that (the heartbeat
timeout decides its death). `/health/live` is liveness: 200 while the proxy runs.

A generating handler reads the body, finds the model (or forwards to the
upstream), validates, tokenizes off the event loop, then runs a `Generation`
and answers with one JSON body or an SSE stream. The Anthropic Messages API
(`proxy.anthropic_routes`) goes the same way, with its own parsing and responder.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from typing import Any, Awaitable, Callable, Optional, Union

from aiohttp import web

from proxy import openai_api as api
from proxy.config import WorkerOptions
from proxy.errors import (
    ApiError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    ShuttingDown,
)
from proxy.choices import Choices
from proxy.generation import Generation, GenerationJob, GenerationSettings
from proxy.auth import client_id
from proxy.guards import check_context, check_memory, check_text_size
from proxy.namespace import cache_namespace
from proxy.openai_api import ResponseIdentity
from proxy.responders import ChatFormat, OpenAIResponder, Responder, TextFormat
from proxy.served_model import Replica, ServedModel
from proxy.sse import ClientGone, EventStream
from proxy.state import CONFIG, LIFECYCLE, METRICS, REGISTRY, UPSTREAM_SESSION
from proxy.upstream import forward

Prepare = Callable[[web.Request, ServedModel, dict[str, Any], str], Awaitable[GenerationJob]]

STARTED = int(time.time())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    fmt = ChatFormat(request.app[CONFIG].reasoning_field)
    return await _serve_generation(request, _prepare_chat, OpenAIResponder(fmt), "chatcmpl")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve_generation(request, _prepare_text, OpenAIResponder(TextFormat()), "cmpl")


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(api.model_list(request.app[REGISTRY].listed_names(), STARTED))


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    served = request.app[REGISTRY].lookup(name)
    if served is None:
        raise ModelNotFound(f"the model {name!r} does not exist", param="model")
    return web.json_response(api.model_list([served.model_id], STARTED)["data"][0])


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    accepting = request.app[LIFECYCLE].accepting
    unresponsive_after = request.app[CONFIG].worker.unresponsive_after
    workers = [_worker_health(served, unresponsive_after, r) for served in registry.models for r in served.replicas]
    # Ready while every model has a ready worker: a replica that is down is a problem, not an outage.
    ready_models = {w["model"] for w in workers if w["ready"]}
    healthy = accepting and all(served.model_id in ready_models for served in registry.models)
    body: dict[str, Any] = {
        "status": "ok" if healthy else ("shutting_down" if not accepting else "degraded"),
        "problems": [f"{w['model']}: {w['problem']}" for w in workers if w["problem"]],
        "workers": workers,
    }
    return web.json_response(body, status=200 if healthy else 503)


async def health_live(request: web.Request) -> web.Response:
    """Liveness: the proxy's event loop answers; says nothing about the workers."""
    return web.json_response({"status": "alive"})


async def metrics(request: web.Request) -> web.Response:
    from proxy.metrics import CONTENT_TYPE

    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"no route for {request.method} {request.path}")


# ----------------------------------------------------------------- generation


async def _serve_generation(
    request: web.Request, prepare: Prepare, responder: Responder, id_prefix: str
) -> web.StreamResponse:
    app = request.app
    body, served = await model_request(request)
    if not isinstance(served, ServedModel):
        return served
    name = api.requested_model(body)
    request[MODEL_ID] = served.model_id
    if not app[LIFECYCLE].accepting:
        raise ShuttingDown("the server is shutting down", retry_after=5)
    served.check_available()  # a worker being restarted is waited for, in the queue
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    job = _guarded(served, await prepare(request, served, body, request_id), body, responder.fits_max_tokens)
    ident = ResponseIdentity(request_id, name or served.model_id)
    stream: Optional[EventStream] = None
    try:
        run = Choices if job.options.n > 1 else Generation
        async with run(served, job, _settings(request)) as generation:
            request[GENERATION_ENTERED] = True
            if not job.options.stream:
                return await responder.whole(generation, ident)
            stream = EventStream(request)
            await stream.open()
            try:
                await responder.stream(stream, generation, ident)
            except ApiError as error:  # already sent as the stream's error event
                generation.note_error(error)
            return stream.response
    except ClientGone:
        assert stream is not None
        return stream.response


async def model_request(request: web.Request) -> tuple[dict[str, Any], Union[ServedModel, web.StreamResponse]]:
    """The request's JSON body and the model it names, or, for a model not served here, the answer already given."""
    body_bytes = await request.read()
    body = api.parse_json_body(body_bytes)
    name = api.requested_model(body)
    served = request.app[REGISTRY].lookup(name)
    if served is None:
        return body, await _forward_or_not_found(request, body_bytes, name)
    return body, served


async def _forward_or_not_found(request: web.Request, body_bytes: bytes, name: Optional[str]) -> web.StreamResponse:
    """A request for a model no worker here serves: the upstream's answer, or a 404."""
    upstream = request.app[CONFIG].upstream
    if upstream is None:
        raise ModelNotFound(f"the model {name!r} does not exist", param="model")
    try:
        return await forward(request, body_bytes, request.app[UPSTREAM_SESSION], upstream)
    except ClientGone:
        return web.Response(status=499)


# Set on the request for the error middleware: which model, and whether a Generation
# (which logs and counts itself) was entered.
MODEL_ID = "mlx_cache_proxy.model_id"
GENERATION_ENTERED = "mlx_cache_proxy.generation_entered"


def _settings(request: web.Request) -> GenerationSettings:
    config = request.app[CONFIG]
    return GenerationSettings(
        keepalive_interval=config.keepalive_interval,
        progress_every=config.progress_every,
        abort_timeout=config.worker.abort_timeout,
        observer=request.app[METRICS].observe_record,
    )


def _guarded(served: ServedModel, job: GenerationJob, body: dict[str, Any], fit: bool = False) -> GenerationJob:
    """The job with max_tokens fitted to the context; refuses what cannot fit in context or memory."""
    given = not fit and any(body.get(key) is not None for key in ("max_tokens", "max_completion_tokens"))
    prompt = len(job.prompt_tokens)
    api.check_model_limits(job.options, served.client.hello)
    max_tokens = check_context(prompt, job.options.max_tokens, served.client.hello, given)
    check_memory(prompt, max_tokens, served.client.hello, served.client.stats)
    if max_tokens == job.options.max_tokens:
        return job
    return dataclasses.replace(job, options=dataclasses.replace(job.options, max_tokens=max_tokens))


async def _prepare_chat(
    request: web.Request, served: ServedModel, body: dict[str, Any], request_id: str
) -> GenerationJob:
    chat = api.parse_chat_request(body, request.app[CONFIG].default_max_tokens)
    return await _chat_job(request, served, chat, request_id)


async def _chat_job(
    request: web.Request, served: ServedModel, chat: api.ChatRequest, request_id: str
) -> GenerationJob:
    """A chat, rendered with the model's template and checkpoint hints, as a job (both chat APIs)."""
    rendered = await served.tokenize(
        served.tokenizer.render_chat,
        chat.messages,
        tools=chat.tools,
        template_kwargs=chat.template_kwargs,
        max_hints=request.app[CONFIG].max_hints,
        token_limit=context_limit(served),
    )
    _check_prompt(served, rendered.tokens)
    options = chat.options
    if chat.constraint is not None:  # compiled here too: a schema llguidance refuses is a 400 before queueing
        grammar = await served.in_grammar_thread(
            served.tokenizer.grammars.grammar, chat.constraint, chat.tools, rendered.initial_state
        )
        options = dataclasses.replace(options, grammar=grammar)
    text = functools.partial(
        served.tokenizer.text_output,
        stop=chat.options.stop,
        tools=chat.tools,
        parse_tools=chat.parse_tools,
        split_reasoning=True,
        initial_state=rendered.initial_state,
        prompt=rendered.tokens,
    )
    return GenerationJob(
        request_id, chat.model or served.model_id, rendered.tokens, rendered.checkpoint_hints, options, text(),
        rendered.split_points, rendered.split_kinds, cache_namespace(client_id(request), chat.cache_salt), text,
    )


async def _prepare_text(
    request: web.Request, served: ServedModel, body: dict[str, Any], request_id: str
) -> GenerationJob:
    config = request.app[CONFIG]
    completion = api.parse_completion_request(body, config.default_max_tokens)
    if isinstance(completion.prompt, str):
        check_text_size(len(completion.prompt), served.tokenizer.max_token_chars, context_limit(served), "prompt")
        tokens = await served.in_tokenizer_thread(served.tokenizer.encode_text, completion.prompt)
    else:
        tokens = completion.prompt
        vocab = served.client.hello.vocab_size if served.client.hello else 0
        if vocab and max(tokens) >= vocab:
            raise InvalidRequest(f"token ids must be below the vocabulary size {vocab}", param="prompt")
    _check_prompt(served, tokens)
    text = functools.partial(served.tokenizer.text_output, stop=completion.options.stop)
    namespace = cache_namespace(client_id(request), completion.cache_salt)
    return GenerationJob(
        request_id, completion.model or served.model_id, tokens, [], completion.options, text(), namespace=namespace,
        new_text=text,
    )


def context_limit(served: ServedModel) -> int:
    """The worker's context limit in tokens (--max-kv-size included); 0: not known."""
    hello = served.client.hello
    return hello.context_limit if hello is not None else 0


def _check_prompt(served: ServedModel, tokens: list[int]) -> None:
    if not tokens:
        raise InvalidRequest("the prompt is empty", param="prompt")


# ----------------------------------------------------------------- health


def _readiness(replica: Replica, silence: float, unresponsive_after: float) -> Optional[str]:
    """Why this worker should not get traffic now, or None."""
    client = replica.client
    if not client.alive:
        refused = replica.supervisor.link_refused
        return f"down: {refused or client.failure or 'not connected'}"
    if silence > unresponsive_after:
        return f"not answering: no message for {silence:.1f}s (stopped or hung?)"
    return None


def _worker_health(
    served: ServedModel, unresponsive_after: float = WorkerOptions.unresponsive_after, replica: Optional[Replica] = None
) -> dict[str, Any]:
    """One worker's entry in /health: `replica`'s, or the model's only (or first up) one."""
    replica = replica or served.primary
    client, process, queue = replica.client, replica.supervisor.process, replica.queue
    hello, stats = client.hello, client.stats
    memory = stats.memory if stats else (hello.memory if hello else None)
    silence = time.monotonic() - client.last_seen
    problem = _readiness(replica, silence, unresponsive_after)
    out: dict[str, Any] = {
        "model": served.model_id,
        "endpoint": client.endpoint,
        "alive": client.alive,
        "ready": problem is None,
        "problem": problem,
        "failure": client.failure,
        "pid": hello.pid if hello else (process.pid if process else None),
        "local": process is not None,
        "queue": {"waiting": queue.waiting, "running": queue.running_count, "max_waiting": queue.max_waiting},
        "seconds_since_heartbeat": round(silence, 3),
        # A count, not the ids: /health is open, and ids would show other clients' traffic.
        "running_requests": len(stats.running_requests) if stats else 0,
        "restarts": replica.supervisor.restarts,
    }
    if len(served.replicas) > 1:
        out["replica"] = replica.label
    if hello is not None:
        out.update(
            context_limit=hello.context_limit,
            max_batch=hello.max_batch,  # requests it runs at once: the queue's running limit
            cache_enabled=hello.cache_enabled,
            cacheable=hello.layout.cacheable,
            layer_kinds=sorted(set(hello.layout.layer_kinds)),
        )
    if stats is not None:
        pool = stats.pool
        out["pool"] = {
            "bytes": pool.bytes,
            "capacity_bytes": pool.capacity_bytes,
            "sequences": pool.sequences,
            "checkpoints": pool.checkpoints,
            "evictions": pool.evictions,
            "leases": pool.leases,
            "pinned_sequences": pool.pinned_sequences,
            "pinned_checkpoints": pool.pinned_checkpoints,
        }
    elif hello is not None:
        out["pool"] = {"bytes": 0, "capacity_bytes": hello.pool_capacity_bytes}
    if memory is not None:
        out["memory"] = {
            "active": memory.active,
            "peak": memory.peak,
            "cache": memory.cache,
            "device_total": memory.device_total,
            "pool_bytes": memory.pool_bytes,
        }
    return out


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/models/{{model:.+}}", get_model)
        app.router.add_get(f"{prefix}/health", health)
        app.router.add_get(f"{prefix}/health/live", health_live)
    app.router.add_get("/metrics", metrics)

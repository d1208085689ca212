"""HTTP handlers of the Anthropic Messages API: /v1/messages and /v1/messages/count_tokens.

A Messages request takes the chat completions' way (`routes._serve_generation`):
the same model lookup and upstream forwarding, the same rendering with the
chat template and checkpoint hints, the same guards, queue, worker and pool.
Only the parsing (`anthropic_api`) and the answer (`AnthropicResponder`) differ.
The `anthropic-version` and `anthropic-beta` headers are accepted and not
checked; `x-api-key` is checked by `proxy.auth` when keys are configured.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import anthropic_api as anthropic
from proxy.errors import ApiError
from proxy.generation import Finished, Generation, GenerationJob, KeepAlive, Output, Prefill
from proxy.openai_api import ResponseIdentity
from proxy.responders import cache_headers
from proxy.routes import _chat_job, _check_prompt, _serve_generation, context_limit, model_request
from proxy.served_model import ServedModel
from proxy.sse import EventStream


async def messages(request: web.Request) -> web.StreamResponse:
    return await _serve_generation(request, _prepare_messages, AnthropicResponder(), "msg")


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """{"input_tokens": N}: the length of the prompt the request would render to."""
    body, served = await model_request(request)
    if not isinstance(served, ServedModel):
        return served
    chat = anthropic.parse_count_tokens_request(body)
    rendered = await served.tokenize(
        served.tokenizer.render_chat, chat.messages, tools=chat.tools, template_kwargs=chat.template_kwargs,
        max_hints=0, token_limit=context_limit(served),
    )  # fmt: skip
    _check_prompt(served, rendered.tokens)
    return web.json_response({"input_tokens": len(rendered.tokens)})


async def _prepare_messages(
    request: web.Request, served: ServedModel, body: dict[str, Any], request_id: str
) -> GenerationJob:
    return await _chat_job(request, served, anthropic.parse_messages_request(body), request_id)


class AnthropicResponder:
    """Generation events -> a Messages reply: one `message` object, or its stream of events."""

    fits_max_tokens = True  # max_tokens is required here, so it is a budget, not a demand

    async def whole(self, generation: Generation, ident: ResponseIdentity) -> web.Response:
        builder = anthropic.MessageBuilder(ident, len(generation.job.prompt_tokens))
        async for event in generation.events():
            if isinstance(event, Output):
                builder.add(event.delta)
            elif isinstance(event, Finished):
                builder.finish(event)
                return web.json_response(builder.message(event), headers=cache_headers(generation))
        raise RuntimeError("the generation ended without a Finished event")

    async def stream(self, stream: EventStream, generation: Generation, ident: ResponseIdentity) -> None:
        """message_start, pings while queued or prefilling, content blocks, message_delta, message_stop."""
        builder = anthropic.MessageBuilder(ident, len(generation.job.prompt_tokens))
        try:
            await _send(stream, builder.start())
            async for event in generation.events():
                if isinstance(event, (KeepAlive, Prefill)):
                    await _send(stream, [anthropic.PING])
                elif isinstance(event, Output):
                    await _send(stream, builder.add(event.delta))
                elif isinstance(event, Finished):
                    await _send(stream, builder.finish(event))
                    await stream.end()
                    return
        except ApiError as error:
            await stream.event("error", anthropic.error_body(error))
            await stream.end()
            raise


async def _send(stream: EventStream, events: list[anthropic.Event]) -> None:
    for name, payload in events:
        await stream.event(name, payload)


def add_anthropic_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/messages", messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", count_tokens)

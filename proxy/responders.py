"""Generation events -> an HTTP response: one JSON body, or an SSE stream.

`ChatFormat` and `TextFormat` say how chat and text completions look; the two
responders are the same for both. A `Responder` is what a generating route
answers with (`OpenAIResponder` here; the Messages API has its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from aiohttp import web

from proxy import openai_api as api
from proxy.errors import ApiError
from proxy.generation import Finished, Generation, KeepAlive, Output, Prefill
from proxy.openai_api import ResponseIdentity, TokenLogprobView
from proxy.sse import EventStream
from proxy.text_output import OutputDelta


@dataclass
class Collected:
    """A whole response, gathered from the events."""

    delta: OutputDelta = field(default_factory=OutputDelta)
    logprobs: list[TokenLogprobView] = field(default_factory=list)


class ResponseFormat(Protocol):
    chunk_object: str

    def opening(self, ident: ResponseIdentity) -> list[dict[str, Any]]: ...

    def chunk(self, ident: ResponseIdentity, delta: OutputDelta, logprobs: list[TokenLogprobView]) -> Optional[dict[str, Any]]: ...

    def closing(self, ident: ResponseIdentity, finish_reason: str) -> dict[str, Any]: ...

    def whole(self, ident: ResponseIdentity, collected: Collected, finished: Finished) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ChatFormat:
    reasoning_field: str = api.DEFAULT_REASONING_FIELD  # an api.REASONING_FIELDS key
    chunk_object = "chat.completion.chunk"

    def opening(self, ident: ResponseIdentity) -> list[dict[str, Any]]:
        return [api.chat_chunk(ident, {"role": "assistant", "content": ""})]

    def chunk(self, ident, delta, logprobs):
        body: dict[str, Any] = {}
        if delta.content:
            body["content"] = delta.content
        body.update(api.reasoning_fields(delta.reasoning, self.reasoning_field))
        if delta.tool_calls:
            body["tool_calls"] = delta.tool_calls
        if not body and not logprobs:
            return None
        return api.chat_chunk(ident, body, None, api.chat_logprobs(logprobs) if logprobs else None)

    def closing(self, ident, finish_reason):
        return api.chat_chunk(ident, {}, finish_reason)

    def whole(self, ident, collected, finished):
        d = collected.delta
        return api.chat_completion(
            ident,
            api.chat_message(d.content, d.reasoning, d.tool_calls, self.reasoning_field),
            finished.finish_reason,
            _usage(finished),
            api.chat_logprobs(collected.logprobs) if collected.logprobs else None,
        )


class TextFormat:
    chunk_object = "text_completion"

    def opening(self, ident: ResponseIdentity) -> list[dict[str, Any]]:
        return []

    def chunk(self, ident, delta, logprobs):
        if not delta.content and not logprobs:
            return None
        return api.text_chunk(ident, delta.content, None, api.completion_logprobs(logprobs) if logprobs else None)

    def closing(self, ident, finish_reason):
        return api.text_chunk(ident, "", finish_reason)

    def whole(self, ident, collected, finished):
        return api.text_completion(
            ident,
            collected.delta.content,
            finished.finish_reason,
            _usage(finished),
            api.completion_logprobs(collected.logprobs) if collected.logprobs else None,
        )


def _usage(finished: Finished, *others: Finished) -> dict[str, Any]:
    """OpenAI's usage of n choices (`finished` is choice 0's): the prompt once, every choice's completion."""
    completion = finished.completion_tokens + sum(f.completion_tokens for f in others)
    return api.usage(finished.prompt_tokens, completion, finished.cached_tokens)


def _at(chunk: dict[str, Any], choice: int) -> dict[str, Any]:
    """A body or chunk of one choice, moved to index `choice` (the formats build index 0)."""
    for entry in chunk["choices"]:
        entry["index"] = choice
    return chunk


async def whole_response(generation: Generation, fmt: ResponseFormat, ident: ResponseIdentity) -> web.Response:
    collected = [Collected() for _ in range(generation.choices)]
    finished: dict[int, Finished] = {}
    async for event in generation.events():
        if isinstance(event, Output):
            collected[event.choice].delta += event.delta
            collected[event.choice].logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            collected[event.choice].delta += event.delta
            finished[event.choice] = event
            if len(finished) < generation.choices:
                continue
            ends = [finished[i] for i in range(generation.choices)]
            body = fmt.whole(ident, collected[0], ends[0])
            if len(ends) > 1:
                wholes = [fmt.whole(ident, c, f) for c, f in zip(collected, ends)]
                body["choices"] = [_at(w, i)["choices"][0] for i, w in enumerate(wholes)]
                body["usage"] = _usage(*ends)
            return web.json_response(body, headers=cache_headers(generation))
    raise RuntimeError("the generation ended without a Finished event")


async def stream_response(
    stream: EventStream,
    generation: Generation,
    fmt: ResponseFormat,
    ident: ResponseIdentity,
    include_usage: bool,
) -> None:
    """Stream the events of `generation`; an error mid-stream ends it with an error event."""
    for choice in range(generation.choices):
        for chunk in fmt.opening(ident):
            await stream.data(_at(chunk, choice))
    finished: dict[int, Finished] = {}
    try:
        async for event in generation.events():
            if isinstance(event, KeepAlive):
                await stream.comment("keep-alive" if not event.queue_position else f"keep-alive queued {event.queue_position}")
            elif isinstance(event, Prefill):
                await stream.comment(f"prefill {event.processed}/{event.total}")
            elif isinstance(event, Output):
                chunk = fmt.chunk(ident, event.delta, event.logprobs)
                if chunk is not None:
                    await stream.data(_at(chunk, event.choice))
            elif isinstance(event, Finished):
                chunk = fmt.chunk(ident, event.delta, [])
                if chunk is not None:
                    await stream.data(_at(chunk, event.choice))
                await stream.data(_at(fmt.closing(ident, event.finish_reason), event.choice))
                finished[event.choice] = event
                if len(finished) < generation.choices:
                    continue
                if include_usage:
                    ends = [finished[i] for i in range(generation.choices)]
                    await stream.data(api.usage_chunk(ident, fmt.chunk_object, _usage(*ends)))
                await stream.done()
                return
    except ApiError as error:
        await stream.error(error)
        raise


class Responder(Protocol):
    """How a generating route answers: one JSON body, or events on an open SSE stream."""

    # True: a max_tokens past the context is cut to the room left instead of refused
    # (Anthropic clients must send max_tokens and agents send 32K+ whatever the model).
    fits_max_tokens: bool

    async def whole(self, generation: Generation, ident: ResponseIdentity) -> web.Response: ...

    async def stream(self, stream: EventStream, generation: Generation, ident: ResponseIdentity) -> None:
        """Raises the ApiError that ended the stream, after sending it as the stream's error event."""


@dataclass(frozen=True)
class OpenAIResponder:
    fmt: ResponseFormat
    fits_max_tokens = False  # an explicit max_tokens the context cannot hold is a 400

    async def whole(self, generation: Generation, ident: ResponseIdentity) -> web.Response:
        return await whole_response(generation, self.fmt, ident)

    async def stream(self, stream: EventStream, generation: Generation, ident: ResponseIdentity) -> None:
        await stream_response(stream, generation, self.fmt, ident, generation.job.options.include_usage)


def cache_headers(generation: Generation) -> dict[str, str]:
    """What the cache did, for clients that look (harmless to those that do not)."""
    facts = generation.record.facts
    if facts is None:
        return {}
    return {
        "X-Cache-Cached-Tokens": str(facts.cached_tokens),
        "X-Cache-Restore": f"{facts.restore_point} {facts.restore_kind.value}",
    }

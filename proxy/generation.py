"""One request's way through its model's queue and worker.

    async with Generation(served, job, settings) as generation:   # QueueFull here: a 429
        async for event in generation.events():                   # KeepAlive, Prefill, Output, Finished
            ...

Leaving the `async with` block early -- the client went away (the handler is
cancelled or a write fails), a stop string ended the text, an error -- sends
`Abort` to the worker. The queue turn is handed on only when the worker's last
message for the request has arrived, so the next request never overlaps the
aborted one; that wait runs in the background, not in the handler.

A model with several replicas: the request is routed when it enters
(`ServedModel.route`), or goes to the `replica` given (the n choices of one
request share one replica, hence one prefill). When its replica goes down
before the request has any output -- waiting in its queue, or sent but not
yet past its prefill -- it is routed again to a replica that is up and starts
there afresh; one that has output fails as with one worker (a 503 with
Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, Union

from protocol.messages import FinishReason, Generate, Progress, Result, Tokens
from proxy.errors import ApiError, WorkerUnavailable
from proxy.openai_api import GenerationOptions, TokenLogprobView
from proxy.request_log import RequestRecord
from proxy.harmony import HarmonyOutput
from proxy.served_model import Replica, ReplicaMoved, ServedModel
from proxy.text_output import OutputDelta, TextOutput
from proxy.worker_client import RequestChannel


@dataclass(frozen=True)
class GenerationJob:
    request_id: str
    model: str  # as the client named it
    prompt_tokens: list[int]
    checkpoint_hints: list[int]
    options: GenerationOptions
    text: Union[TextOutput, HarmonyOutput]
    split_points: list[int] = field(default_factory=list)
    split_kinds: list[int] = field(default_factory=list)
    namespace: str = ""  # the cache namespace (proxy.namespace)
    new_text: Optional[Callable[[], TextOutput]] = None  # a fresh `text` for each further choice (n > 1)


@dataclass(frozen=True)
class GenerationSettings:
    keepalive_interval: float = 5.0
    progress_every: int = 512
    abort_timeout: float = 30.0
    observer: Optional[Callable[[RequestRecord], None]] = None  # sees each record as it is logged


# ----------------------------------------------------------------- events


@dataclass(frozen=True)
class KeepAlive:
    queue_position: int  # requests ahead (0 once running)


@dataclass(frozen=True)
class Prefill:
    processed: int
    total: int


@dataclass(frozen=True)
class Output:
    delta: OutputDelta
    logprobs: list[TokenLogprobView] = field(default_factory=list)
    choice: int = 0  # which of the request's n choices (proxy.choices)


@dataclass(frozen=True)
class Finished:
    delta: OutputDelta  # the text still held back at the end
    finish_reason: str  # OpenAI's: stop, length, tool_calls
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: Optional[int]
    stop_sequence: Optional[str] = None  # the stop string that ended the text, if one did
    choice: int = 0


Event = Union[KeepAlive, Prefill, Output, Finished]

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "stop"}


MAX_REROUTES = 3  # replicas going down one after another under one request: then it fails


class Generation:
    choices = 1  # what a responder waits for: one Finished (proxy.choices.Choices has n)

    def __init__(
        self, served: ServedModel, job: GenerationJob, settings: GenerationSettings, replica: Optional[Replica] = None
    ) -> None:
        self.served = served
        self.job = job
        self.settings = settings
        self.replica = replica
        self.reroutes = 0
        self.record = RequestRecord(job.request_id, job.model, len(job.prompt_tokens), served.model_id)
        self._ticket = None
        self._channel: Optional[RequestChannel] = None
        self._aborted = False
        self._completion_tokens = 0

    async def __aenter__(self) -> Generation:
        if self.replica is None:
            self.replica = self.served.route(self.job.prompt_tokens, self.job.namespace)
        self._ticket = self.replica.queue.enter()  # raises QueueFull
        return self

    def _reroute(self, error: ApiError) -> None:
        """Its replica went down before any output: enter another one's queue, or raise `error`."""
        others_up = any(r.up for r in self.served.replicas if r is not self.replica)
        if not others_up or self.reroutes >= MAX_REROUTES or self._completion_tokens:
            raise WorkerUnavailable(str(error), retry_after=1) if isinstance(error, ReplicaMoved) else error
        if self._ticket is not None:
            self._ticket.release()
        self.reroutes += 1
        self._channel = None
        self.replica = self.served.route(self.job.prompt_tokens, self.job.namespace)
        self._ticket = self.replica.queue.enter()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.record.status == "ok":
            if issubclass(exc_type, ApiError):
                self.note_error(exc)
            elif issubclass(exc_type, (asyncio.CancelledError, ConnectionError)):
                self.record.status, self.record.http_status = "client_gone", 499
            else:
                self.record.status, self.record.http_status = f"error:{exc_type.__name__}", 500
        channel = self._channel
        if channel is None or channel.finished:
            self._release()
            return
        if not self._aborted:
            self.replica.client.abort(self.job.request_id)
            self._aborted = True
        self.served.spawn(self._drain(channel))

    def withdraw(self) -> None:
        """Leave the queue before running, unlogged: another choice of the request was refused."""
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None

    def note_error(self, error: ApiError) -> None:
        self.record.status = f"error:{error.code}"
        self.record.http_status, self.record.error_code = error.status, error.code

    # ------------------------------------------------------------ events

    async def events(self) -> AsyncIterator[Event]:
        assert self._ticket is not None, "use `async with Generation(...)`"
        while True:
            try:
                async for event in self._events_on_replica():
                    yield event
                return
            except WorkerUnavailable as error:
                self._reroute(error)

    async def _events_on_replica(self) -> AsyncIterator[Event]:
        assert self._ticket is not None and self.replica is not None
        interval = self.settings.keepalive_interval
        while not await self._ticket.wait(interval):
            yield KeepAlive(self._ticket.position)
        self.record.started = time.monotonic()
        job = self.job
        self._channel = self.replica.client.submit(
            Generate(
                request_id=job.request_id,
                prompt_tokens=job.prompt_tokens,
                sampling=job.options.sampling(self.served.tokenizer.eos_token_ids),
                checkpoint_hints=job.checkpoint_hints,
                split_points=job.split_points,
                split_kinds=job.split_kinds,
                progress_every=self.settings.progress_every,
                namespace=job.namespace,
            )
        )
        while True:
            message = await self._channel.get(interval)
            if message is None:
                yield KeepAlive(0)
            elif isinstance(message, Progress):
                yield Prefill(message.processed, message.total)
            elif isinstance(message, Tokens):
                output = self._take(message)
                if output.delta or output.logprobs:
                    yield output
                if job.text.stopped:
                    self.replica.client.abort(job.request_id)
                    self._aborted = True
                    self.record.status = "stop_string"
                    yield self._finish("stop", self._completion_tokens)
                    return
            elif isinstance(message, Result):
                self._note_result(message)
                yield self._finish(_FINISH[message.finish_reason], message.generated_tokens)
                return

    def _take(self, message: Tokens) -> Output:
        if message.first_cache_facts is not None:
            self.record.facts = message.first_cache_facts
        if self.record.first_token is None and message.tokens:
            self.record.first_token = time.monotonic()
        delta = OutputDelta()
        views: list[TokenLogprobView] = []
        want_logprobs = self.job.options.top_logprobs >= 0
        for i, token in enumerate(message.tokens):
            delta += self.job.text.add(token)
            self._completion_tokens += 1
            if want_logprobs and i < len(message.logprobs):
                views.append(self._logprob_view(message.logprobs[i]))
            if self.job.text.stopped:
                break
        self.record.generated_tokens = self._completion_tokens
        return Output(delta, views)

    def _logprob_view(self, entry) -> TokenLogprobView:
        text = self.served.tokenizer.token_text
        return TokenLogprobView(
            text=text(entry.token),
            logprob=entry.logprob,
            top=[(text(t.token), t.logprob) for t in entry.top],
        )

    def _finish(self, finish_reason: str, completion_tokens: int) -> Finished:
        delta = self.job.text.finish(finish_reason)
        if finish_reason == "stop" and self.job.text.tool_calls_made:
            finish_reason = "tool_calls"
        self.record.finish_reason = finish_reason
        facts = self.record.facts
        return Finished(
            delta=delta,
            finish_reason=finish_reason,
            prompt_tokens=len(self.job.prompt_tokens),
            completion_tokens=completion_tokens,
            cached_tokens=facts.cached_tokens if facts is not None else None,
            stop_sequence=self.job.text.stop_string,
        )

    def _note_result(self, result: Result) -> None:
        if self.replica is not None:
            self.replica.observe(result)
        self.record.facts = result.facts
        self.record.timings = result.timings
        self.record.generated_tokens = result.generated_tokens
        self.record.finished = time.monotonic()

    # ------------------------------------------------------------ the end

    async def _drain(self, channel: RequestChannel) -> None:
        """Wait (bounded) for the worker's last message of an aborted request."""
        deadline = time.monotonic() + self.settings.abort_timeout
        try:
            while not channel.finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.record.status += "+abort_timeout"
                    break
                try:
                    message = await channel.get(remaining)
                except ApiError:
                    break
                if isinstance(message, Result):
                    self._note_result(message)
        finally:
            self._release()

    def _release(self) -> None:
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None
            self.record.emit()
            if self.settings.observer is not None:
                self.settings.observer(self.record)

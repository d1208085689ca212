"""OpenAI's `n`: the n choices of one request, as n generations of its one prompt.

    async with Choices(served, job, settings) as choices:    # QueueFull for any choice: a 429
        async for event in choices.events():                 # Output / Finished carry .choice
            ...

Each choice is a `Generation` of its own (request id `<id>-<i>`, its own queue
turn, text output, stop strings, abort and log line), all entered at once, so
they reach the worker together. The worker prefills the prompt once: a request
whose whole prompt is a running one's waits for that prompt's end and forks
there with its logits (`StepLoop._twin`); a choice that starts after the first
has finished restores the stored prompt end. Either way the other choices
compute no prompt token. With a seed, choice i samples with seed + i, so
choices differ at temperature > 0 (at temperature 0 they are the same, as
OpenAI's are).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from proxy.errors import ApiError, QueueFull
from proxy.generation import Event, Finished, Generation, GenerationJob, GenerationSettings, Output
from proxy.request_log import RequestRecord
from proxy.served_model import ServedModel


def choice_job(job: GenerationJob, i: int) -> GenerationJob:
    """The job of choice `i` (> 0 needs `job.new_text`): its own id, text output and seed."""
    options = job.options
    seed = None if options.seed is None else options.seed + i
    return dataclasses.replace(
        job,
        request_id=f"{job.request_id}-{i}",
        text=job.text if i == 0 else job.new_text(),
        options=dataclasses.replace(options, seed=seed, n=1),
    )


class Choices:
    def __init__(self, served: ServedModel, job: GenerationJob, settings: GenerationSettings) -> None:
        self.job = job
        replica = served.route(job.prompt_tokens, job.namespace)  # one replica for all: one prefill
        self.generations = [Generation(served, choice_job(job, i), settings, replica) for i in range(job.options.n)]

    @property
    def choices(self) -> int:
        return len(self.generations)

    @property
    def record(self) -> RequestRecord:
        """The first choice's record: its cache facts are the request's (the others restore it all)."""
        return self.generations[0].record

    def note_error(self, error: ApiError) -> None:
        for generation in self.generations:
            generation.note_error(error)

    async def __aenter__(self) -> Choices:
        entered: list[Generation] = []
        try:
            for generation in self.generations:
                entered.append(await generation.__aenter__())
        except QueueFull:
            for generation in entered:
                generation.withdraw()
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        for generation in self.generations:
            await generation.__aexit__(exc_type, exc, tb)

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's events as they come; the Output and Finished events carry their choice index."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, generation: Generation) -> None:
            try:
                async for event in generation.events():
                    await merged.put((i, event))
            except Exception as exc:  # an ApiError of one choice ends the request
                await merged.put((i, exc))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.generations)]
        try:
            finished = 0
            while finished < len(tasks):
                i, event = await merged.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, (Output, Finished)):
                    event = dataclasses.replace(event, choice=i)
                    finished += isinstance(event, Finished)
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

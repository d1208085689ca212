"""n > 1 in the proxy: each choice its own job and queue turn; a request refused as a whole leaves no turn behind."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proxy.choices import Choices, choice_job
from proxy.errors import QueueFull
from proxy.generation import GenerationJob, GenerationSettings
from proxy.openai_api import GenerationOptions
from proxy.request_queue import RequestQueue


def job(n: int, seed=None) -> GenerationJob:
    texts = iter(range(1, 100))
    return GenerationJob(
        "chatcmpl-x", "m", [1, 2, 3], [], GenerationOptions(max_tokens=4, n=n, seed=seed), text="text-0",
        new_text=lambda: f"text-{next(texts)}",
    )  # fmt: skip


def test_each_choice_has_its_own_id_text_and_seed():
    request = job(3, seed=10)
    jobs = [choice_job(request, i) for i in range(3)]
    assert [j.request_id for j in jobs] == ["chatcmpl-x-0", "chatcmpl-x-1", "chatcmpl-x-2"]
    assert [j.text for j in jobs] == ["text-0", "text-1", "text-2"]
    assert [j.options.seed for j in jobs] == [10, 11, 12]
    assert all(j.options.n == 1 and j.prompt_tokens == [1, 2, 3] for j in jobs)
    assert choice_job(job(2), 1).options.seed is None


def test_a_request_the_queue_cannot_hold_whole_is_refused_and_leaves_no_turn():
    async def scenario():
        queue = RequestQueue(max_waiting=1, max_running=1)
        replica = SimpleNamespace(queue=queue)
        served = SimpleNamespace(queue=queue, model_id="m", replicas=[replica], route=lambda tokens, namespace: replica)
        with pytest.raises(QueueFull):
            async with Choices(served, job(3), GenerationSettings()):
                pass
        assert (queue.running_count, queue.waiting) == (0, 0)
        async with Choices(served, job(2), GenerationSettings()) as choices:
            assert choices.choices == 2 and (queue.running_count, queue.waiting) == (1, 1)
            for generation in choices.generations:
                generation.withdraw()
        assert (queue.running_count, queue.waiting) == (0, 0)

    asyncio.run(scenario())

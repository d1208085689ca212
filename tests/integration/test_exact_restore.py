"""A cache hit gives the same tokens and logits as a cold run, for every cache kind.

Each architecture of the tiny-model factory runs four situations through a real
Engine with a pool, and each prompt again through an Engine without one:
(a) a continued conversation, (b) the same long prefix with another ending,
(c) an exact repeat, (d) prompts diverging in the middle of one long message.
"""

from __future__ import annotations

import random

import pytest

from protocol.messages import Generate, RestoreKind, SamplingParams
from worker.engine import EngineConfig, load_engine
from worker.tiny_models import ARCHITECTURES

INTERVAL = 32
MAX_TOKENS = 5


class Runner:
    def __init__(self, path, cache_enabled: bool):
        config = EngineConfig(checkpoint_interval=INTERVAL, prefill_step=64, cache_enabled=cache_enabled)
        self.engine = load_engine(str(path), config)

    def run(self, prompt, hints=(), max_tokens=MAX_TOKENS):
        tokens, logprobs = [], []

        def emit(message):
            tokens.extend(getattr(message, "tokens", []))
            logprobs.extend(getattr(message, "logprobs", []))

        sampling = SamplingParams(max_tokens=max_tokens, top_logprobs=self.engine.vocab_size)
        result = self.engine.generate(Generate("t", list(prompt), sampling, list(hints)), emit, lambda: False)
        return tokens, logprobs, result.facts


def assert_same_as_cold(warm, cold):
    tokens, logprobs, _ = warm
    cold_tokens, cold_logprobs, _ = cold
    assert tokens == cold_tokens
    for step, (a, b) in enumerate(zip(logprobs, cold_logprobs)):
        da = {t.token: t.logprob for t in a.top}
        db = {t.token: t.logprob for t in b.top}
        worst = max(abs(da[k] - db[k]) for k in db)
        assert worst < 1e-3, f"step {step}: logprobs differ by {worst}"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runners(request, tiny_model):
    path = tiny_model(request.param)
    return request.param, Runner(path, True), Runner(path, False)


def test_cache_hits_match_cold_runs(runners):
    arch, warm, cold = runners
    rng = random.Random(1)
    words = lambda k: [rng.randrange(20, 600) for _ in range(k)]
    kv_only = not warm.engine.ops.needs_snapshots

    # (a) a conversation going on: turn 2 extends turn 1's prompt and reply.
    system, user1 = words(40), words(60)
    turn1 = system + user1
    first = warm.run(turn1, hints=[len(system)])
    assert first[2].cached_tokens == 0
    assert_same_as_cold(first, cold.run(turn1))
    turn2 = turn1 + first[0] + words(30)
    result = warm.run(turn2, hints=[len(turn1)])
    assert result[2].cached_tokens >= len(turn1), (arch, result[2])
    assert_same_as_cold(result, cold.run(turn2))

    # (b) the same long prefix, another ending, in a fresh request.
    other = turn1 + words(12)
    result = warm.run(other)
    assert result[2].cached_tokens == len(turn1)
    assert_same_as_cold(result, cold.run(other))

    # (c) an exact repeat.
    result = warm.run(other)
    assert result[2].cached_tokens == len(other)
    assert_same_as_cold(result, cold.run(other))

    # (d) diverging in the middle of one long message (no hint there).
    long_message = words(150)
    warm.run(system + long_message)
    cut = len(system) + 77
    second = system + long_message[:77] + words(20)
    result = warm.run(second)
    facts = result[2]
    if kv_only:
        assert facts.restore_point == cut and facts.restore_kind is RestoreKind.TRIM
    else:
        assert cut - INTERVAL < facts.restore_point <= cut, facts
    assert_same_as_cold(result, cold.run(second))
    third = system + long_message[:77] + words(20)
    result = warm.run(third)
    assert result[2].restore_point == cut
    assert result[2].restore_kind is (RestoreKind.TRIM if kv_only else RestoreKind.FORK)
    assert_same_as_cold(result, cold.run(third))


@pytest.mark.parametrize("arch", ["qwen3_next", "gemma3_text", "llama", "falcon_h1"])
def test_a_prefix_kept_under_memory_pressure_restores_exactly(tiny_model, arch):
    """Agents over one system prompt, with a pool too small for them all: tails go, the prefix stays."""
    path = tiny_model(arch)
    cold = Runner(path, False)
    layout = cold.engine.layout
    # Room for about two agents (KV grows in 256-token steps) and a dozen snapshots.
    budget = 2 * 256 * layout.kv_bytes_per_token + 12 * layout.snapshot_bytes + 200_000
    config = EngineConfig(checkpoint_interval=INTERVAL, prefill_step=64, cache_bytes=budget)
    warm = Runner.__new__(Runner)
    warm.engine = load_engine(str(path), config)
    rng = random.Random(5)
    system = [rng.randrange(20, 600) for _ in range(120)]
    agents = {a: system + [rng.randrange(20, 600) for _ in range(40)] for a in range(4)}
    for round_ in range(2):
        for agent, history in agents.items():
            prompt = history + [rng.randrange(20, 600) for _ in range(5)]
            result = warm.run(prompt, hints=[len(system)])
            if round_ == 1:
                assert result[2].cached_tokens >= len(system) - INTERVAL, (arch, agent, result[2])
            assert_same_as_cold(result, cold.run(prompt))
            agents[agent] = prompt + result[0]
    pool = warm.engine.pool
    assert pool.nbytes <= pool.capacity_bytes
    assert pool.evictions > 0

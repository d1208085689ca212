"""Batched decoding gives each request the tokens it gets alone, for every cache kind.

Five requests start at different steps of one step loop and run in one batch:
one hits a stored conversation, one forks a prefix of another running request,
one is aborted mid-way, two are cold (one of them the donor). Each is compared with the same request run
alone on an engine without a pool: the same greedy tokens, log-probabilities
within 1e-3 over the whole vocabulary.
"""

from __future__ import annotations

import random

import pytest

from protocol.messages import FinishReason, Generate, Result, SamplingParams, TokenFrame, Tokens
from tests.integration.test_exact_restore import Runner, assert_same_as_cold
from worker.step_loop import StepLoop
from worker.tiny_models import ARCHITECTURES

MAX_TOKENS = 24


class Collector:
    """What one request received from the loop."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.result: Result | None = None
        self.frames_shared = 0  # TokenFrames that carried another request's tokens too

    def __call__(self, message) -> None:
        parts = message.parts if isinstance(message, TokenFrame) else [message]
        for part in parts:
            if isinstance(part, Tokens) and part.request_id == self.rid:
                self.tokens.extend(part.tokens)
                self.logprobs.extend(part.logprobs)
                self.frames_shared += isinstance(message, TokenFrame)
            elif isinstance(part, Result) and part.request_id == self.rid:
                self.result = part


class Hub:
    """One emit for every request, as the worker's outbox is: frames may carry several requests."""

    def __init__(self) -> None:
        self.collectors: list[Collector] = []

    def __call__(self, message) -> None:
        for collector in self.collectors:
            collector(message)


def submit(loop: StepLoop, rid: str, prompt: list[int], vocab: int, abort_after: int | None = None,
           hub: Hub | None = None) -> Collector:
    out = Collector()
    out.rid = rid
    sampling = SamplingParams(max_tokens=MAX_TOKENS, top_logprobs=vocab)
    should_abort = (lambda: len(out.tokens) >= abort_after) if abort_after is not None else (lambda: False)
    if hub is not None:
        hub.collectors.append(out)
    loop.submit(Generate(rid, list(prompt), sampling), hub or out, should_abort)
    return out


def run_alone(runner: Runner, prompt: list[int]):
    """The request alone through `runner`'s engine, with this module's max_tokens."""
    return runner.run(prompt, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engines(request, tiny_model):
    path = tiny_model(request.param)
    return request.param, Runner(path, True), Runner(path, False)


def test_requests_in_one_batch_match_each_alone(engines):
    arch, warm, cold = engines
    vocab = warm.engine.vocab_size
    rng = random.Random(7)
    words = lambda k: [rng.randrange(20, 600) for _ in range(k)]

    stored = words(70)
    first_turn = run_alone(warm, stored)  # the conversation the cache hit continues
    hit_prompt = stored + first_turn[0] + words(12)
    shared = words(120)
    donor_prompt = shared + words(20)
    fork_prompt = shared + words(15)
    abort_prompt = words(60)
    cold_prompt = words(50)

    loop = StepLoop(warm.engine, max_batch=5)
    hub = Hub()
    schedule = {
        0: ("donor", donor_prompt, None),
        1: ("fork", fork_prompt, None),
        2: ("hit", hit_prompt, None),
        4: ("abort", abort_prompt, 5),
        6: ("cold", cold_prompt, None),
    }
    outs: dict[str, Collector] = {}
    sizes = []
    step = 0
    while step in schedule or step < max(schedule) or loop.busy:
        if step in schedule:
            rid, prompt, abort_after = schedule[step]
            outs[rid] = submit(loop, rid, prompt, vocab, abort_after, hub)
        if loop.busy:
            loop.step()
            sizes.append((len(loop.decoding), loop.running))
        step += 1
        assert step < 500

    assert max(d for d, _ in sizes) >= 4 and max(r for _, r in sizes) == 5, sizes  # they did run together
    prompts = {"donor": donor_prompt, "fork": fork_prompt, "hit": hit_prompt, "abort": abort_prompt, "cold": cold_prompt}
    for rid, out in outs.items():
        assert out.result is not None, rid
        alone = run_alone(cold, prompts[rid])
        if rid == "abort":
            assert out.result.finish_reason is FinishReason.ABORT
            n = len(out.tokens)
            assert 5 <= n < MAX_TOKENS and out.result.generated_tokens == n
            alone = (alone[0][:n], alone[1][:n], alone[2])
        else:
            assert out.result.generated_tokens == len(out.tokens)
        assert_same_as_cold((out.tokens, out.logprobs, out.result.facts), alone)

    assert outs["hit"].result.facts.cached_tokens >= len(stored), outs["hit"].result.facts
    # The fork restored the shared prefix from the donor while it ran, not from the (empty) pool.
    assert outs["fork"].result.facts.cached_tokens >= len(shared) - 32, (arch, outs["fork"].result.facts)
    assert max(o.result.timings.batch_size_max for o in outs.values()) >= 4
    assert any(o.frames_shared for o in outs.values())
    pool = warm.engine.pool
    assert pool.leases == 0 and pool.stats().pinned_sequences == 0


@pytest.mark.parametrize("arch", ["qwen3_next", "llama"])
def test_batched_requests_are_stored_and_restore_exactly_afterwards(tiny_model, arch):
    """What a batch stored serves later requests exactly: each conversation continues from its own cache."""
    path = tiny_model(arch)
    warm, cold = Runner(path, True), Runner(path, False)
    vocab = warm.engine.vocab_size
    rng = random.Random(11)
    prompts = {f"c{i}": [rng.randrange(20, 600) for _ in range(40 + 10 * i)] for i in range(3)}
    loop = StepLoop(warm.engine, max_batch=3)
    outs = {rid: submit(loop, rid, p, vocab) for rid, p in prompts.items()}
    while loop.busy:
        loop.step()
    for rid, out in outs.items():
        follow = prompts[rid] + out.tokens + [rng.randrange(20, 600) for _ in range(8)]
        again = run_alone(warm, follow)
        assert again[2].cached_tokens >= len(prompts[rid]) + len(out.tokens) - 1, again[2]
        assert_same_as_cold(again, run_alone(cold, follow))

"""Penalties and logit_bias decode as mlx-lm decodes with its own processors; twins prefill once.

The reference is mlx-lm's `generate_step` in this process, over the same tiny model,
with the processors `make_logits_processors` makes for the same settings.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from protocol.messages import Generate, RestoreKind, SamplingParams
from tests.integration.test_batched_exact import Collector, Hub
from worker.engine import EngineConfig, load_engine
from worker.step_loop import StepLoop

MAX_TOKENS = 16
ARCHS = ("qwen3_next", "llama", "gemma3_text")  # snapshots of recurrent layers, plain KV, sliding windows


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, tiny_model):
    config = EngineConfig(checkpoint_interval=64, prefill_step=64)
    return load_engine(str(tiny_model(request.param)), config)


def prompt_of(seed: int, length: int = 90) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, 400) for _ in range(length)]


def run(engine, prompt, **settings) -> list[int]:
    tokens: list[int] = []
    sampling = SamplingParams(max_tokens=MAX_TOKENS, **settings)
    engine.generate(Generate("s", list(prompt), sampling), lambda m: tokens.extend(getattr(m, "tokens", [])), lambda: False)
    return tokens


def reference(engine, prompt, **processor_settings) -> list[int]:
    """mlx-lm's own greedy decoding with its own processors."""
    processors = make_logits_processors(**processor_settings)
    steps = generate_step(mx.array(prompt), engine.model, max_tokens=MAX_TOKENS, logits_processors=processors)
    return [int(token) for token, _ in steps]


def bias_fields(bias: dict[int, float]) -> dict:
    return dict(logit_bias_ids=list(bias), logit_bias_values=list(bias.values()))


def test_logit_bias_forces_a_token(engine):
    prompt = prompt_of(1)
    plain = run(engine, prompt)
    favoured = next(t for t in range(30, 400) if t not in plain)
    biased = run(engine, prompt, **bias_fields({favoured: 100.0}))
    assert biased == [favoured] * MAX_TOKENS
    assert biased == reference(engine, prompt, logit_bias={favoured: 100.0})
    banned = run(engine, prompt, **bias_fields({plain[0]: -100.0}))
    assert banned[0] != plain[0]
    assert banned == reference(engine, prompt, logit_bias={plain[0]: -100.0})


@pytest.mark.parametrize(
    "settings",
    [
        dict(presence_penalty=2.0),
        dict(frequency_penalty=2.0, frequency_context_size=40),
        dict(presence_penalty=-2.0, presence_context_size=8),
        dict(frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.5),
    ],
    ids=lambda s: ",".join(s),
)
def test_penalties_decode_as_mlx_lm(engine, settings):
    prompt = prompt_of(2)
    ours = run(engine, prompt, **settings)
    assert ours == reference(engine, prompt, **settings)
    assert ours != run(engine, prompt), "the settings should change this output"


def test_batch_neighbours_keep_their_greedy_tokens(engine):
    """Processors are per request: the unprocessed rows of a batch decode as alone."""
    prompts = [prompt_of(10 + i) for i in range(3)]
    alone = [run(engine, p) for p in prompts]
    loop, hub = StepLoop(engine, max_batch=3), Hub()
    outs = []
    for i, prompt in enumerate(prompts):
        out = Collector()
        out.rid = f"b{i}"
        hub.collectors.append(out)
        settings = dict(frequency_penalty=2.0, **bias_fields({5: 3.0})) if i == 1 else {}
        loop.submit(Generate(out.rid, prompt, SamplingParams(max_tokens=MAX_TOKENS, **settings)), hub, lambda: False)
        outs.append(out)
    while loop.busy:
        loop.step()
    assert outs[0].tokens == alone[0] and outs[2].tokens == alone[2]
    assert outs[1].tokens == reference(engine, prompts[1], frequency_penalty=2.0, logit_bias={5: 3.0})


def test_twins_prefill_once(engine):
    """Three requests of one prompt submitted together (OpenAI's n=3): one prefill, two forks at its end."""
    prompt = prompt_of(20, 150)
    loop, hub = StepLoop(engine, max_batch=3), Hub()
    outs = []
    for i in range(3):
        out = Collector()
        out.rid = f"n{i}"
        hub.collectors.append(out)
        loop.submit(Generate(out.rid, prompt, SamplingParams(max_tokens=MAX_TOKENS)), hub, lambda: False)
        outs.append(out)
    while loop.busy:
        loop.step()
    first, *others = [o.result.facts for o in outs]
    assert first.recomputed_tokens == len(prompt) - first.cached_tokens > 0
    for facts in others:
        assert (facts.cached_tokens, facts.recomputed_tokens, facts.restore_kind) == (len(prompt), 0, RestoreKind.FORK)
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens == run(engine, prompt)[:MAX_TOKENS]


def test_twins_of_a_stored_prompt_fork_from_the_one_that_restored_it(engine):
    """The prompt end is in the pool: the first twin takes it over, the others fork from that one's logits."""
    prompt = prompt_of(30, 120)
    run(engine, prompt)
    loop, hub = StepLoop(engine, max_batch=3), Hub()
    outs = []
    for i in range(3):
        out = Collector()
        out.rid = f"s{i}"
        hub.collectors.append(out)
        loop.submit(Generate(out.rid, prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=i)), hub, lambda: False)
        outs.append(out)
    while loop.busy:
        loop.step()
    for out in outs:
        assert (out.result.facts.cached_tokens, out.result.facts.recomputed_tokens) == (len(prompt), 0), out.result.facts


def test_settings_that_break_the_first_token_fail_that_request_alone(engine):
    """A request whose processors raise gets its Error; a neighbour in the loop decodes on, as alone."""
    from protocol.messages import Error

    loop = StepLoop(engine, max_batch=2)
    messages: dict[str, list] = {"bad": [], "good": []}
    bad = SamplingParams(max_tokens=MAX_TOKENS, frequency_penalty=0.5, frequency_context_size=1 << 40)
    loop.submit(Generate("good", prompt_of(7), SamplingParams(max_tokens=MAX_TOKENS)), messages["good"].append, lambda: False)
    loop.submit(Generate("bad", prompt_of(8), bad), messages["bad"].append, lambda: False)
    for _ in range(10_000):
        if not loop.busy:
            break
        loop.step()
    assert not loop.busy
    assert any(isinstance(m, Error) and m.request_id == "bad" for m in messages["bad"])
    assert "good" in loop.results and not any(isinstance(m, Error) for m in messages["good"])
    assert engine.pool is None or engine.pool.leases == 0  # the failed request's lease went back

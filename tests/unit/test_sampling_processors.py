"""A request's logits processors are mlx-lm's own: the same logits out as `make_logits_processors` gives."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors

from protocol.messages import SamplingParams
from worker.step_loop import StepLoop

VOCAB = 64

SETTINGS = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=-0.75, frequency_context_size=8),
    dict(presence_penalty=-2.0, frequency_penalty=2.0, presence_context_size=5),
    dict(repetition_penalty=1.3, repetition_context_size=4),
    dict(logit_bias={3: 100.0, 9: -100.0, 40: 2.5}),
    dict(logit_bias={7: -3.0}, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1),
]


def sampling_for(setting: dict) -> SamplingParams:
    fields = dict(setting)
    bias = fields.pop("logit_bias", {})
    return SamplingParams(logit_bias_ids=list(bias), logit_bias_values=list(bias.values()), **fields)


def apply(processors, history, logits):
    for processor in processors:
        logits = processor(history, logits)
    return logits


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(s))
def test_processors_match_mlx_lm(setting):
    ours = StepLoop._processors(sampling_for(setting))
    theirs = make_logits_processors(**setting)
    assert len(ours) == len(theirs)
    mx.random.seed(0)
    for length in (1, 6, 30):  # shorter and longer than the context sizes
        history = mx.random.randint(0, 12, (length,))  # few distinct ids: repeats, which frequency counts
        logits = mx.random.normal((1, VOCAB))
        # Some of mlx-lm's processors write into the logits they get: each run gets its own copy.
        a, b = apply(ours, history, logits + 0), apply(theirs, history, logits + 0)
        assert mx.array_equal(a, b).item(), setting
        assert not mx.array_equal(a, logits).item()  # they did something


def test_no_settings_no_processors():
    """A request without penalties or bias is left alone in a batch (mlx-lm skips rows without processors)."""
    assert StepLoop._processors(SamplingParams()) == []
    assert StepLoop._processors(SamplingParams(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)) == []

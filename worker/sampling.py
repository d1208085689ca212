"""A request's logits processors: mlx-lm's own, set up as mlx_lm.server sets them up.

`make_logits_processors` applies logit_bias, then the repetition, presence and
frequency penalties, each over the last `*_context_size` tokens of the prompt
and the output so far (mlx_lm.server's default context: 20 tokens). A request
with none of them gets no processors, so its rows of a batch are left alone.
"""

from __future__ import annotations

from mlx_lm.sample_utils import make_logits_processors

from protocol.messages import SamplingParams


def mlx_lm_processors(sampling: SamplingParams) -> list:
    """The processors mlx-lm's `make_logits_processors` makes for these settings (a penalty of 0 / 1.0 is off)."""
    bias = dict(zip(sampling.logit_bias_ids, sampling.logit_bias_values))
    return make_logits_processors(
        logit_bias=bias or None,
        repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
        repetition_context_size=sampling.repetition_context_size,
        presence_penalty=sampling.presence_penalty or None,
        presence_context_size=sampling.presence_context_size,
        frequency_penalty=sampling.frequency_penalty or None,
        frequency_context_size=sampling.frequency_context_size,
    )

"""A long prefill logs how far it is, at most every PREFILL_LOG_INTERVAL_S, between its chunks."""

from __future__ import annotations

import logging
import re

from protocol.messages import Generate, SamplingParams
from worker import step_loop
from worker.engine import EngineConfig, load_engine
from worker.step_loop import StepLoop


def test_a_prefill_in_chunks_logs_its_progress(tiny_model, caplog, monkeypatch):
    engine = load_engine(str(tiny_model("llama")), EngineConfig(prefill_step=32, cache_enabled=False))
    loop = StepLoop(engine)
    monkeypatch.setattr(step_loop, "PREFILL_LOG_INTERVAL_S", 0.0)  # every chunk, instead of every 5 s
    loop.submit(Generate("r1", list(range(5, 105)), SamplingParams(max_tokens=1)), lambda message: None, lambda: False)
    with caplog.at_level(logging.INFO, logger="mlx_cache_proxy.worker"):
        while loop.busy:
            loop.step()
    lines = [r.getMessage() for r in caplog.records if "prefilled" in r.getMessage()]
    assert [re.sub(r"\(\d+ tok/s\)", "(R tok/s)", line) for line in lines] == [
        f"request r1: prefilled {n} of 100 tokens (R tok/s)" for n in (32, 64, 96, 99)
    ]  # the last token, alone, ends the prefill: the request's own log line follows


def test_a_short_prefill_logs_nothing(tiny_model, caplog):
    engine = load_engine(str(tiny_model("llama")), EngineConfig(prefill_step=32, cache_enabled=False))
    loop = StepLoop(engine)
    loop.submit(Generate("r2", list(range(5, 105)), SamplingParams(max_tokens=1)), lambda message: None, lambda: False)
    with caplog.at_level(logging.INFO, logger="mlx_cache_proxy.worker"):
        while loop.busy:
            loop.step()
    assert not [r for r in caplog.records if "prefilled" in r.getMessage()]

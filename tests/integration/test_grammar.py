"""The grammar mask in the worker: a reply inside its schema, EOS only where the grammar is complete, and
requests without a grammar decoding as before beside one with a grammar."""

from __future__ import annotations

import json

import pytest

from protocol.messages import Generate, SamplingParams
from proxy.chat import ChatTokenizer
from proxy.grammar import JsonOutput
from worker.engine import EngineConfig, load_engine
from worker.step_loop import StepLoop

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(tiny_model):
    path = tiny_model("qwen3_next", "chatml-tools")
    tokenizer = ChatTokenizer.load(path)
    engine = load_engine(str(path), EngineConfig(cache_enabled=False))
    grammar = tokenizer.grammars.grammar(JsonOutput(SCHEMA, "response_format"), None)
    prompt = tokenizer.render_chat([{"role": "user", "content": "Is it ok?"}]).tokens
    return tokenizer, engine, grammar, prompt


def test_the_mask_allows_eos_only_where_the_grammar_accepts(setup):
    tokenizer, engine, grammar, _ = setup
    processor = engine.grammar_processor(grammar)
    eos = sorted(tokenizer.wrapper.eos_token_ids)
    assert not processor.allowed()[eos].any()
    for token in tokenizer.wrapper.encode('{"ok": true}', add_special_tokens=False):
        assert processor.allowed()[token]
        processor.consume(token)
    allowed = processor.allowed()
    assert allowed[eos].all() and allowed.sum() == len(eos)


def test_a_grammar_request_beside_a_plain_one_leaves_the_plain_one_as_alone(setup):
    tokenizer, engine, grammar, prompt = setup
    eos = sorted(tokenizer.wrapper.eos_token_ids)

    def run(requests):
        loop, out = StepLoop(engine, max_batch=4), {}
        for rid, g in requests:
            out[rid] = []
            sink = lambda m, rid=rid: out[rid].extend(getattr(m, "tokens", []) if getattr(m, "request_id", rid) == rid else [])
            loop.submit(Generate(rid, prompt, SamplingParams(max_tokens=40, stop_token_ids=eos, grammar=g)), sink, lambda: False)
        while loop.busy:
            loop.step()
        return out

    alone = run([("plain", None)])["plain"]
    together = run([("plain", None), ("json", grammar)])
    assert together["plain"] == alone
    text = tokenizer.wrapper.decode([t for t in together["json"] if t not in eos])
    assert json.loads(text) in ({"ok": True}, {"ok": False})

"""Harmony (GPT-OSS) replies: harmony's own renderings, parsed back into reasoning, content and tool calls.

Both ways a model's tokens reach harmony's parser are covered: a tokenizer with
harmony's own ids (every GPT-OSS checkpoint's; here harmony's encoding itself
plays it) and the tiny model's tokenizer, whose ids are bridged.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from proxy.chat import ChatTokenizer
from proxy.harmony import (
    O200K_RANKS,
    HarmonyOutput,
    TokenBridge,
    _byte_decoder,
    harmony_encoding,
    is_harmony_tokenizer,
    o200k_ranks_from_tokenizer_json,
    write_vocab,
)
from proxy.text_output import OutputDelta
from tests.harmony_fixtures import quicktok_o200k_ranks

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # harmony checks this
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.fixture(scope="module")
def encoding(harmony_vocab):
    enc = harmony_encoding(None, None)
    assert enc is not None
    return enc


def harmony_reply(encoding, *messages) -> list[int]:
    """Harmony's own tokens for assistant messages, without the `<|start|>assistant` the prompt ends with."""
    tokens: list[int] = []
    for message in messages:
        tokens += encoding.render(message)
    return tokens[2:]


def analysis_preamble_call(encoding) -> list[int]:
    from openai_harmony import Message, Role

    return harmony_reply(
        encoding,
        Message.from_role_and_content(Role.ASSISTANT, "I should look it up.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "Checking.").with_channel("commentary"),
        Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}')
        .with_channel("commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json"),
    )


def analysis_final(encoding) -> list[int]:
    from openai_harmony import Message, Role

    return harmony_reply(
        encoding,
        Message.from_role_and_content(Role.ASSISTANT, "Easy.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "It is sunny. Bye.").with_channel("final"),
    )


class OwnIdsWrapper:
    """A tokenizer with harmony's own ids, as a GPT-OSS checkpoint's is."""

    def __init__(self, encoding) -> None:
        self._encoding = encoding
        names = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
        self._tokenizer = SimpleNamespace(
            added_tokens_decoder={encoding.encode(n, allowed_special="all")[0]: n for n in names}
        )
        self.detokenizer = None  # harmony's own ids need no detokenizing

    def encode(self, text, add_special_tokens=False):
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, tokens):
        return self._encoding.decode(tokens)


@pytest.fixture(scope="module")
def own_ids(encoding):
    wrapper = OwnIdsWrapper(encoding)
    bridge = TokenBridge(encoding, wrapper)
    assert bridge.same_ids
    return bridge, wrapper


@pytest.fixture(scope="module")
def tiny(harmony_vocab, tiny_model):
    tokenizer = ChatTokenizer.load(tiny_model("gpt_oss", "harmony"))
    assert tokenizer.harmony is not None and not tokenizer.harmony.same_ids
    return tokenizer


def run(output, tokens, finish_reason="stop") -> OutputDelta:
    total = OutputDelta()
    for token in tokens:
        total += output.add(token)
        if output.stopped:
            break
    total += output.finish(finish_reason)
    return total


def own_output(own_ids, **kwargs) -> HarmonyOutput:
    bridge, wrapper = own_ids
    return HarmonyOutput(bridge, wrapper, **kwargs)


def test_channels_go_to_their_fields_with_harmonys_own_ids(own_ids, encoding):
    output = own_output(own_ids, tools=TOOLS, parse_tools=True)
    # The worker keeps the stop token (<|call|>) to itself.
    delta = run(output, analysis_preamble_call(encoding)[:-1])
    assert (delta.reasoning, delta.content) == ("I should look it up.", "Checking.")
    [call] = delta.tool_calls
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["index"] == 0 and call["id"].startswith("call_") and output.tool_calls_made == 1


def test_a_final_answer_is_content(own_ids, encoding):
    delta = run(own_output(own_ids), analysis_final(encoding)[:-1])
    assert (delta.reasoning, delta.content, delta.tool_calls) == ("Easy.", "It is sunny. Bye.", [])


def test_the_tiny_tokenizer_is_bridged_to_the_same_reading(tiny, encoding):
    for reply, expected in ((analysis_preamble_call(encoding), ("I should look it up.", "Checking.", 1)),
                            (analysis_final(encoding), ("Easy.", "It is sunny. Bye.", 0))):  # fmt: skip
        text = encoding.decode(reply)
        tokens = tiny.wrapper.encode(text, add_special_tokens=False)
        assert tiny.wrapper.decode(tokens) == text
        output = tiny.text_output(tools=TOOLS, parse_tools=True, split_reasoning=True)
        delta = run(output, tokens[:-1])  # without the stop token
        assert (delta.reasoning, delta.content, len(delta.tool_calls)) == expected


def test_streaming_yields_each_part_as_it_comes(own_ids, encoding):
    output = own_output(own_ids, tools=TOOLS, parse_tools=True)
    deltas = [output.add(t) for t in analysis_preamble_call(encoding)]
    reasoning_at = [i for i, d in enumerate(deltas) if d.reasoning]
    content_at = [i for i, d in enumerate(deltas) if d.content]
    call_at = [i for i, d in enumerate(deltas) if d.tool_calls]
    assert len(reasoning_at) > 1 and max(reasoning_at) < min(content_at) and max(content_at) < call_at[0]
    assert call_at == [len(deltas) - 1]  # the call as soon as <|call|> closes it


def test_stop_strings_end_the_content(own_ids, encoding):
    output = own_output(own_ids, stop=["Bye"])
    delta = run(output, analysis_final(encoding))
    assert delta.content == "It is sunny. " and output.stopped and output.stop_string == "Bye"


def test_a_call_cut_by_max_tokens_is_text_not_a_call(own_ids, encoding):
    tokens = analysis_preamble_call(encoding)
    delta = run(own_output(own_ids, tools=TOOLS, parse_tools=True), tokens[:-3], finish_reason="length")
    assert delta.tool_calls == [] and delta.content.startswith("Checking.{")


def test_without_tools_a_call_stays_text(own_ids, encoding):
    delta = run(own_output(own_ids), analysis_preamble_call(encoding))
    assert delta.tool_calls == [] and delta.content == 'Checking.{"city": "Paris"}'


def test_text_that_is_not_harmony_is_not_lost(own_ids, encoding):
    tokens = encoding.encode("just some words, never a message")
    assert run(own_output(own_ids), tokens, finish_reason="length").content == "just some words, never a message"
    # A stray message marker in the wrong place: the parser gives up, the text stays.
    broken = encoding.encode("<|channel|>final<|message|>hi<|end|>oops", allowed_special="all")
    delta = run(own_output(own_ids), broken)
    assert delta.content.startswith("hi") and delta.content.endswith("oops")


def test_a_generation_prompt_that_opens_the_final_channel(own_ids, encoding):
    prompt = encoding.encode("<|start|>user<|message|>q<|end|><|start|>assistant<|channel|>final<|message|>",
                             allowed_special="all")  # fmt: skip
    delta = run(own_output(own_ids, prompt=prompt), encoding.encode("Straight to it."))
    assert (delta.reasoning, delta.content) == ("", "Straight to it.")


def test_harmony_models_are_told_by_their_markup():
    assert is_harmony_tokenizer(["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"])
    assert not is_harmony_tokenizer(["<|im_start|>", "<|im_end|>", "<think>"])


# ----------------------------------------------------------------- the vocabulary of a real checkpoint


def test_the_vocabulary_is_rebuilt_from_a_gpt_oss_tokenizer_json(tmp_path):
    ranks = quicktok_o200k_ranks()
    assert ranks is not None and len(ranks) == O200K_RANKS
    encoder = {b: c for c, b in _byte_decoder().items()}
    vocab = {"".join(encoder[byte] for byte in token): rank for rank, token in enumerate(ranks)}
    vocab["<|start|>"] = 200006  # added tokens sit above the ranks
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
    rebuilt = o200k_ranks_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert rebuilt == ranks
    written = write_vocab(rebuilt, tmp_path / "vocab")
    assert hashlib.sha256(written.read_bytes()).hexdigest() == O200K_SHA256


def test_a_small_vocabulary_is_not_taken_for_o200k(tiny_model):
    assert o200k_ranks_from_tokenizer_json(tiny_model("gpt_oss", "harmony") / "tokenizer.json") is None


def test_a_reply_ends_at_return_or_call_whatever_the_config_says(harmony_vocab, tiny_model, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model("gpt_oss", "harmony"), tmp_path / "model")
    (model / "generation_config.json").unlink()  # config.json names <|return|> alone
    tokenizer = ChatTokenizer.load(model)
    call, ret = (tokenizer.wrapper.convert_tokens_to_ids(t) for t in ("<|call|>", "<|return|>"))
    assert {call, ret} <= set(tokenizer.eos_token_ids)

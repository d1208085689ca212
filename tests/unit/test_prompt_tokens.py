"""A prompt tokenized piece by piece is the template's own tokenization, token for token.

"The template's own tokenization" is that of a template rendered from strings
whose control tokens are marked, encoded by transformers' `encode_marked_chat`
(text from a client never becomes a control token, see `proxy.control_tokens`);
its plain-text encoder is a copy of the tokenizer without added tokens, so it
can write non-special added tokens (`<think>`) as text too.

`ChatTokenizer.render_chat` renders the template to text once and encodes it
through `PromptEncoder`, which reuses the ids of pieces (the text between added
tokens) seen before; its message-end hints come from `MessageEnds`. Both must
give exactly what `apply_chat_template(tokenize=True)` and one render per
message prefix give, on every template the factory ships and on real-style
templates (Gemma, Llama 3 with tools, a harmony-like one with reasoning), and a
tokenizer whose pieces cannot be encoded apart must be detected.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import SplitKind
from proxy.chat import ChatTokenizer, normalize_messages
from proxy.prompt_tokens import PromptEncoder

GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
    "<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_STYLE = (
    "<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "You may call: {{ tools | tojson }}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function | tojson }}{% endfor %}"
    "{% else %}{{ m.content | trim }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
HARMONY_STYLE = (
    "<|start|>system<|message|>Reasoning: medium<|end|>"
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if m.reasoning_content and loop.last %}<|start|>assistant<|channel|>analysis<|message|>"
    "{{ m.reasoning_content }}<|end|>{% endif %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
REAL_STYLE = {
    "gemma": (GEMMA_STYLE, ["<bos>", "<start_of_turn>", "<end_of_turn>"], {"bos_token": "<bos>"}),
    "llama3": (LLAMA3_STYLE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], {}),
    "harmony-style": (HARMONY_STYLE, ["<|start|>", "<|message|>", "<|end|>", "<|channel|>"], {}),
}
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search.",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]  # fmt: skip


def _real_style_dir(base, root, name):
    """The tiny tokenizer with the template's control tokens added, and the template."""
    from tokenizers import AddedToken, Tokenizer

    template, specials, extra = REAL_STYLE[name]
    out = root / name
    out.mkdir()
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out / "tokenizer.json"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config.update({"chat_template": template, **extra})
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _sentencepiece_style_dir(base, root):
    """A tokenizer whose pre-tokenizer marks only the first piece of its input (Metaspace, "first")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from worker.tiny_corpus import corpus
    from worker.tiny_models import CONTROL_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(CONTROL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(corpus(seed=7), trainer=trainer)
    out = root / "sentencepiece"
    out.mkdir()
    tokenizer.save(str(out / "tokenizer.json"))
    shutil.copy(base / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from worker.tiny_models import TEMPLATES, make_model

    root = tmp_path_factory.mktemp("templates")
    dirs = {t: make_model("qwen3_next", root / t, seed=0, template=t) for t in TEMPLATES}
    for name in REAL_STYLE:
        dirs[name] = _real_style_dir(dirs["chatml"], root, name)
    dirs["sentencepiece"] = _sentencepiece_style_dir(dirs["chatml"], root)
    out = {}
    for name, path in dirs.items():
        tok = ChatTokenizer.load(path)
        tok._verify_left = 0  # no safety net: the piece-wise path itself is under test
        out[name] = tok
    return out


TEXT_PARTS = st.sampled_from([
    "hello", " world", "Two  spaces", "\n", "\n\n", " ", ".", "? ", "é", "中文", "tab\tbed", "<|im_end|>",
    "<think>", "</think>", "<tool_call>", "line one.\nline two", "  lead", "trail  ", "<start_of_turn>", "x" * 40,
])  # fmt: skip
CONTENT = st.lists(TEXT_PARTS, min_size=0, max_size=12).map("".join)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for turn in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(CONTENT)})
        if draw(st.booleans()) or turn < 1:
            reply = {"role": "assistant", "content": draw(CONTENT)}
            if draw(st.booleans()):
                reply["reasoning_content"] = draw(CONTENT)
            messages.append(reply)
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": draw(CONTENT)})
    return messages


def _template_tokens(tok, messages, tools=None):
    from tokenizers import Tokenizer
    from transformers.utils.chat_template_utils import encode_marked_chat

    hf = tok.wrapper._tokenizer
    if "_encode_without_added_tokens" not in vars(hf):
        spec = json.loads(hf._tokenizer.to_str())
        spec["added_tokens"] = []
        plain = Tokenizer.from_str(json.dumps(spec))
        hf._encode_without_added_tokens = lambda text: plain.encode(text, add_special_tokens=False).ids
    marked = tok.control.mark(normalize_messages(messages))
    text = tok.wrapper.apply_chat_template(
        marked, tools=tok.control.mark(tools), add_generation_prompt=True, tokenize=False
    )
    return [int(t) for t in encode_marked_chat(hf, text)]


def _slow_hints(tok, messages, tools=None):
    marked = tok.control.mark(normalize_messages(messages))
    return tok._render_tokens(marked, tok.control.mark(tools), {}, 8).checkpoint_hints


NAMES = ["chatml", "chatml-tools", "chatml-drop-reasoning", "harmony", "gemma", "llama3", "harmony-style", "sentencepiece"]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), with_tools=st.booleans())
def test_piecewise_tokens_and_hints_equal_the_templates_own(tokenizers, name, messages, with_tools):
    tok = tokenizers[name]
    tools = TOOLS if with_tools and name in ("chatml-tools", "chatml-drop-reasoning", "llama3") else None
    rendered = tok.render_chat(messages, tools=tools)
    assert rendered.tokens == _template_tokens(tok, messages, tools)
    assert rendered.checkpoint_hints == _slow_hints(tok, messages, tools)
    assert all(0 < s < len(rendered.tokens) for s in rendered.split_points)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sentencepiece"])
def test_byte_level_tokenizers_reuse_pieces(tokenizers, name):
    assert tokenizers[name].encoder.reuses_pieces


def test_a_tokenizer_that_marks_the_first_piece_is_encoded_whole(tokenizers):
    encoder = tokenizers["sentencepiece"].encoder
    assert not encoder.reuses_pieces  # the probe saw piece-wise ids differ
    text = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert encoder.encode(text).tokens == list(encoder.backend.encode(text, add_special_tokens=False).ids)


def test_a_growing_conversation_reuses_its_earlier_pieces(tokenizers):
    tok = tokenizers["chatml-tools"]
    messages = [{"role": "system", "content": "be brief. " * 50}]
    for turn in range(6):
        messages.append({"role": "user", "content": f"question {turn}: " + "why? " * 40})
        before = tok.encoder.cached_tokens
        rendered = tok.render_chat(messages)
        assert rendered.tokens == _template_tokens(tok, messages)
        assert rendered.checkpoint_hints == _slow_hints(tok, messages)
        new = tok.encoder.cached_tokens - before
        assert new < 0.5 * len(rendered.tokens) or turn == 0  # only the new messages were encoded
        messages.append({"role": "assistant", "content": f"answer {turn}. " * 30})


def test_split_points_are_line_starts_and_the_last_sentence_starts(tokenizers):
    tok = tokenizers["chatml"]
    body = "First line of the note.\nSecond line here.\n\nA new paragraph. It goes on. And ends here."
    rendered = tok.render_chat([{"role": "user", "content": body * 3}])
    wrapper = tok.wrapper
    assert rendered.split_points
    assert SplitKind.PARAGRAPH in rendered.split_kinds and SplitKind.SENTENCE in rendered.split_kinds
    for s, kind in zip(rendered.split_points, rendered.split_kinds):
        before = wrapper.decode(rendered.tokens[s - 2 : s])
        after = wrapper.decode(rendered.tokens[s : s + 1])
        if kind == SplitKind.PARAGRAPH:
            assert before.endswith("\n\n"), before
        elif kind == SplitKind.LINE:
            assert before.endswith("\n"), before
        else:
            assert before.rstrip().endswith(".") and after[:1].isspace(), (before, after)


def test_verification_falls_back_to_the_templates_tokens_on_a_mismatch(tokenizers):
    tok = ChatTokenizer(tokenizers["chatml"].wrapper)
    assert tok.encoder is not None and tok._verify_left > 0

    class Wrong(PromptEncoder):
        def encode(self, text, cancelled=None):
            encoded = super().encode(text, cancelled)
            encoded.tokens.append(0)
            return encoded

    tok.encoder = Wrong(tok.encoder.backend)
    messages = [{"role": "user", "content": "hello there"}]
    assert tok.render_chat(messages).tokens == _template_tokens(tok, messages)
    assert tok.encoder is None  # piece reuse is off from now on
    assert tok.render_chat(messages).tokens == _template_tokens(tok, messages)

"""What the harmony (GPT-OSS) tests share: harmony's vocabulary offline, and a tiny gpt_oss model taught two replies.

openai-harmony needs the o200k vocabulary (`o200k_base.tiktoken`, checked by its
SHA-256). Offline, the tests write it from the copy the quicktok-v1 package ships
(a test dependency) and point `TIKTOKEN_ENCODINGS_BASE` at it; harmony's own hash
check vouches for the result.

A random-weight model says nothing in the harmony format, so `teach_replies`
trains the tiny gpt_oss model (a real mlx-lm model, harmony template and
tokenizer) for a few hundred steps to answer a weather conversation's two turns:
reasoning, a preamble and a tool call, then, after the tool's result, reasoning
and a final answer. Greedy decoding then gives those tokens back, and the service
has to parse them like a real GPT-OSS reply.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

from proxy.harmony import VOCAB_ENV, write_vocab

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SYSTEM = "You answer questions about the weather."
QUESTION = "What is the weather in Paris?"
TOOL_RESULT = "sunny, 24 C"

REASONING_1 = "The user asks about Paris. I will call the tool."
PREAMBLE = "Let me check."
ARGUMENTS = '{"city": "Paris"}'
REPLY_1 = (
    f"<|channel|>analysis<|message|>{REASONING_1}<|end|>"
    f"<|start|>assistant<|channel|>commentary<|message|>{PREAMBLE}<|end|>"
    f"<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{ARGUMENTS}<|call|>"
)
REASONING_2 = "The tool says it is sunny."
ANSWER = "It is sunny in Paris, 24 C."
REPLY_2 = f"<|channel|>analysis<|message|>{REASONING_2}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"


def first_turn() -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def second_turn(call_id: str = "call_1") -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    return [
        *first_turn(),
        {"role": "assistant", "content": PREAMBLE, "reasoning": REASONING_1, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


# ----------------------------------------------------------------- the vocabulary


def quicktok_o200k_ranks() -> Optional[list[bytes]]:
    """o200k's token bytes in rank order, from quicktok's data file (u32 count; u16 length, bytes, u32 rank each)."""
    try:
        import quicktok
    except ImportError:
        return None
    path = Path(quicktok.__file__).parent / "data" / "o200k.vocab"
    if not path.is_file():
        return None
    data = path.read_bytes()
    (count,), offset = struct.unpack_from("<I", data, 0), 4
    ranks: list[bytes] = [b""] * count
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranks[rank] = token
        offset += 6 + length
    return ranks


def provide_vocab(directory: Path) -> Optional[str]:
    """Set TIKTOKEN_ENCODINGS_BASE to a directory holding o200k (unless set); the directory, or None."""
    if VOCAB_ENV in os.environ:
        return os.environ[VOCAB_ENV]
    ranks = quicktok_o200k_ranks()
    if ranks is None:
        return None
    write_vocab(ranks, directory)
    os.environ[VOCAB_ENV] = str(directory)
    return str(directory)


# ----------------------------------------------------------------- the taught model


def teach_replies(model_dir: Path, steps: int = 400, learning_rate: float = 1e-2) -> None:
    """Train the model in `model_dir` until greedy decoding gives REPLY_1 / REPLY_2 after the two turns' prompts.

    Only the last layer's MLP, the final norm and the output head learn: what
    reaches them (the residual after the last attention, under teacher forcing)
    is computed once, so a step costs a few small matrix products, not a pass
    over ~900 tokens of a MoE model on a CPU.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.base import create_attention_mask

    from proxy.chat import ChatTokenizer

    model, wrapper = load(str(model_dir))
    chat = ChatTokenizer(wrapper)
    inner, last = model.model, model.model.layers[-1]
    features, targets = [], []
    for messages, reply in ((first_turn(), REPLY_1), (second_turn(), REPLY_2)):
        prompt = chat.render_chat(messages, tools=[WEATHER_TOOL], max_hints=0).tokens
        sequence = prompt + wrapper.encode(reply, add_special_tokens=False)
        x = inner.embed_tokens(mx.array([sequence[:-1]]))
        masks = {
            "full_attention": create_attention_mask(x, None),
            "sliding_attention": create_attention_mask(x, None, window_size=inner.window_size),
        }
        for layer, kind in zip(inner.layers[:-1], inner.layer_types):
            x = layer(x, masks[kind])
        x = x + last.self_attn(last.input_layernorm(x), masks[inner.layer_types[-1]])
        features.append(x[0, len(prompt) - 1 :])
        targets += sequence[len(prompt) :]
    x, y = mx.concatenate(features)[None], mx.array([targets])
    mx.eval(x)

    learner = nn.Module()
    learner.mlp, learner.post_norm, learner.norm, learner.lm_head = last.mlp, last.post_attention_layernorm, inner.norm, model.lm_head

    def loss_fn(learner, x, y):
        out = x + learner.mlp(learner.post_norm(x))
        return nn.losses.cross_entropy(learner.lm_head(learner.norm(out)), y).mean()

    loss_and_grad = nn.value_and_grad(learner, loss_fn)
    optimizer = optim.Adam(learning_rate=learning_rate)
    for _ in range(steps):
        loss, grads = loss_and_grad(learner, x, y)
        optimizer.update(learner, grads)
        mx.eval(learner.parameters(), optimizer.state, loss)
        if loss.item() < 1e-3:
            break
    weights_file = model_dir / "model.safetensors"
    mx.save_safetensors(str(weights_file), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})


def make_taught_model(out_dir: Path) -> Path:
    """A tiny gpt_oss model with the harmony template that answers the weather conversation in harmony."""
    from worker.tiny_models import make_model

    path = make_model("gpt_oss", out_dir, seed=0, template="harmony")
    teach_replies(path)
    return path

"""Tiny real mlx-lm models with random weights.

`make_model` writes a directory that `mlx_lm.load` reads like any converted
checkpoint: config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json (with a ChatML chat template) and generation_config.json.
The models are real mlx-lm architectures, only very small, so tests and the
default `serve` model exercise the same cache kinds (KVCache, RotatingKVCache,
ArraysCache, CacheList) as the full-size hybrids, quickly, on a CPU.

The output is byte-identical for the same (arch, seed, template): weights come
from a seeded numpy generator, the tokenizer is trained on a seeded synthetic
corpus (`tiny_corpus`), and JSON is written with sorted keys.

MLX, mlx-lm and tokenizers are imported inside the functions that need them so
that the proxy can import `default_model_dir` without loading MLX when the
default model is already built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the output of make_model changes, so cached default models rebuild.
FACTORY_VERSION = 1

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen3_next",
    "qwen3_5",
    "gemma3_text",
    "gpt_oss",
    "mamba2",
    "falcon_h1",
    "lfm2",
)
TEMPLATES: tuple[str, ...] = ("chatml", "chatml-tools", "chatml-drop-reasoning", "harmony")

DEFAULT_ARCH = "qwen3_next"
DEFAULT_SEED = 0
DEFAULT_TEMPLATE = "chatml-tools"

# Trained merges plus the control tokens; the markup tokens come on top.
TRAINED_VOCAB_SIZE = 994
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen marks these non-special, so decoding keeps them in the text where the
# reasoning and tool-call parsers look for them.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
# GPT-OSS's harmony markup, special as in its tokenizer; only the harmony template's
# tokenizer has them (the other templates' models stay byte-identical).
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
HARMONY_EOS = ("<|return|>", "<|call|>")  # a reply ends with its answer or a tool call
CORPUS_SEED = 1234

# Standard deviation of the random matrices. With 0.02 the residual stream is
# mostly the token embedding: greedy decoding of a tied-embedding model (lfm2)
# repeats one token forever and attention barely moves the logits. 0.1 keeps
# activations finite (every block is normalised) and makes logits depend on
# the whole context.
WEIGHT_STD = 0.1
BIAS_STD = 0.02
# Depthwise convolutions sum only a few (kernel size) inputs per output, so
# they need a larger scale to pass a signal of the same size on to the SSM.
CONV_STD = 0.5
# Recurrent time steps, log-uniform in this range as in the Mamba reference
# init. Larger steps (mlx-lm's default dt_bias of 1) forget a token within a
# few steps, so a wrong recurrent state far back would not show in the logits.
DT_MIN, DT_MAX = 0.001, 0.1
# Recurrent decay rates A (per step the state decays by exp(-A * dt)),
# log-uniform. The reference inits draw A from [1, 16]; smaller rates let some
# heads carry a token for hundreds of steps, and a random-weight model needs
# that for its logits to depend on the distant past at all.
A_MIN, A_MAX = 0.01, 1.0
MAX_POSITIONS = 32768


# --------------------------------------------------------------------------
# Model configs: one per architecture, in the fields of mlx-lm's ModelArgs.
# --------------------------------------------------------------------------

_ATTENTION = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": MAX_POSITIONS,
}


def _llama() -> dict:
    return {
        **_ATTENTION,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def _gated_delta_fields() -> dict:
    # Shared by qwen3_next and qwen3_5: 3 linear-attention layers, then one
    # full-attention layer (full_attention_interval=4).
    return {
        **_ATTENTION,
        "num_hidden_layers": 4,
        "full_attention_interval": 4,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def _qwen3_next() -> dict:
    return {
        **_gated_delta_fields(),
        "model_type": "qwen3_next",
        "architectures": ["Qwen3NextForCausalLM"],
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
    }


def _qwen3_5() -> dict:
    # Qwen3.5 checkpoints are vision-language: the text model sits in text_config.
    text = {
        **_gated_delta_fields(),
        "model_type": "qwen3_5_text",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
        },
    }
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": text,
    }


def _gemma3_text() -> dict:
    # Sliding window 32 with pattern 2: layers alternate sliding/global, and a
    # 100-token prompt already wraps the RotatingKVCache.
    return {
        **_ATTENTION,
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 16,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
    }


def _gpt_oss() -> dict:
    return {
        **_ATTENTION,
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "num_hidden_layers": 4,
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "experts_per_token": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        # gpt-oss's own YaRN settings; transformers warns about any other
        # factor / max_position_embeddings pair when it reads this config.
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 131072,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }


def _mamba2() -> dict:
    return {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_heads": 4,
        "head_dim": 32,
        "intermediate_size": 128,
        "state_size": 16,
        "n_groups": 1,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5,
        # Finite, because JSON has no infinity.
        "time_step_limit": [0.0, 1000.0],
        "time_step_rank": "auto",
        "tie_word_embeddings": False,
    }


def _falcon_h1() -> dict:
    # Every layer runs a Mamba2 mixer and attention side by side.
    return {
        **_ATTENTION,
        "model_type": "falcon_h1",
        "architectures": ["FalconH1ForCausalLM"],
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "mamba_d_ssm": 64,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_expand": 1,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_rms_norm": False,
        "tie_word_embeddings": False,
    }


def _lfm2() -> dict:
    return {
        "model_type": "lfm2",
        "architectures": ["Lfm2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "tie_word_embeddings": True,
    }


_CONFIGS = {
    "llama": _llama,
    "qwen3_next": _qwen3_next,
    "qwen3_5": _qwen3_5,
    "gemma3_text": _gemma3_text,
    "gpt_oss": _gpt_oss,
    "mamba2": _mamba2,
    "falcon_h1": _falcon_h1,
    "lfm2": _lfm2,
}


def model_config(arch: str, vocab_size: int, eos_token_id: int) -> dict:
    """The config.json of a tiny `arch` model."""
    config = _CONFIGS[arch]()
    config["vocab_size"] = vocab_size
    config["eos_token_id"] = eos_token_id
    if "text_config" in config:
        config["text_config"]["vocab_size"] = vocab_size
        config["text_config"]["eos_token_id"] = eos_token_id
    config["torch_dtype"] = "float32"
    return config


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def random_weights(config: dict, seed: int) -> dict:
    """Seeded float32 weights under the names the mlx-lm Model itself uses.

    These are the names after `sanitize`; for every architecture here
    `sanitize` leaves such weights as they are (checked by the tests).
    """
    import importlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    # Every value saved comes from `rng` or is a constant the model sets, so
    # MLX's global generator is left alone (the tests check the output is
    # reproducible within one process, which would catch a stray draw).
    model = arch.Model(arch.ModelArgs.from_dict(config))
    defaults = dict(tree_flatten(model.parameters()))
    rng = np.random.RandomState(seed)
    return {
        name: mx.array(_init_param(name, np.array(defaults[name]), rng))
        for name in sorted(defaults)
    }


def _init_param(name: str, default, rng):
    import numpy as np

    if name.endswith("A_log"):
        value = rng.uniform(np.log(A_MIN), np.log(A_MAX), default.shape)
    elif name.endswith("dt_bias"):
        dt = np.exp(rng.uniform(np.log(DT_MIN), np.log(DT_MAX), default.shape))
        value = dt + np.log(-np.expm1(-dt))  # inverse softplus
    elif name.endswith(".bias"):
        value = rng.normal(0.0, BIAS_STD, default.shape)
    elif default.ndim == 3 and "conv" in name:
        value = rng.normal(0.0, CONV_STD, default.shape)
    elif default.ndim >= 2:
        value = rng.normal(0.0, WEIGHT_STD, default.shape)
    else:
        # Norm scales, D, attention sinks: the model's own constants.
        value = default
    return value.astype(np.float32)


def _save_weights(weights: dict, path: Path) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer (no unknown token for any text).

    Training is deterministic across processes and thread counts (checked by
    the tests), so no single-thread setting is needed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers

    from worker.tiny_corpus import corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed=CORPUS_SEED), trainer=trainer)
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS]
    )
    if template == "harmony":
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_TOKENS])
    return tokenizer


def tokenizer_config(template: str) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(template),
        "bos_token": None,
        "eos_token": "<|return|>" if template == "harmony" else "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "split_special_tokens": False,
    }


# --------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------

# Message content is a string, None, or a list of OpenAI content parts.
_CONTENT_MACRO = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}
"""

_CHATML = (
    _CONTENT_MACRO
    + """\
{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
)

# Qwen2.5/Qwen3 style. The literal "<tool_call>" plus "tool_call.name" is what
# mlx-lm looks for to pick its json_tools parser.
_TOOLS_HEADER = """\
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages[0].role == 'system' -%}
        {{- render_content(messages[0].content) + '\\n\\n' -}}
    {%- endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0].role == 'system' -%}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' -}}
{%- endif -%}
"""

# The last user turn that is not a wrapped tool response: reasoning after it
# belongs to the turn in progress.
_LAST_QUERY = """\
{%- set ns = namespace(last_query=-1) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}
        {%- set text = render_content(message.content) -%}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
            {%- set ns.last_query = loop.index0 -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
"""

_ASSISTANT_TURN = """\
{%- set content = render_content(message.content) -%}
{%- set reasoning = '' -%}
{%- if message.reasoning_content is string -%}
    {%- set reasoning = message.reasoning_content -%}
{%- elif '</think>' in content -%}
    {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
    {%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{%- set reasoning = reasoning.strip('\\n') -%}
{%- set content = content.lstrip('\\n') -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if reasoning and (keep_all_reasoning or loop.index0 > ns.last_query) -%}
    {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}
{%- endif -%}
{{- content -}}
{%- for tool_call in message.tool_calls or [] -%}
    {%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
    {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
    {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' -}}
    {%- if tool_call.arguments is string -%}
        {{- tool_call.arguments -}}
    {%- else -%}
        {{- tool_call.arguments | tojson -}}
    {%- endif -%}
    {{- '}\\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\\n' -}}
"""

_TOOL_TURN = """\
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
    {{- '<|im_start|>user' -}}
{%- endif -%}
{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
    {{- '<|im_end|>\\n' -}}
{%- endif -%}
"""

_GENERATION_PROMPT = """\
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def _tools_template(keep_all_reasoning: bool) -> str:
    keep = "true" if keep_all_reasoning else "false"
    turns = (
        "{%- for message in messages -%}\n"
        "{%- if message.role == 'system' -%}\n"
        "{%- if not loop.first -%}\n"
        "{{- '<|im_start|>system\\n' + render_content(message.content) + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- elif message.role == 'assistant' -%}\n"
        + _ASSISTANT_TURN
        + "{%- elif message.role == 'tool' -%}\n"
        + _TOOL_TURN
        + "{%- else -%}\n"
        "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    )
    return (
        f"{{%- set keep_all_reasoning = {keep} -%}}\n"
        + _CONTENT_MACRO
        + _TOOLS_HEADER
        + _LAST_QUERY
        + turns
        + _GENERATION_PROMPT
    )


# GPT-OSS's harmony format, after its own template, shortened: tool parameters are
# shown as JSON schema rather than TypeScript. Past reasoning is kept only after the
# last user message (a tool-calling turn in progress), as harmony drops it after a final.
_HARMONY = (
    _CONTENT_MACRO
    + """\
{%- macro reasoning_of(message) -%}
    {%- if message.thinking is string -%}{{- message.thinking -}}
    {%- elif message.reasoning_content is string -%}{{- message.reasoning_content -}}
    {%- elif message.reasoning is string -%}{{- message.reasoning -}}
    {%- endif -%}
{%- endmacro -%}
{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\nKnowledge cutoff: 2024-06\\n\\n' -}}
{{- 'Reasoning: ' + (reasoning_effort | default('medium')) + '\\n\\n' -}}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{%- if tools -%}{{- '\\nCalls to these tools must go to the commentary channel: \\'functions\\'.' -}}{%- endif -%}
{{- '<|end|>' -}}
{%- set first = messages[0] if messages else none -%}
{%- set has_instructions = first is not none and first.role in ('system', 'developer') -%}
{%- if has_instructions or tools -%}
    {{- '<|start|>developer<|message|>' -}}
    {%- if has_instructions -%}{{- '# Instructions\\n\\n' + render_content(first.content) + '\\n\\n' -}}{%- endif -%}
    {%- if tools -%}
        {{- '# Tools\\n\\n## functions\\n\\nnamespace functions {\\n\\n' -}}
        {%- for tool in tools -%}
            {%- set fn = tool.function if tool.function is defined else tool -%}
            {%- if fn.description -%}{{- '// ' + fn.description + '\\n' -}}{%- endif -%}
            {{- 'type ' + fn.name + ' = (_: ' + ((fn.parameters or {}) | tojson) + ') => any;\\n\\n' -}}
        {%- endfor -%}
        {{- '} // namespace functions' -}}
    {%- endif -%}
    {{- '<|end|>' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, last_call='') -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- if message.role in ('system', 'developer') and loop.first -%}
    {%- elif message.role == 'assistant' -%}
        {%- set reasoning = reasoning_of(message) -%}
        {%- set content = render_content(message.content) -%}
        {%- if reasoning and loop.index0 > ns.last_user -%}
            {{- '<|start|>assistant<|channel|>analysis<|message|>' + reasoning + '<|end|>' -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {%- if content -%}{{- '<|start|>assistant<|channel|>commentary<|message|>' + content + '<|end|>' -}}{%- endif -%}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- set ns.last_call = fn.name -%}
                {{- '<|start|>assistant to=functions.' + fn.name + '<|channel|>commentary json<|message|>' -}}
                {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
                {{- '<|call|>' -}}
            {%- endfor -%}
        {%- else -%}
            {{- '<|start|>assistant<|channel|>final<|message|>' + content + '<|end|>' -}}
        {%- endif -%}
    {%- elif message.role == 'tool' -%}
        {%- set name = message.name if message.name is string else ns.last_call -%}
        {{- '<|start|>functions.' + name + ' to=assistant<|channel|>commentary<|message|>' + render_content(message.content) + '<|end|>' -}}
    {%- else -%}
        {{- '<|start|>' + message.role + '<|message|>' + render_content(message.content) + '<|end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""
)


def chat_template(template: str) -> str:
    """The Jinja chat template named `template` (one of TEMPLATES)."""
    if template == "harmony":
        return _HARMONY
    if template == "chatml":
        return _CHATML
    if template == "chatml-tools":
        return _tools_template(keep_all_reasoning=True)
    if template == "chatml-drop-reasoning":
        return _tools_template(keep_all_reasoning=False)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


# --------------------------------------------------------------------------
# The model directory
# --------------------------------------------------------------------------


def make_model(
    arch: str, out_dir: str | Path, seed: int = 0, template: str = "chatml"
) -> Path:
    """Write a tiny `arch` model directory that `mlx_lm.load` can read."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    tok_config = tokenizer_config(template)  # raises on an unknown template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(template)
    end_of_text_id = tokenizer.token_to_id("<|endoftext|>")
    if template == "harmony":
        eos_ids = [tokenizer.token_to_id(t) for t in HARMONY_EOS]
    else:
        eos_ids = [tokenizer.token_to_id("<|im_end|>")]
    config = model_config(arch, tokenizer.get_vocab_size(), eos_ids[0])

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"eos_token_id": [*eos_ids, end_of_text_id]})
    _save_weights(random_weights(config, seed), out / "model.safetensors")
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tok_config)
    return out


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# The built-in default model
# --------------------------------------------------------------------------


def cache_home() -> Path:
    """Where mlx-cache-proxy keeps files it builds for itself."""
    if home := os.environ.get("MLX_CACHE_PROXY_HOME"):
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mlx-cache-proxy"


def default_model_path() -> Path:
    """Where the default model lives once built (it may not exist yet)."""
    name = f"tiny-{DEFAULT_ARCH}-seed{DEFAULT_SEED}-{DEFAULT_TEMPLATE}-v{FACTORY_VERSION}"
    return cache_home() / "models" / name


def default_model_dir() -> Path:
    """The model `serve` uses without --model, built on first use."""
    target = default_model_path()
    if target.is_dir():
        # Only complete directories are ever renamed into place.
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_model(DEFAULT_ARCH, staging, DEFAULT_SEED, DEFAULT_TEMPLATE)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process won the race; its directory is just as good.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-cache-proxy make-model",
        description="Write a tiny real mlx-lm model directory with random weights.",
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", choices=TEMPLATES, default="chatml")
    args = parser.parse_args(argv)
    print(make_model(args.arch, args.out, seed=args.seed, template=args.template))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

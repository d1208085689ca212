"""Real-model arithmetic: what KV and checkpoints cost for published hybrid models, from their configs.

`.venv/bin/python -m tests.benchmarks.model_arithmetic [--json FILE]`

No model is loaded and MLX is not imported: each model's cache layout is derived
from the relevant fields of its public Hugging Face `config.json` (copied below),
following how mlx-lm 0.32.2 builds the cache for that architecture:

- qwen3_next, qwen3_5, qwen3_5_moe (`models/qwen3_next.py`, `qwen3_5.py`): layer i
  is Gated DeltaNet when (i + 1) % full_attention_interval != 0 (mlx-lm reads the
  interval, not `layer_types`) and gets an `ArraysCache(2)`: the conv state
  (1, conv_kernel - 1, 2 * key_dim + value_dim) in the activations' dtype (bf16)
  and the recurrent state (1, Hv, Dv, Dk), which `gated_delta.py` creates and keeps
  in float32; the other layers get a `KVCache` (keys and values, kv_heads x head_dim, bf16).
- gemma3_text (`gemma3_text.py`): layer i is global (`KVCache`) when
  i % sliding_window_pattern == pattern - 1, else `RotatingKVCache(max_size=sliding_window)`.
- gpt_oss (`gpt_oss.py`): `KVCache` for "full_attention" in layer_types, else
  `RotatingKVCache(max_size=sliding_window)`.
- mamba2 (`mamba2.py`): every layer an `ArraysCache(2)`: the conv state
  (1, conv_kernel - 1, heads * head_dim + 2 * n_groups * state_size) in bf16 and the
  SSM state (1, heads, head_dim, state_size) in float32 (`ssm.py` computes it from
  the float32 dt).

A snapshot is what `worker.cache_adapters.ModelCacheOps.snapshot` copies at a
checkpoint: nothing of a `KVCache` (it rewinds), every array of an `ArraysCache`,
and a `RotatingKVCache`'s whole buffer. `layout_bytes` (what the engine budgets
with) counts a window as `max_size` tokens, and so does the buffer after a
one-token step (a prompt end, decoding); after a multi-token prefill chunk of S
tokens mlx-lm's `_update_concat` keeps max_size - 1 + S tokens, so a snapshot
taken mid-prefill holds that many. The arithmetic replays the step loop's
chunking (`worker.step_loop.StepLoop._prefill_one_chunk`) to count both.

Where to checkpoint comes from the code, not from copied numbers: the lattice
stride, `extra_budget` and the per-sequence snapshot cap from a real
`worker.pool.CheckpointPool` (with `worker.placement.SnapshotBudget`, as the engine
builds it), the positions from `worker.placement.place`, and the interval, lattice
cap and prefill step from the defaults of `worker.engine.EngineConfig`, read from
its source with `ast` (importing `worker.engine` would import MLX).

"K" is 1024 tokens throughout.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from protocol.messages import RestoreKind
from worker.placement import DEFAULT_CHECKPOINT_INTERVAL, LADDER_OFFSETS, MAX_EXTRA, MIN_EXTRA, SNAPSHOT_SHARE, place
from worker.memory_guard import CACHE_SHARE, default_cache_bytes
from worker.pool import CheckpointPool

K = 1024
GIB = 1024**3
MIB = 1024**2
CONVERSATION_TOKENS = 60 * K
AGENT_TOKENS = 8 * K
MAC_BYTES = 128 * GIB
# The worker's default memory limit on a Mac is Metal's recommended working set; on large Macs that
# is about 75% of the RAM (an assumption here: it is the device's figure, read at start-up).
WORKING_SET = 0.75
HINTS = 8  # the proxy sends the ends of the last 8 messages (proxy.chat: max_hints=8)
TURN_TOKENS = 640  # spacing of those message ends in the synthetic conversation
GENERATION_PROMPT = 3  # tokens after the last message end ("<|im_start|>assistant\n")
ACT_BYTES = 2  # bf16: KV, conv states, activations
STATE_BYTES = 4  # float32: Gated DeltaNet and Mamba-2 recurrent states, as mlx-lm keeps them
LOGIT_BYTES = 4  # the prompt end stores its logits as float32 (step_loop: astype(mx.float32))
QUANT_BITS = 4 + 2 * 16 / 64  # mlx-lm 4-bit, group 64: 4 bits + a bf16 scale and bias per 64 weights

# ------------------------------------------------------------------ the configs
#
# The relevant fields of each config.json, copied as published (only the fields
# the cache layout and the parameter count need). Where the file could not be
# read directly (gated, or no copy of the original in the stored corpus), the
# comment says where the values were read instead.

QWEN3_NEXT_80B = {
    # https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct/blob/main/config.json
    # (read from a verbatim copy of the original file in a public model report; the
    # report also counts 81,324,862,720 parameters in the safetensors, MTP head included)
    "architectures": ["Qwen3NextForCausalLM"],
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 512,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}

QWEN3_5_27B = {
    # https://huggingface.co/Qwen/Qwen3.5-27B/blob/main/config.json, "text_config"
    # (the stored corpus has no verbatim copy; these fields agree in three public
    # transcriptions of it: an architecture note "verified" against the file, a
    # serving check's expected fields and a loader test fixture)
    "model_type": "qwen3_5_text",
    "attn_output_gate": True,
    "full_attention_interval": 4,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 16,
    "head_dim": 256,
    "hidden_size": 5120,
    "intermediate_size": 17408,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 48,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "num_attention_heads": 24,
    "num_hidden_layers": 64,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "vocab_size": 248320,
}

QWEN3_5_35B_A3B = {
    # https://huggingface.co/Qwen/Qwen3.5-35B-A3B/blob/main/config.json, "text_config"
    # (read from the text_config as extracted into mlc-ai/pith-train
    # examples/pretrain_lm/qwen3.5-35b-a3b/config.json)
    "model_type": "qwen3_5_moe_text",
    "attn_output_gate": True,
    "full_attention_interval": 4,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 10,
    "head_dim": 256,
    "hidden_size": 2048,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "mamba_ssm_dtype": "float32",
    "max_position_embeddings": 262144,
    "moe_intermediate_size": 512,
    "num_attention_heads": 16,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "shared_expert_intermediate_size": 512,
    "vocab_size": 248320,
}

GEMMA3_27B = {
    # https://huggingface.co/google/gemma-3-27b-it/blob/main/config.json, "text_config"
    # (the repository is gated; read from public copies of the file: the unsloth mirror
    # as transcribed in several repos and a test fixture that copies its layout). No
    # vocab_size in the file: mlx-lm's gemma3.ModelArgs supplies 262208.
    "head_dim": 128,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "model_type": "gemma3_text",
    "num_attention_heads": 32,
    "num_hidden_layers": 62,
    "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
}
GEMMA3_VOCAB = 262208  # mlx_lm.models.gemma3.ModelArgs.vocab_size (it overrides text_config's)

GPT_OSS_120B = {
    # https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json
    # (read from a verbatim transcription in a public test suite)
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "head_dim": 64,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_local_experts": 128,
    "quantization_config": {"quant_method": "mxfp4"},
    "sliding_window": 128,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
}

MAMBA_CODESTRAL_7B = {
    # https://huggingface.co/mistralai/Mamba-Codestral-7B-v0.1/blob/main/config.json
    # (read from mlx-community/Mamba-Codestral-7B-v0.1-8bit's config.json: the same
    # fields plus its "quantization"; state-spaces/mamba2-2.7b ships a mamba_ssm config
    # that mlx-lm's mamba2 does not read)
    "architectures": ["Mamba2ForCausalLM"],
    "chunk_size": 256,
    "conv_kernel": 4,
    "expand": 2,
    "head_dim": 64,
    "hidden_size": 4096,
    "intermediate_size": 8192,
    "model_type": "mamba2",
    "n_groups": 8,
    "num_heads": 128,
    "num_hidden_layers": 64,
    "state_size": 128,
    "tie_word_embeddings": False,
    "time_step_rank": 256,
    "torch_dtype": "bfloat16",
    "use_bias": False,
    "use_conv_bias": True,
    "vocab_size": 32768,
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    arch: str  # the mlx-lm module that builds the cache
    config: dict
    card_params: str  # total parameters as the model card states them, for comparison
    vocab_size: int


MODELS = (
    ModelSpec("Qwen3-Next-80B-A3B", "Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen3_next", QWEN3_NEXT_80B, "80B", 151936),
    ModelSpec("Qwen3.5-27B", "Qwen/Qwen3.5-27B", "qwen3_5", QWEN3_5_27B, "27B", 248320),
    ModelSpec("Qwen3.5-35B-A3B", "Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe", QWEN3_5_35B_A3B, "35B", 248320),
    ModelSpec("gemma-3-27b-it", "google/gemma-3-27b-it", "gemma3_text", GEMMA3_27B, "27B", GEMMA3_VOCAB),
    ModelSpec("gpt-oss-120b", "openai/gpt-oss-120b", "gpt_oss", GPT_OSS_120B, "117B", 201088),
    ModelSpec("Mamba-Codestral-7B", "mistralai/Mamba-Codestral-7B-v0.1", "mamba2", MAMBA_CODESTRAL_7B, "7.3B", 32768),
)


# ------------------------------------------------------------------ cache layout, as mlx-lm builds it


@dataclass(frozen=True)
class Layer:
    kind: str  # the mlx-lm cache class: KVCache, RotatingKVCache or ArraysCache
    kv_per_token: int = 0  # KVCache / RotatingKVCache: bytes of keys + values per token
    window: int = 0  # RotatingKVCache: max_size
    state: int = 0  # ArraysCache: bytes of all its arrays (conv + recurrent state)


def _kv(c: dict) -> int:
    return 2 * c["num_key_value_heads"] * c["head_dim"] * ACT_BYTES


def _gated_delta(c: dict) -> Layer:
    key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    conv = (c["linear_conv_kernel_dim"] - 1) * (2 * key_dim + value_dim) * ACT_BYTES
    recurrent = c["linear_num_value_heads"] * c["linear_value_head_dim"] * c["linear_key_head_dim"] * STATE_BYTES
    return Layer("ArraysCache", state=conv + recurrent)


def cache_layers(spec: ModelSpec) -> list[Layer]:
    """One entry per layer, in the order of the model's make_cache()."""
    c = spec.config
    n = c["num_hidden_layers"]
    if spec.arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe"):
        c = {**c, "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]}
        return [
            _gated_delta(c) if (i + 1) % c["full_attention_interval"] != 0 else Layer("KVCache", _kv(c))
            for i in range(n)
        ]
    if spec.arch == "gemma3_text":
        pattern = c.get("sliding_window_pattern", 6)  # mlx-lm's default
        return [
            Layer("KVCache", _kv(c)) if i % pattern == pattern - 1
            else Layer("RotatingKVCache", _kv(c), window=c["sliding_window"])
            for i in range(n)
        ]
    if spec.arch == "gpt_oss":
        types = c.get("layer_types") or ["sliding_attention", "full_attention"] * (n // 2)
        return [
            Layer("KVCache", _kv(c)) if t == "full_attention"
            else Layer("RotatingKVCache", _kv(c), window=c["sliding_window"])
            for t in types
        ]
    if spec.arch == "mamba2":
        conv_dim = c["num_heads"] * c["head_dim"] + 2 * c["n_groups"] * c["state_size"]
        conv = (c["conv_kernel"] - 1) * conv_dim * ACT_BYTES
        ssm = c["num_heads"] * c["head_dim"] * c["state_size"] * STATE_BYTES
        return [Layer("ArraysCache", state=conv + ssm) for _ in range(n)]
    raise ValueError(f"no cache layout for {spec.arch}")


def layout_check(spec: ModelSpec, layers: list[Layer]) -> Optional[str]:
    """A note when the config's own layer_types disagree with the layout mlx-lm builds."""
    types = spec.config.get("layer_types")
    if not types or spec.arch == "gpt_oss":
        return None
    full = ["KVCache" if t == "full_attention" else "other" for t in types]
    built = ["KVCache" if layer.kind == "KVCache" else "other" for layer in layers]
    return None if full == built else "layer_types disagree with mlx-lm's full_attention_interval layout"


def rotating_buffer(buffer: int, offset: int, step: int, window: int) -> int:
    """Tokens a RotatingKVCache holds after a step of `step` tokens from `offset` (mlx-lm 0.32.2)."""
    if step > 1:  # _update_concat: trims to max_size - 1, then appends the whole step
        return step if buffer == 0 else min(buffer, window - 1) + step
    # _update_in_place: grows by 256-token steps up to max_size, trims anything beyond max_size
    if buffer == 0 or (offset >= buffer and buffer < window):
        buffer += min(256, window - offset)
    return min(buffer, window)


# ------------------------------------------------------------------ parameters and weights at 4 bits


def parameters(spec: ModelSpec) -> tuple[int, int]:
    """(matrix parameters, other parameters) of the weights mlx-lm loads (no vision tower, no MTP head).

    Matrices are what mlx-lm quantizes (Linear, Embedding, SwitchLinear); the
    rest (norms, biases, conv kernels, gates' small vectors) stays bf16.
    """
    c, arch = spec.config, spec.arch
    h, n, v = c["hidden_size"], c["num_hidden_layers"], spec.vocab_size
    tied = c.get("tie_word_embeddings", arch == "gemma3_text")
    if arch == "gemma3_text":
        tied = True  # the checkpoint has no lm_head; mlx-lm's sanitize ties them
    mat = v * h * (1 if tied else 2)
    other = h  # the final norm
    if arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe"):
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
        hk, dk = c["linear_num_key_heads"], c["linear_key_head_dim"]
        hv, dv = c["linear_num_value_heads"], c["linear_value_head_dim"]
        key_dim, value_dim = hk * dk, hv * dv
        conv_dim = 2 * key_dim + value_dim
        for i in range(n):
            other += 2 * h  # input / post-attention norms
            if (i + 1) % c["full_attention_interval"] != 0:
                # in_proj_qkvz (+ba) in qwen3_next, in_proj_qkv/z/b/a in qwen3_5: the same sizes
                mat += h * (conv_dim + value_dim) + h * 2 * hv + value_dim * h
                other += conv_dim * c["linear_conv_kernel_dim"] + 2 * hv + dv  # conv1d, dt_bias, A_log, norm
            else:
                mat += h * hq * hd * 2 + 2 * h * hkv * hd + hq * hd * h  # gated q, k, v, o
                other += 2 * hd  # q_norm, k_norm
            if c.get("num_experts", 0) > 0:
                e, mi, si = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
                mat += e * 3 * h * mi + 3 * h * si + h * e + h  # experts, shared expert, gate, shared gate
            else:
                mat += 3 * h * c["intermediate_size"]
        return mat, other
    if arch == "gemma3_text":
        hd, hq, hkv, i_ = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
        mat += n * (h * hq * hd + 2 * h * hkv * hd + hq * hd * h + 3 * h * i_)
        other += n * (4 * h + 2 * hd)
        return mat, other
    if arch == "gpt_oss":
        hd, hq, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        i_, e = c["intermediate_size"], c["num_local_experts"]
        mat += n * (h * hq * hd + 2 * h * hkv * hd + hq * hd * h + h * e + e * 3 * h * i_)
        other += n * (hq * hd + 2 * hkv * hd + h + hq + e + e * (2 * i_ + h) + 2 * h)  # biases, sinks, norms
        return mat, other
    if arch == "mamba2":
        inner = c["num_heads"] * c["head_dim"]
        conv_dim = inner + 2 * c["n_groups"] * c["state_size"]
        nh = c["num_heads"]
        mat += n * (h * (inner + conv_dim + nh) + inner * h)
        other += n * (conv_dim * c["conv_kernel"] + conv_dim * c["use_conv_bias"] + 3 * nh + inner + h)
        return mat, other
    raise ValueError(f"no parameter count for {arch}")


def weight_bytes_4bit(spec: ModelSpec) -> int:
    mat, other = parameters(spec)
    return int(mat * QUANT_BITS / 8 + other * ACT_BYTES)


# ------------------------------------------------------------------ the worker's defaults


def engine_defaults(path: Path = Path(__file__).resolve().parents[2] / "worker" / "engine.py") -> dict[str, int]:
    """`EngineConfig`'s field defaults, read from its source (importing worker.engine imports MLX)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineConfig":
            out = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    expr = ast.Expression(item.value)
                    out[item.target.id] = eval(compile(expr, str(path), "eval"), {"__builtins__": {}})  # literals only
            return out
    raise LookupError(f"no EngineConfig in {path}")


@dataclass(frozen=True)
class Defaults:
    checkpoint_interval: int
    max_lattice_points: int
    prefill_step: int
    memory_limit: int  # the worker's default on a 128 GB Mac (WORKING_SET of the RAM)

    @classmethod
    def from_code(cls) -> "Defaults":
        d = engine_defaults()
        return cls(DEFAULT_CHECKPOINT_INTERVAL, d["max_lattice_points"], d["prefill_step"], int(MAC_BYTES * WORKING_SET))


class _LayoutOnly:
    """The pool's ops, for the figures that need no cache: every model here needs snapshots."""

    needs_snapshots = True


def pool_for(defaults: Defaults, kv_per_token: int, snapshot_bytes: int) -> CheckpointPool:
    """A pool configured as the engine configures it (worker.engine.Engine.__init__)."""
    return CheckpointPool(
        _LayoutOnly(), 0, defaults.checkpoint_interval, defaults.max_lattice_points,
        snapshot_sizes=(kv_per_token, snapshot_bytes),
    )


# ------------------------------------------------------------------ one conversation


@dataclass
class Conversation:
    tokens: int
    lattice_stride: int
    lattice: int
    extra: int  # hints, fork point, ladder rungs: what the prompt adds beyond lattice and prompt end
    extra_budget: int
    snapshots: int  # lattice + extra + prompt end
    snapshot_cap: int  # most snapshots the pool lets one sequence keep (CheckpointPool.snapshot_cap)
    kv_bytes: int  # full-attention KV of the stored sequence
    live_state_bytes: int  # the stored sequence's own recurrent states and windows
    snapshot_bytes: int  # the snapshots as copied (mid-prefill windows included)
    snapshot_bytes_nominal: int  # the same count at layout_bytes' size
    logits_bytes: int
    total_bytes: int
    kinds: dict[str, int] = field(default_factory=dict)


def message_ends(n: int) -> list[int]:
    """The last HINTS message ends of a synthetic chat: the last one just before the generation prompt."""
    ends = (n - GENERATION_PROMPT - TURN_TOKENS * k for k in range(HINTS))
    return sorted(e for e in ends if e > 0)


def prefill_chunks(n: int, restore_point: int, stops: list[int], step: int) -> list[tuple[int, int]]:
    """The chunks worker.step_loop.StepLoop._prefill_one_chunk runs: <= step tokens, ending at each stop,
    the prompt's last token alone."""
    stops = sorted(p for p in stops if restore_point < p <= n)
    chunks, pos = [], restore_point
    while pos < n:
        end = min(n, pos + step, *[p for p in stops if p > pos][:1])
        if end == n and end - pos > 1:
            end = n - 1
        chunks.append((pos, end))
        pos = end
    return chunks


def conversation(n: int, layers: list[Layer], defaults: Defaults, vocab: int) -> Conversation:
    """A cold prefill of an n-token prompt (a whole conversation), with the default placement."""
    kv_pt = sum(layer.kv_per_token for layer in layers if layer.kind == "KVCache")
    nominal = snapshot_nominal(layers)
    pool = pool_for(defaults, kv_pt, nominal)
    stride = pool.lattice_stride(n)
    budget = pool.budget.extra(n)
    positions = place(n, 0, lattice_stride=stride, hints=message_ends(n), budget=budget).positions
    kinds: dict[str, int] = {}
    for kind in positions.values():
        kinds[kind.name] = kinds.get(kind.name, 0) + 1

    windows = sorted({layer.window for layer in layers if layer.kind == "RotatingKVCache"})
    buffers = {w: 0 for w in windows}
    state = sum(layer.state for layer in layers if layer.kind == "ArraysCache")
    copied = 0
    for start, end in prefill_chunks(n, 0, list(positions), defaults.prefill_step):
        buffers = {w: rotating_buffer(b, start, end - start, w) for w, b in buffers.items()}
        if end in positions:
            copied += state + sum(
                layer.kv_per_token * buffers[layer.window] for layer in layers if layer.kind == "RotatingKVCache"
            )
    lattice = kinds.get(RestoreKind.LATTICE.name, 0)
    ends = kinds.get(RestoreKind.PROMPT_END.name, 0)
    kv = kv_pt * n
    logits = vocab * LOGIT_BYTES
    return Conversation(
        tokens=n,
        lattice_stride=stride,
        lattice=lattice,
        extra=len(positions) - lattice - ends,
        extra_budget=budget,
        snapshots=len(positions),
        snapshot_cap=pool.snapshot_cap(n),
        kv_bytes=kv,
        live_state_bytes=nominal,  # after decoding, every window holds max_size tokens
        snapshot_bytes=copied,
        snapshot_bytes_nominal=nominal * len(positions),
        logits_bytes=logits,
        total_bytes=kv + nominal + copied + logits,
        kinds=kinds,
    )


def snapshot_nominal(layers: list[Layer]) -> int:
    """One model snapshot as worker.cache_adapters.measure_layout reports it (windows at max_size)."""
    return sum(
        layer.state if layer.kind == "ArraysCache" else layer.kv_per_token * layer.window
        for layer in layers
        if layer.kind != "KVCache"
    )


# ------------------------------------------------------------------ all figures


@dataclass
class ModelFigures:
    name: str
    hf_id: str
    arch: str
    layers_full: int
    layers_sliding: int
    layers_recurrent: int
    kv_bytes_per_1k: int
    snapshot_bytes: int  # layout_bytes' figure: recurrent states + windows at max_size
    snapshot_bytes_mid_prefill: int  # the same after a full prefill chunk (windows at max_size - 1 + prefill_step)
    snapshot_tokens_of_kv: Optional[float]
    params: int
    card_params: str
    weight_bytes_4bit: int
    cache_budget_bytes: int  # the worker's default --cache-bytes with these weights (memory_guard.default_cache_bytes)
    conversation_60k: Conversation
    conversations_60k_fit: int
    agent_8k: Conversation
    agents_8k_fit: int
    note: Optional[str] = None


def figures(spec: ModelSpec, defaults: Defaults) -> ModelFigures:
    layers = cache_layers(spec)
    kv_pt = sum(layer.kv_per_token for layer in layers if layer.kind == "KVCache")
    nominal = snapshot_nominal(layers)
    mid = sum(
        layer.state if layer.kind == "ArraysCache" else layer.kv_per_token * (layer.window - 1 + defaults.prefill_step)
        for layer in layers
        if layer.kind != "KVCache"
    )
    mat, other = parameters(spec)
    weights = weight_bytes_4bit(spec)
    budget = default_cache_bytes(defaults.memory_limit, weights)
    conv = conversation(CONVERSATION_TOKENS, layers, defaults, spec.vocab_size)
    agent = conversation(AGENT_TOKENS, layers, defaults, spec.vocab_size)
    return ModelFigures(
        name=spec.name,
        hf_id=spec.hf_id,
        arch=spec.arch,
        layers_full=sum(layer.kind == "KVCache" for layer in layers),
        layers_sliding=sum(layer.kind == "RotatingKVCache" for layer in layers),
        layers_recurrent=sum(layer.kind == "ArraysCache" for layer in layers),
        kv_bytes_per_1k=kv_pt * K,
        snapshot_bytes=nominal,
        snapshot_bytes_mid_prefill=mid,
        snapshot_tokens_of_kv=nominal / kv_pt if kv_pt else None,
        params=mat + other,
        card_params=spec.card_params,
        weight_bytes_4bit=weights,
        cache_budget_bytes=budget,
        conversation_60k=conv,
        conversations_60k_fit=max(0, budget) // conv.total_bytes,
        agent_8k=agent,
        agents_8k_fit=max(0, budget) // agent.total_bytes,
        note=layout_check(spec, layers),
    )


def compute(defaults: Optional[Defaults] = None) -> tuple[Defaults, list[ModelFigures]]:
    """The whole arithmetic: the defaults read from the code, and each model's figures."""
    defaults = defaults or Defaults.from_code()
    return defaults, [figures(spec, defaults) for spec in MODELS]


# ------------------------------------------------------------------ output


def _b(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def split(c: Conversation) -> str:
    """'total (lattice+hints+rungs+end)'; a fork point would count with the hints (none in a cold prompt)."""
    rungs = c.kinds.get(RestoreKind.TAIL.name, 0)
    return f"{c.snapshots} ({c.lattice}+{c.extra - rungs}+{rungs}+1)"


def table(defaults: Defaults, rows: list[ModelFigures]) -> str:
    lines = [
        f"defaults read from the code: checkpoint_interval {defaults.checkpoint_interval}, "
        f"max_lattice_points {defaults.max_lattice_points}, prefill_step {defaults.prefill_step}, "
        f"memory limit {_b(defaults.memory_limit)} ({WORKING_SET:.0%} of 128 GiB);",
        f"placement: {HINTS} message-end hints, a ladder {LADDER_OFFSETS[0]}..{LADDER_OFFSETS[-1]} tokens back "
        f"({len(LADDER_OFFSETS)} rungs), extras <= {SNAPSHOT_SHARE:.0%} of the prompt's KV and "
        f"{MIN_EXTRA}..{MAX_EXTRA} a prompt. K = 1024 tokens.",
        "",
        f"{'model':<20} {'layers full/slide/rec':>21} {'KV per 1K':>10} {'snapshot':>10} {'mid-prefill':>11} "
        f"{'= tok of KV':>11} {'params':>7} {'4-bit weights':>13} {'cache budget':>12}",
    ]
    for r in rows:
        tok = f"{r.snapshot_tokens_of_kv:,.0f}" if r.snapshot_tokens_of_kv is not None else "n/a"
        kinds = f"{r.layers_full}/{r.layers_sliding}/{r.layers_recurrent}"
        lines.append(
            f"{r.name:<20} {kinds:>21} {_b(r.kv_bytes_per_1k):>10} "
            f"{_b(r.snapshot_bytes):>10} {_b(r.snapshot_bytes_mid_prefill):>11} {tok:>11} "
            f"{r.params / 1e9:>6.1f}B {_b(r.weight_bytes_4bit):>13} {_b(r.cache_budget_bytes):>12}"
        )
    lines += [
        "",
        f"{'model':<20} {'60K: stride':>11} {'snaps (lat+hint+rung+end)':>25} {'cap':>4} {'KV':>10} {'snapshots':>10} "
        f"{'total':>10} {'fit':>4} | {'8K: snaps':>9} {'total':>10} {'fit':>5}",
    ]
    for r in rows:
        c, a = r.conversation_60k, r.agent_8k
        lines.append(
            f"{r.name:<20} {c.lattice_stride:>11} {split(c):>25} {c.snapshot_cap:>4} "
            f"{_b(c.kv_bytes):>10} {_b(c.snapshot_bytes):>10} {_b(c.total_bytes):>10} {r.conversations_60k_fit:>4} "
            f"| {a.snapshots:>9} {_b(a.total_bytes):>10} {r.agents_8k_fit:>5}"
        )
    lines += [
        "",
        "snapshot: what one checkpoint copies (layout_bytes: windows at their size); mid-prefill: the same after",
        f"a {defaults.prefill_step}-token prefill chunk (windows at size - 1 + chunk). cache budget: the worker's "
        f"default --cache-bytes, {CACHE_SHARE:.0%} of the memory limit less the weights.",
        "total: KV + the sequence's own states and windows + its snapshots as copied + the prompt end's logits.",
        "fit: conversations in the cache budget.",
        "rung: a ladder rung (RestoreKind.TAIL). cap: CheckpointPool.snapshot_cap, the most snapshots the pool",
        "keeps on one sequence (earlier turns' hints stay until it).",
    ]
    lines += [f"note: {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    defaults, rows = compute()
    print(table(defaults, rows))
    if args.json:
        out: dict[str, Any] = {
            "defaults": asdict(defaults),
            "assumptions": {
                "tokens_per_k": K,
                "conversation_tokens": CONVERSATION_TOKENS,
                "agent_tokens": AGENT_TOKENS,
                "mac_bytes": MAC_BYTES,
                "working_set_share": WORKING_SET,
                "message_end_hints": HINTS,
                "kv_and_conv_bytes": ACT_BYTES,
                "recurrent_state_bytes": STATE_BYTES,
                "quantized_bits_per_weight": QUANT_BITS,
            },
            "models": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

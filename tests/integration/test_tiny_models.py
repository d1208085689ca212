"""The tiny model factory writes real mlx-lm models.

Every architecture is loaded with `mlx_lm.load`, checked for the cache kinds
the proxy has to handle, and run. Models are built once per session.

Run this file directly to print the 1K-token prefill time per architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from worker import tiny_models  # noqa: E402
from worker.tiny_models import ARCHITECTURES, TEMPLATES, main, make_model  # noqa: E402

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

KV, ROT, ARR = "KVCache", "RotatingKVCache", "ArraysCache"
HYBRID = "CacheList(ArraysCache,KVCache)"
EXPECTED_CACHES = {
    "llama": [KV] * 4,
    "qwen3_next": [ARR, ARR, ARR, KV],
    "qwen3_5": [ARR, ARR, ARR, KV],
    "gemma3_text": [ROT, KV, ROT, KV],
    "gpt_oss": [ROT, KV, ROT, KV],
    "mamba2": [ARR] * 4,
    "falcon_h1": [HYBRID] * 4,
    "lfm2": [ARR, KV, ARR, KV],
}

UNICODE_TEXTS = [
    "Hello, world! 123",
    "naïve café in Zürich — 10 €",
    "日本語のテキストと emoji 😀🚀",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    'def f(x):\n    return {"k": [1, 2.5, None]}',
    "<think>not a tag</thinker> <|im_start|",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Report it."},
    {"role": "user", "content": [{"type": "text", "text": "And in Rome?"}]},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Call again.",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
    },
    {"role": "tool", "content": "rainy"},
]


# --------------------------------------------------------------------------
# Fixtures: build every model once, load lazily once.
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def model_dirs(model_root) -> dict[str, Path]:
    return {arch: make_model(arch, model_root / arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def template_dirs(model_root) -> dict[str, Path]:
    return {
        t: make_model("llama", model_root / f"llama-{t}", seed=0, template=t)
        for t in TEMPLATES
    }


@pytest.fixture(scope="session")
def loaded(model_dirs):
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load(str(model_dirs[arch]))
        return cache[arch]

    return get


def cache_kind(cache) -> str:
    name = type(cache).__name__
    if hasattr(cache, "caches"):
        name += "(" + ",".join(type(c).__name__ for c in cache.caches) + ")"
    return name


def chat_prompt(tokenizer, text: str = "Hello there, what is the weather like?"):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def file_digests(directory: Path) -> dict[str, str]:
    return {f: hashlib.sha256((directory / f).read_bytes()).hexdigest() for f in FILES}


# --------------------------------------------------------------------------
# Every architecture
# --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_load_keeps_saved_weights(arch, model_dirs, loaded):
    model, tokenizer = loaded(arch)
    saved = mx.load(str(model_dirs[arch] / "model.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    # sanitize() must neither rename nor transform the factory's weights.
    assert sorted(params) == sorted(saved)
    for name, value in saved.items():
        assert value.dtype == mx.float32, name
        assert mx.array_equal(params[name], value), name
    config = json.loads((model_dirs[arch] / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["vocab_size"] == len(tokenizer)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_make_cache_has_expected_kinds(arch, loaded):
    model, _ = loaded(arch)
    assert [cache_kind(c) for c in model.make_cache()] == EXPECTED_CACHES[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_is_varied_and_finite(arch, loaded):
    model, tokenizer = loaded(arch)
    prompt = mx.array(chat_prompt(tokenizer))
    assert mx.all(mx.isfinite(model(prompt[None]))).item()
    steps = zip(range(24), generate_step(prompt, model, max_tokens=24))
    tokens, logprobs = zip(*(step for _, step in steps))
    assert len({int(t) for t in tokens}) >= 4
    assert all(mx.all(mx.isfinite(lp)).item() for lp in logprobs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_with_cache_matches_full_forward(arch, loaded):
    # ~100 tokens: crosses the 32-token sliding windows of gemma3/gpt_oss.
    model, _ = loaded(arch)
    tokens = mx.array([[(7 * i + 3) % 900 + 20 for i in range(100)]])
    full = model(tokens)[0, -1]
    cache = model.make_cache()
    for start in range(0, 100, 37):
        chunked = model(tokens[:, start : start + 37], cache=cache)[0, -1]
    assert mx.allclose(full, chunked, atol=1e-3).item()
    # The first token still matters at the end, so a wrong cache would show.
    changed = model(mx.concatenate([mx.array([[5]]), tokens[:, 1:]], axis=1))[0, -1]
    assert mx.abs(changed - full).max().item() > 1e-3


@pytest.mark.parametrize("arch", ["qwen3_next", "falcon_h1"])
def test_stream_generate_yields_text(arch, loaded):
    model, tokenizer = loaded(arch)
    responses = list(stream_generate(model, tokenizer, chat_prompt(tokenizer), max_tokens=8))
    assert 1 <= len(responses) <= 8
    assert responses[-1].generation_tokens == len(responses)
    assert isinstance("".join(r.text for r in responses), str)


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_gives_identical_files(arch, model_dirs, tmp_path):
    again = make_model(arch, tmp_path / arch, seed=0)
    assert file_digests(again) == file_digests(model_dirs[arch])


def test_different_seed_changes_only_the_weights(model_dirs, tmp_path):
    other = file_digests(make_model("qwen3_next", tmp_path / "s1", seed=1))
    base = file_digests(model_dirs["qwen3_next"])
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {f: d for f, d in other.items() if f != "model.safetensors"} == {
        f: d for f, d in base.items() if f != "model.safetensors"
    }


def test_tokenizer_training_is_identical_across_processes():
    # Hash seeds and thread counts differ between processes; the vocab must not.
    script = (
        "import hashlib; from worker.tiny_models import train_tokenizer; "
        "print(hashlib.sha256(train_tokenizer().to_str().encode()).hexdigest())"
    )
    digests = set()
    for hash_seed, threads in (("1", "1"), ("2", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": threads}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    digests.add(hashlib.sha256(tiny_models.train_tokenizer().to_str().encode()).hexdigest())
    assert len(digests) == 1


# --------------------------------------------------------------------------
# Tokenizer and chat templates
# --------------------------------------------------------------------------


def test_tokenizer_round_trips_unicode(loaded):
    _, tokenizer = loaded("llama")
    assert tokenizer.unk_token_id is None
    for text in UNICODE_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert 900 <= len(tokenizer) <= 1100


def test_control_and_markup_tokens_are_single_tokens(loaded):
    _, tokenizer = loaded("llama")
    for token in tiny_models.CONTROL_TOKENS + tiny_models.MARKUP_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # Markup stays in decoded text so the reasoning/tool parsers can see it.
    ids = tokenizer.encode("<think>x</think>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_plain_chatml_renders_messages(arch, loaded):
    _, tokenizer = loaded(arch)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == text
    assert not tokenizer.has_tool_calling


def test_tools_template_is_detected_by_mlx_lm(template_dirs):
    _, tokenizer = load(str(template_dirs["chatml-tools"]))
    assert tokenizer.has_tool_calling
    assert tokenizer.has_thinking
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert tokenizer.init_kwargs["tool_parser_type"] == "json_tools"
    call = tokenizer.tool_parser('\n{"name": "f", "arguments": {"a": 1}}\n')
    assert call == {"name": "f", "arguments": {"a": 1}}


def test_tools_template_renders_tools_calls_and_reasoning(template_dirs):
    _, tokenizer = load(str(template_dirs["chatml-tools"]))
    text = tokenizer.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n" in text
    # Every turn's reasoning is kept.
    for reasoning in ("I should call the tool.", "Report it.", "Call again."):
        assert f"<think>\n{reasoning}\n</think>\n\n" in text
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_enable_thinking_false_closes_an_empty_think_block(template_dirs):
    _, tokenizer = load(str(template_dirs["chatml-tools"]))
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    on = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")


def test_drop_reasoning_keeps_only_reasoning_after_last_user_turn(template_dirs):
    _, tokenizer = load(str(template_dirs["chatml-drop-reasoning"]))
    assert tokenizer.has_tool_calling
    text = tokenizer.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert "I should call the tool." not in text
    assert "Report it." not in text
    assert "<think>\nCall again.\n</think>\n\n" in text
    assert "<|im_start|>assistant\nIt is sunny.<|im_end|>" in text


# --------------------------------------------------------------------------
# CLI and the default model
# --------------------------------------------------------------------------


def test_cli_writes_a_loadable_directory(tmp_path, capsys):
    from proxy.cli import main as cli_main

    out = tmp_path / "cli-model"
    args = ["--arch", "mamba2", "--out", str(out), "--seed", "3", "--template", "chatml-tools"]
    assert cli_main(["make-model", *args]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model, tokenizer = load(str(out))
    assert tokenizer.has_tool_calling
    assert mx.all(mx.isfinite(model(mx.array([[1, 2, 3]])))).item()
    assert main(args) == 0  # the module's own entry point, same output
    assert capsys.readouterr().out.strip() == str(out)


def test_cli_rejects_unknown_arch(capsys):
    with pytest.raises(SystemExit):
        main(["--arch", "gpt2", "--out", "x"])


def test_default_model_dir_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CACHE_PROXY_HOME", str(tmp_path))
    first = tiny_models.default_model_dir()
    assert first == tiny_models.default_model_path()
    assert first.is_relative_to(tmp_path)
    assert all(part in first.name for part in ("qwen3_next", "seed0", "chatml-tools"))
    assert f"v{tiny_models.FACTORY_VERSION}" in first.name
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "qwen3_next"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_models.default_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_default_model_dir_survives_losing_the_race(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CACHE_PROXY_HOME", str(tmp_path))
    real_make_model = tiny_models.make_model

    def make_while_another_process_wins(arch, out_dir, seed, template):
        real_make_model(arch, out_dir, seed, template)
        winner = tiny_models.default_model_path()
        real_make_model(arch, winner, seed, template)
        (winner / "from-the-winner").touch()

    monkeypatch.setattr(tiny_models, "make_model", make_while_another_process_wins)
    target = tiny_models.default_model_dir()
    assert (target / "from-the-winner").exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_default_model_dir_uses_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_CACHE_PROXY_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tiny_models.cache_home() == tmp_path / "mlx-cache-proxy"


# --------------------------------------------------------------------------
# Speed report (not a test): python tests/integration/test_tiny_models.py
# --------------------------------------------------------------------------


def prefill_seconds(model, n_tokens: int = 1024, repeats: int = 3) -> float:
    tokens = mx.array([[(13 * i + 1) % 900 + 20 for i in range(n_tokens)]])
    mx.eval(model(tokens[:, :16], cache=model.make_cache()))  # warm up
    best = float("inf")
    for _ in range(repeats):
        cache = model.make_cache()
        start = time.perf_counter()
        mx.eval(model(tokens, cache=cache))
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        for arch in ARCHITECTURES:
            model, _ = load(str(make_model(arch, Path(root) / arch)))
            params = sum(v.size for _, v in tree_flatten(model.parameters()))
            ms = prefill_seconds(model) * 1000
            print(f"{arch:12s} {params / 1e3:6.0f}K params  1K-token prefill {ms:7.1f} ms")


def test_harmony_template_renders_channels_tools_and_calls(template_dirs):
    _, tokenizer = load(str(template_dirs["harmony"]))
    text = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "<|start|>developer<|message|># Instructions\n\nYou are helpful.\n\n# Tools\n\n## functions" in text
    assert "type get_weather = (_: " in text
    assert "<|start|>user<|message|>Weather in Paris?<|end|>" in text
    # A past final answer, and the call after the last user turn with its reasoning (earlier reasoning dropped).
    assert "<|start|>assistant<|channel|>final<|message|>It is sunny.<|end|>" in text
    assert "Report it." not in text and "I should call the tool." not in text
    assert "<|start|>assistant<|channel|>analysis<|message|>Call again.<|end|>" in text
    assert '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Rome"}<|call|>' in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>rainy<|end|>" in text
    assert text.endswith("<|start|>assistant")
    # The markup is special tokens; a reply ends at <|return|> or <|call|>.
    added = {str(t): i for i, t in tokenizer.added_tokens_decoder.items()}
    for name in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"):
        assert tokenizer.encode(name, add_special_tokens=False) == [added[name]]
    assert {added["<|return|>"], added["<|call|>"]} <= set(tokenizer.eos_token_ids)

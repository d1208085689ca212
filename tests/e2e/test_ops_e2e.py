"""Operations, with the service as a real process: a port in use, a directory that is not a model,
--version, model aliases and the default model (openai and anthropic clients), /tokenize, metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import anthropic
import openai
import pytest

from tests.e2e.conftest import REPO, Server, post, proxy_argv, running_proxy

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <|im_end|> hello."}]


def serve(*argv: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "proxy.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    return done, time.monotonic() - started


def test_a_port_in_use_exits_at_once_with_one_line_and_code_3(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done, elapsed = serve(*proxy_argv(tiny_model, port)[3:])
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        f"mlx-cache-proxy serve: port {port} is in use on 127.0.0.1 (another server, or an instance still "
        "stopping); stop it or choose another --port"
    ]
    assert "starting worker" not in done.stderr + done.stdout  # nothing was loaded
    assert elapsed < 1.0 + 1.0  # under a second here; the slack is for this machine's shared cores


def test_a_directory_that_is_not_a_model_is_one_line(tmp_path, free_port_number):
    (tmp_path / "config.json").write_text("{}")
    done, _ = serve("serve", "--model", str(tmp_path), "--port", str(free_port_number))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mlx-cache-proxy serve: {str(tmp_path)!r} is not a model directory: it lacks weights "
        "(model*.safetensors) and a tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
    ]


def test_out_of_range_options_and_version():
    done, _ = serve("serve", "--port", "70000")
    assert done.returncode == 2 and "must be at most 65535" in done.stderr
    for argv in (["--version"], ["serve", "--version"]):
        done, _ = serve(*argv)
        assert done.returncode == 0 and done.stdout.startswith("mlx-cache-proxy ") and "mlx-lm " in done.stdout


@pytest.fixture
def free_port_number() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- names, /tokenize, metrics


@pytest.fixture(scope="module")
def aliased(tiny_model, log_dir) -> Iterator[Server]:
    with running_proxy(tiny_model, log_dir, "--alias", "claude-*=" + str(tiny_model), "--alias",
                       "gpt-4o=" + str(tiny_model), name="aliased") as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def defaulted(tiny_model, log_dir) -> Iterator[Server]:
    with running_proxy(tiny_model, log_dir, "--default-model", str(tiny_model), name="defaulted") as server:
        yield server


def test_aliases_serve_both_apis_and_unknown_names_stay_404(aliased, tiny_model):
    chat = openai.OpenAI(base_url=aliased.base_url, api_key="x", max_retries=0)
    reply = chat.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=3, temperature=0)
    assert reply.model == "gpt-4o" and reply.usage.completion_tokens >= 1
    messages = anthropic.Anthropic(base_url=aliased.root, api_key="x", max_retries=0)
    message = messages.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert message.model == "claude-sonnet-4-5-20250929" and message.usage.output_tokens >= 1
    listed = [m.id for m in chat.models.list().data]
    assert listed == [str(tiny_model), "gpt-4o"]
    with pytest.raises(openai.NotFoundError):
        chat.chat.completions.create(model="gpt-5", messages=CHAT, max_tokens=3)
    with pytest.raises(anthropic.NotFoundError):
        messages.messages.create(model="not-claude", max_tokens=3, messages=[{"role": "user", "content": "hi"}])


def test_the_default_model_serves_unknown_names(defaulted):
    chat = openai.OpenAI(base_url=defaulted.base_url, api_key="x", max_retries=0)
    reply = chat.chat.completions.create(model="any-name-at-all", messages=CHAT, max_tokens=2, temperature=0)
    assert reply.model == "any-name-at-all"
    messages = anthropic.Anthropic(base_url=defaulted.root, api_key="x", max_retries=0)
    message = messages.messages.create(model="claude-opus-4-1", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert message.usage.output_tokens >= 1


def test_tokenize_counts_what_a_chat_request_is_charged(aliased):
    chat = openai.OpenAI(base_url=aliased.base_url, api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    reply = chat.chat.completions.create(model="gpt-4o", messages=CHAT, tools=tools, max_tokens=2, temperature=0)
    for path in ("/tokenize", "/v1/tokenize"):
        status, body = post(aliased, path, _json({"model": "claude-x", "messages": CHAT, "tools": tools}))
        assert status == 200 and body["count"] == reply.usage.prompt_tokens == len(body["tokens"])
        assert body["max_model_len"] > 0
    status, text = post(aliased, "/detokenize", _json({"tokens": body["tokens"]}))
    assert status == 200 and "Say <|im_end|> hello." in text["prompt"] and text["content"] == text["prompt"]
    status, pieces = post(aliased, "/tokenize", _json({"content": "Hello", "with_pieces": True}))
    assert status == 200 and "".join(p["piece"] for p in pieces["tokens"]) == "Hello"


def test_metrics_have_build_info_process_figures_and_time_per_output_token(aliased):
    chat = openai.OpenAI(base_url=aliased.base_url, api_key="x", max_retries=0)
    chat.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4, temperature=0)
    with urllib.request.urlopen(f"{aliased.root}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'mlx_cache_proxy_build_info{mlx="' in text and 'version="' in text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "mlx_cache_proxy_time_per_output_token_seconds_bucket"):
        assert f"\n{name}" in text, name


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_a_chosen_model_path_is_not_needed_for_the_port_check(tmp_path):
    """The port is checked before the model is even resolved: a missing model is not what is reported."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done, _ = serve("serve", "--model", str(Path(tmp_path) / "absent"), "--port", str(taken.getsockname()[1]))
    assert done.returncode == 3 and "is in use" in done.stderr

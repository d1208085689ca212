"""A conversation survives a service restart: its next turn restores from the disk tier."""

from __future__ import annotations

import time

import openai

from tests.e2e.conftest import running_proxy


def streamed(client, model, messages):
    """(reply text, cached tokens, seconds to the first content)."""
    start = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(text), usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens, (first or time.perf_counter()) - start


def test_the_next_turn_after_a_restart_is_cached_and_equals_a_cold_run(tiny_model, log_dir, tmp_path):
    model = str(tiny_model)
    disk = ["--cache-dir", str(tmp_path / "disk")]
    history = [{"role": "system", "content": "You answer in one line. " * 30}, {"role": "user", "content": "Tell me about rivers. " * 20}]
    with running_proxy(tiny_model, log_dir, *disk, name="before-restart") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        reply, _, first_prompt, _ = streamed(client, model, history)
    # running_proxy stopped it with SIGTERM: the pool went to disk.
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And about lakes?"}]

    with running_proxy(tiny_model, log_dir, *disk, name="after-restart") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        warm_text, cached, prompt, warm_ttft = streamed(client, model, history)
    with running_proxy(tiny_model, log_dir, "--no-cache", name="cold-after-restart") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        cold_text, cold_cached, _, cold_ttft = streamed(client, model, history)

    assert cached >= first_prompt  # the whole first turn's prompt came back from disk
    assert cold_cached == 0
    assert warm_text == cold_text
    print(f"\nafter restart: {cached}/{prompt} prompt tokens from disk; TTFT {warm_ttft * 1000:.0f} ms "
          f"vs cold {cold_ttft * 1000:.0f} ms")  # fmt: skip

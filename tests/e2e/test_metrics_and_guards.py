"""/metrics after a cached conversation, and the guards that refuse before queueing."""

from __future__ import annotations

import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import running_proxy


def scrape(server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{server.root}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_count_what_a_cached_conversation_did(tiny_model, log_dir):
    with running_proxy(tiny_model, log_dir, name="metrics") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        model = str(tiny_model)
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
        cached_reported = 0
        turns = 3
        for turn in range(turns):
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
            cached_reported += reply.usage.prompt_tokens_details.cached_tokens
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": f"And number {turn + 2}?"}]  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, messages=messages, max_tokens=10**6)

        samples = scrape(server)
        assert value(samples, "mlx_cache_proxy_cache_lookups_total", model=model) == turns
        assert total(samples, "mlx_cache_proxy_cache_hits_total", model=model) == turns - 1
        assert value(samples, "mlx_cache_proxy_cached_tokens_total", model=model) == cached_reported > 0
        assert value(samples, "mlx_cache_proxy_time_to_first_token_seconds_count", model=model) == turns
        assert value(samples, "mlx_cache_proxy_request_duration_seconds_count", model=model) == turns
        assert value(samples, "mlx_cache_proxy_queue_wait_seconds_count", model=model) == turns
        assert total(samples, "mlx_cache_proxy_requests_total", model=model, status="200") == turns
        assert value(samples, "mlx_cache_proxy_guard_rejections_total", model=model,
                     reason="context_length_exceeded") == 1  # fmt: skip
        assert total(samples, "mlx_cache_proxy_requests_total", model=model, status="400") == 1
        assert total(samples, "mlx_cache_proxy_pool_bytes", model=model) > 0  # per replica (one here)
        assert total(samples, "mlx_cache_proxy_mlx_active_memory_bytes", model=model) > 0
        assert value(samples, "mlx_cache_proxy_generated_tokens_total", model=model) > 0


def test_an_over_limit_request_is_refused_naming_both_numbers(tiny_model, log_dir):
    with running_proxy(tiny_model, log_dir, "--max-kv-size", "200", name="maxkv") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        messages = [{"role": "user", "content": "fox " * 40}]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=190)
        error = caught.value.body
        assert error["code"] == "context_length_exceeded"
        prompt = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=1).usage.prompt_tokens
        assert str(prompt) in error["message"] and "190" in error["message"] and "200" in error["message"]
        # Without max_tokens the reply is fitted to the room left, never past the limit.
        reply = client.chat.completions.create(model=str(tiny_model), messages=messages)
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 200
        assert reply.choices[0].finish_reason == "length"


def test_a_low_memory_budget_refuses_long_prompts_and_serves_short_ones(tiny_model, log_dir):
    with running_proxy(tiny_model, log_dir, "--memory-limit", "4M", "--prefill-step", "64", name="mem") as server:
        # The SDK retries a 503 twice by default; one attempt keeps the count exact.
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        model = str(tiny_model)
        short = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert short.usage.completion_tokens > 0
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "fox " * 3000}], max_tokens=4)
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "insufficient_memory"
        again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert again.choices[0].message.content == short.choices[0].message.content
        samples = scrape(server)
        assert value(samples, "mlx_cache_proxy_guard_rejections_total", model=model, reason="insufficient_memory") == 1

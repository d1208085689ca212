"""Through the real service: a prompt never restores from another cache namespace.

Namespaces are per API key when keys are set, split further by `cache_salt`,
on both APIs, in memory and on disk (after a restart). Each check is paired
with its positive: the same client does restore, so a 0 means isolation, not
a cache that is off.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.e2e.conftest import running_proxy

pytestmark = pytest.mark.slow

KEYS = ("key-one-0123456789", "key-two-0123456789")
SECRET = [
    {"role": "system", "content": "The launch code is 7781. " + "Never reveal the launch code to anyone. " * 30},
    {"role": "user", "content": "What can you tell me?"},
]


def _openai(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def _cached(server, key: str, messages=SECRET, **extra) -> int:
    client = _openai(server, key)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0, **extra)
    return reply.usage.prompt_tokens_details.cached_tokens


def test_keys_and_salts_are_namespaces(tiny_model, log_dir, tmp_path):
    args = ("--api-key", KEYS[0], "--api-key", KEYS[1], "--cache-dir", str(tmp_path / "disk"))
    with running_proxy(tiny_model, log_dir, *args, name="namespaces") as server:
        assert _cached(server, KEYS[0]) == 0
        assert _cached(server, KEYS[1]) == 0  # the other key's copy is not reachable
        assert _cached(server, KEYS[0]) > 0  # while its own is
        assert _cached(server, KEYS[0], extra_body={"cache_salt": "tenant-a"}) == 0
        assert _cached(server, KEYS[0], extra_body={"cache_salt": "tenant-a"}) > 0
        assert _cached(server, KEYS[0], extra_body={"cache_salt": "tenant-b"}) == 0

        messages = anthropic.Anthropic(base_url=server.root, api_key=KEYS[1], max_retries=0, timeout=60).messages
        model = _openai(server, KEYS[1]).models.list().data[0].id
        system, user = SECRET[0]["content"], SECRET[1:]

        def read(salt: str) -> int:
            reply = messages.create(
                model=model, system=system, messages=user, max_tokens=2, extra_body={"cache_salt": salt}
            )
            return reply.usage.cache_read_input_tokens

        assert read("tenant-a") == 0  # key one's tenant-a is not key two's
        assert read("tenant-a") > 0

    # The disk tier keeps the namespace: after a restart each key finds its own, and only its own.
    with running_proxy(tiny_model, log_dir, *args, name="namespaces-restarted") as server:
        assert _cached(server, KEYS[0], extra_body={"cache_salt": "tenant-b"}) > 0
        assert _cached(server, KEYS[1], extra_body={"cache_salt": "tenant-b"}) == 0
        assert _cached(server, KEYS[1]) > 0


def test_a_bad_cache_salt_is_a_400(proxy):
    client = _openai(proxy, "x")
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.chat.completions.create(
            model=model, messages=SECRET, max_tokens=1, extra_body={"cache_salt": 12}
        )

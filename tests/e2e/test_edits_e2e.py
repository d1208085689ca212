"""Divergences far from a message end, through the `openai` client: an edited long message, a document re-asked.

The proxy's split points (line and paragraph starts, the last sentences) and the
worker's ladder back from each prompt's end must let a regenerated edit of a long
message restore close to where it diverges, and a fresh chat re-asking a document
restore at the question; the replies must be what a cold service says.
"""

from __future__ import annotations

import openai
import pytest

from proxy.chat import ChatTokenizer
from tests.benchmarks.workloads import Prose
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def paragraphs(prose: Prose, n: int, words: int) -> list[str]:
    return [prose.text(words) for _ in range(n)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def ask(server: Server, messages: list[dict]) -> tuple[str, int]:
    c = client(server)
    model = c.models.list().data[0].id
    reply = c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> ChatTokenizer:
    return ChatTokenizer.load(tiny_model)


def test_an_edit_near_the_end_of_a_long_message_restores_near_the_edit(proxy, nocache_proxy, tokenizer):
    prose = Prose(41)
    system = {"role": "system", "content": "You edit notes."}
    parts = paragraphs(prose, 8, 60)
    message = "\n\n".join(parts)
    first = [system, {"role": "user", "content": message}]
    ask(proxy, first)
    for back in (0.08, 0.22, 0.37):  # the edit sits this share of the message before its end
        words = message.split(" ")
        at = int(len(words) * (1 - back))
        edited = " ".join(words[:at] + prose.words(3) + words[at + 3:])
        messages = [system, {"role": "user", "content": edited}]
        oracle = common_prefix(tokenizer.render_chat(first).tokens, tokenizer.render_chat(messages).tokens)
        warm, cached = ask(proxy, messages)
        cold, _ = ask(nocache_proxy, messages)
        assert warm == cold
        assert cached >= 0.9 * oracle and oracle - cached <= 100, (back, cached, oracle)
        assert cached <= oracle


def test_a_document_re_asked_in_a_fresh_chat_restores_at_the_question(proxy, nocache_proxy, tokenizer):
    prose = Prose(42)
    document = "\n\n".join(paragraphs(prose, 6, 50))
    system = {"role": "system", "content": "Answer from the document only."}
    prompts = []
    for q in range(3):
        messages = [system, {"role": "user", "content": f"{document}\n\nQuestion {q}: {prose.text(10)}"}]
        oracle = max((common_prefix(p, tokenizer.render_chat(messages).tokens) for p in prompts), default=0)
        warm, cached = ask(proxy, messages)
        cold, _ = ask(nocache_proxy, messages)
        assert warm == cold
        if q > 0:  # the first re-ask already restores at the paragraph start before the question
            assert oracle - 8 <= cached <= oracle, (q, cached, oracle)
        prompts.append(tokenizer.render_chat(messages).tokens)

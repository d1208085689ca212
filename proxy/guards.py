"""Checks a request must pass before it is queued: context length and memory.

Both answer before any worker time is spent and before a stream opens, so the
client gets a plain HTTP error with a message naming the numbers. The worker
checks again when the request runs (its pool may have changed meanwhile).
"""

from __future__ import annotations

from typing import Optional

from protocol.messages import Hello, Stats
from proxy.errors import ContextLengthExceeded, InsufficientMemory
from worker.memory_guard import estimate_need, mib


def check_context(prompt_tokens: int, max_tokens: int, hello: Optional[Hello], max_tokens_given: bool) -> int:
    """The max_tokens to run with; raises ContextLengthExceeded when the request cannot fit.

    An explicit max_tokens that does not fit is an error; a defaulted one is cut
    to the room left, since the client asked for nothing in particular.
    """
    limit = hello.context_limit if hello is not None else 0
    if not limit:
        return max_tokens
    if prompt_tokens >= limit:
        raise ContextLengthExceeded(
            f"the prompt has {prompt_tokens} tokens, which leaves no room in this model's context "
            f"limit of {limit} tokens",
            param="messages",
        )
    if prompt_tokens + max_tokens > limit:
        if not max_tokens_given:
            return limit - prompt_tokens
        raise ContextLengthExceeded(
            f"the prompt has {prompt_tokens} tokens and max_tokens asks for {max_tokens}: "
            f"{prompt_tokens + max_tokens} tokens exceed this model's context limit of {limit} tokens",
            param="max_tokens",
        )
    return max_tokens


def check_text_size(chars: int, max_token_chars: int, limit: int, param: str = "messages") -> None:
    """Refuse, before tokenizing, text that cannot fit a context of `limit` tokens whatever its tokens.

    No token stands for more than `max_token_chars` characters, so `chars`
    characters are at least chars / max_token_chars tokens: a cheap lower
    bound that spares the tokenizer (seconds per megabyte) a prompt that can only be refused.
    """
    if not limit or max_token_chars <= 0:
        return
    at_least = chars // max_token_chars
    if at_least >= limit:
        raise ContextLengthExceeded(
            f"the request holds {chars} characters of text: at least {at_least} tokens (no token of this model "
            f"stands for more than {max_token_chars} characters), beyond this model's context limit of {limit} tokens",
            param=param,
        )


def check_memory(prompt_tokens: int, max_tokens: int, hello: Optional[Hello], stats: Optional[Stats]) -> None:
    """Refuse a request that cannot fit in the worker's memory even with its pool emptied."""
    if hello is None or not hello.memory_limit:
        return
    memory = stats.memory if stats is not None else hello.memory
    pool = stats.pool.bytes if stats is not None else 0
    fixed = max(0, memory.active - pool)  # weights and the like: what eviction cannot give back
    # The worst case: nothing restored, so the whole prompt is computed.
    need = estimate_need(
        hello.layout,
        tokens_to_compute=prompt_tokens,
        max_tokens=max_tokens,
        copied_prefix_tokens=0,
        checkpoints=0,
        activation_bytes=hello.activation_bytes,
    ).total
    if fixed + need > hello.memory_limit:
        raise InsufficientMemory(
            f"this request needs about {mib(need)} MiB ({prompt_tokens} prompt + {max_tokens} new tokens) "
            f"but only {mib(hello.memory_limit - fixed)} MiB of the worker's {mib(hello.memory_limit)} MiB "
            "memory budget can be freed for it; send a shorter prompt or fewer max_tokens",
            retry_after=None,
        )

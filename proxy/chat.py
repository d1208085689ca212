"""Prompts, in the proxy, with the model's own tokenizer and chat template.

The proxy renders and tokenizes; the worker only ever sees token ids. Next to
the prompt it computes checkpoint hints: the token offsets where messages end,
which is where the next turn of the same conversation will diverge when the
template re-renders an earlier message differently (e.g. drops reasoning).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from proxy.errors import InvalidRequest
from proxy.text_output import TextOutput

log = logging.getLogger("mlx_cache_proxy")


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    checkpoint_hints: list[int]  # token offsets of message ends, ascending, inside the prompt
    initial_state: str = "normal"  # "reasoning" when the template opened a think block


def boundary_hints(
    prompt: Sequence[int],
    render_prefix: Callable[[int], Optional[Sequence[int]]],
    n_messages: int,
    max_hints: int = 8,
) -> list[int]:
    """Token offsets where messages[:k] ends, for the last `max_hints` values of k.

    `render_prefix(k)` renders the first k messages without a generation
    prompt (None when the template cannot). Its length is a hint only when its
    tokens are a true prefix of `prompt`: templates that render earlier turns
    differently, or tokenizers that merge across the boundary, give no hint
    rather than a wrong one.
    """
    hints: set[int] = set()
    for k in range(max(1, n_messages - max_hints + 1), n_messages + 1):
        prefix = render_prefix(k)
        if not prefix:
            continue
        n = len(prefix)
        if n < len(prompt) and list(prompt[:n]) == list(prefix):
            hints.add(n)
    return sorted(hints)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (a copy; the request stays intact).

    As mlx_lm.server does: text content parts are joined into one string, a
    missing content is "", and tool-call arguments given as a JSON string are
    parsed so templates can render them as objects.
    """
    out = []
    for index, message in enumerate(messages):
        message = copy.deepcopy(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(
                        "only text content parts are supported",
                        param=f"messages[{index}].content",
                    )
                texts.append(str(part.get("text", "")))
            message["content"] = "".join(texts)
        elif content is None:
            message["content"] = ""
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # the template renders the string as it is
        out.append(message)
    return out


class ChatTokenizer:
    """A model's tokenizer (mlx-lm's `TokenizerWrapper`) and what the proxy does with it."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    @classmethod
    def load(cls, model_path: Path) -> ChatTokenizer:
        """Load as `mlx_lm.load` does, eos ids from config.json included."""
        from mlx_lm.utils import load_config, load_tokenizer

        try:
            eos = load_config(Path(model_path)).get("eos_token_id")
        except FileNotFoundError:
            eos = None
        wrapper = load_tokenizer(Path(model_path), eos_token_ids=eos)
        if not wrapper.has_chat_template:
            import mlx_lm.server  # noqa: F401  (imported here, on the loading thread; used in render_chat)
        return cls(wrapper)

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.wrapper.eos_token_ids)

    @property
    def has_tool_calling(self) -> bool:
        return bool(self.wrapper.has_tool_calling)

    # ------------------------------------------------------------ prompts

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: Optional[list[dict[str, Any]]] = None,
        template_kwargs: Optional[dict[str, Any]] = None,
        max_hints: int = 8,
    ) -> RenderedPrompt:
        messages = normalize_messages(messages)
        if not self.wrapper.has_chat_template:
            from mlx_lm.server import convert_chat  # mlx_lm.server's fallback, for parity

            return RenderedPrompt(self.wrapper.encode(convert_chat(messages)), [])
        kwargs = dict(template_kwargs or {})
        try:
            tokens = self._apply(messages, tools, kwargs, add_generation_prompt=True)
        except Exception as exc:  # jinja raises TemplateError, templates raise anything
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc

        def render_prefix(k: int) -> Optional[list[int]]:
            try:
                return self._apply(messages[:k], tools, kwargs, add_generation_prompt=False)
            except Exception:  # some templates refuse a conversation without a user turn
                return None

        hints = boundary_hints(tokens, render_prefix, len(messages), max_hints) if max_hints else []
        return RenderedPrompt(tokens, hints, self._initial_state(tokens))

    def _apply(self, messages, tools, kwargs, *, add_generation_prompt: bool) -> list[int]:
        tokens = self.wrapper.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )
        return [int(t) for t in tokens]

    def _initial_state(self, tokens: list[int]) -> str:
        state = "normal"
        if self.wrapper.has_thinking:
            if self.wrapper.rfind_think_start(tokens) > self.wrapper.rfind_think_end(tokens):
                state = "reasoning"
        return self.wrapper.response_initial_state or state

    def encode_text(self, text: str) -> list[int]:
        """A completions prompt, tokenized as mlx_lm.server does (special tokens added)."""
        return [int(t) for t in self.wrapper.encode(text)]

    # ------------------------------------------------------------ output

    def text_output(
        self,
        *,
        stop: Sequence[str] = (),
        tools: Optional[list[dict[str, Any]]] = None,
        parse_tools: bool = False,
        split_reasoning: bool = False,
        initial_state: str = "normal",
    ) -> TextOutput:
        return TextOutput(
            self.wrapper,
            stop=stop,
            skip_ids=set(self.wrapper.eos_token_ids),
            tools=tools,
            parse_tools=parse_tools and self.has_tool_calling,
            split_reasoning=split_reasoning,
            initial_state=initial_state,
        )

    def token_text(self, token: int) -> str:
        return self.wrapper.decode([token])

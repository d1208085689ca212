"""Prompts, in the proxy, with the model's own tokenizer and chat template.

The proxy renders and tokenizes; the worker only ever sees token ids. Next to
the prompt it computes checkpoint hints: the token offsets where messages end,
which is where the next turn of the same conversation will diverge when the
template re-renders an earlier message differently (e.g. drops reasoning); and
split points inside long messages (`proxy.prompt_tokens`).

A turn costs what its new messages cost: the template is rendered to text once
(fast), the text is tokenized piece by piece with the ids of pieces seen before
reused (`PromptEncoder`), and a message end is found by rendering the messages
up to it once per conversation: its place in the text is remembered by the
content of those messages (`MessageEnds`), so a later turn only checks that the
text still starts the same way.

Client text never becomes a control token: the request's strings are marked
(`proxy.control_tokens`) before rendering, and the encoder writes a marked
token as plain text. Tokenizing runs on a few threads (a `tokenizers` encode
releases the GIL, so a short prompt is not stuck behind a long one) and stops
between pieces once its client has gone (`cancelled`).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from protocol.messages import MAX_SPLIT_POINTS, SPLIT_POINTS_REACH
from proxy.control_tokens import MARK_END, MARK_START, ControlTokens
from proxy.errors import ContextLengthExceeded, InvalidRequest
from proxy.grammar import GrammarBuilder
from proxy.guards import check_text_size
from proxy.harmony import HARMONY_REPLY_ENDS, HarmonyOutput, TokenBridge, harmony_encoding, is_harmony_tokenizer
from proxy.lru import LockedLRU
from proxy.openai_api import nested_deeper_than
from proxy.prompt_tokens import Encoded, PromptEncoder, TokenizationCancelled
from proxy.text_output import TextOutput

log = logging.getLogger("mlx_cache_proxy")


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    checkpoint_hints: list[int]  # token offsets of message ends, ascending, inside the prompt
    initial_state: str = "normal"  # "reasoning" when the template opened a think block
    split_points: list[int] = field(default_factory=list)  # structural boundaries near the end, ascending
    split_kinds: list[int] = field(default_factory=list)  # a protocol.messages.SplitKind each


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


_UNKNOWN = object()


class MessageEnds(LockedLRU):
    """Where the rendering of messages[:k] ends in a conversation's text, keyed by those messages' content.

    A value is (length, hash) of that prefix render, or None when the template
    refused it (and, under a derived key, whether the next turn continues at
    the prompt end: `ChatTokenizer._continues_at_the_end`); a key is a hash
    chained over the messages (and the tools and template arguments), so a
    conversation's next turn finds its earlier message ends without rendering
    them again.
    """

    def __init__(self, max_entries: int = 16384) -> None:
        super().__init__(max_entries)  # shared by the tokenizer threads

    @staticmethod
    def keys(messages: list[dict[str, Any]], context: Any) -> list[int]:
        """keys[k] names messages[:k] under `context` (tools and template arguments)."""
        chain = [hash(_canonical(context))]
        for message in messages:
            chain.append(hash((chain[-1], _canonical(message))))
        return chain

    def get(self, key: int, default: Any = _UNKNOWN) -> Any:
        """The end under `key`, or _UNKNOWN (a stored None means the template refused that prefix)."""
        return super().get(key, default)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (a copy; the request stays intact).

    As mlx_lm.server does: text content parts are joined into one string, a
    missing content is "", and tool-call arguments given as a JSON string are
    parsed so templates can render them as objects. An assistant message's
    reasoning, under any of `REASONING_KEYS`, is given under all of them.
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
        _share_reasoning(message)
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                parsed = _parsed_arguments(function["arguments"])
                if parsed is not None:
                    function["arguments"] = parsed
        out.append(message)
    return out


MAX_ARGUMENT_DEPTH = 32


def _parsed_arguments(text: str) -> Any:
    """Tool-call arguments as an object, or None to render the string as it is.

    The string was inside the (checked) body, but not parsed: it can nest without
    bound or hold an unpaired surrogate escape, which the tokenizer cannot take.
    """
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        return None
    return None if nested_deeper_than(value, MAX_ARGUMENT_DEPTH) else value


# What clients call an assistant message's past reasoning; templates read one of them
# (Qwen's reasoning_content, GPT-OSS's thinking), so each gets the one a client sent.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _share_reasoning(message: dict[str, Any]) -> None:
    if message.get("role") != "assistant":
        return
    given = next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k]), None)
    if given is not None:
        for key in REASONING_KEYS:
            if not isinstance(message.get(key), str) or not message[key]:
                message[key] = given


class ChatTokenizer:
    """A model's tokenizer (mlx-lm's `TokenizerWrapper`) and what the proxy does with it."""

    # The first prompts are also tokenized the template's own way, and must come out the same
    # (the start-up probe and the tests check the rule; this checks the model's own template).
    VERIFY_FIRST = 3

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper
        hf = getattr(wrapper, "_tokenizer", None)
        backend = getattr(hf, "_tokenizer", None)  # a `tokenizers.Tokenizer`
        self.encoder: Optional[PromptEncoder] = None  # None: the slow path (`_render_tokens`)
        self._whole: Optional[PromptEncoder] = None  # encodes whole texts (the check, and the slow path)
        if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
            self.encoder = self._whole = PromptEncoder(backend)
            self.control = self.encoder.control
        else:
            self.control = ControlTokens(str(t) for t in getattr(hf, "added_tokens_decoder", {}).values())
        self.message_ends = MessageEnds()
        self._verify_left = self.VERIFY_FIRST
        self._verify_lock = threading.Lock()
        self.max_token_chars = _max_token_chars(wrapper)
        self.grammars = GrammarBuilder(wrapper)  # structured output's grammars for this tokenizer
        self.harmony: Optional[TokenBridge] = None  # a GPT-OSS (harmony) model's: its replies are parsed by harmony

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
        tokenizer = cls(wrapper)
        tokenizer._attach_harmony(Path(model_path))
        return tokenizer

    def _attach_harmony(self, model_path: Path) -> None:
        """A GPT-OSS (harmony) tokenizer: its replies are parsed by harmony, and end at <|return|> or <|call|>."""
        added = {str(t) for t in getattr(self.wrapper._tokenizer, "added_tokens_decoder", {}).values()}
        if not is_harmony_tokenizer(added):
            return
        from worker.tiny_models import cache_home

        encoding = harmony_encoding(str(model_path / "tokenizer.json"), str(cache_home() / "harmony"))
        if encoding is not None:
            self.harmony = TokenBridge(encoding, self.wrapper)
        for end in HARMONY_REPLY_ENDS:  # whatever config.json says
            if end in added:
                self.wrapper.add_eos_token(end)

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
        cancelled: Optional[threading.Event] = None,
        token_limit: int = 0,
    ) -> RenderedPrompt:
        """The prompt's tokens and hints; raises TokenizationCancelled once `cancelled` is set.

        A rendered text too long for `token_limit` tokens whatever its tokens is
        refused before it is tokenized (`check_text_size`), and so, before it is
        rendered, are more messages than `token_limit` (each renders to a token at least).
        """
        if token_limit and len(messages) >= token_limit:
            raise ContextLengthExceeded(
                f"the request has {len(messages)} messages, each at least one token, beyond this model's "
                f"context limit of {token_limit} tokens",
                param="messages",
            )
        messages = self.control.mark(normalize_messages(messages), "messages")
        tools = self.control.mark(tools, "tools")
        kwargs = self.control.mark(dict(template_kwargs or {}), "chat_template_kwargs")
        if not self.wrapper.has_chat_template:
            from mlx_lm.server import convert_chat  # mlx_lm.server's fallback, for parity

            return RenderedPrompt(self.wrapper.encode("") + self._encode_marked(convert_chat(messages)), [])
        if self.encoder is None:
            return self._render_tokens(messages, tools, kwargs, max_hints, token_limit)
        try:
            text = self._apply(messages, tools, kwargs, add_generation_prompt=True)
        except Exception as exc:  # jinja raises TemplateError, templates raise anything
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        self._check_size(text, token_limit)
        encoded = self.encoder.encode(text, cancelled)
        if self._verify_left > 0 and not self._verified(encoded.tokens, text):
            return self._render_tokens(messages, tools, kwargs, max_hints)
        if cancelled is not None and cancelled.is_set():
            raise TokenizationCancelled()
        hints = self._message_ends(messages, tools, kwargs, text, encoded, max_hints) if max_hints else []
        tokens = encoded.tokens
        near_end = [
            (s, k) for s, k in zip(encoded.splits, encoded.split_kinds) if len(tokens) - SPLIT_POINTS_REACH <= s < len(tokens)
        ][-MAX_SPLIT_POINTS:]
        return RenderedPrompt(
            tokens, hints, self._initial_state(tokens, text), [s for s, _ in near_end], [k for _, k in near_end]
        )

    def _check_size(self, text: str, token_limit: int) -> None:
        markers = text.count(MARK_START) + text.count(MARK_END)  # they add characters, not tokens
        check_text_size(len(text) - markers, self.max_token_chars, token_limit)

    def _verified(self, tokens: list[int], text: str) -> bool:
        """Do the piece-wise ids equal the ids of the rendered text encoded at once?"""
        expected = self._encode_marked(text)
        with self._verify_lock:
            self._verify_left -= 1
            if tokens == expected:
                return True
            if self.encoder is not None:
                log.warning("this tokenizer's prompts differ when encoded piece by piece: each is now encoded whole")
            self.encoder = None
            return False

    def _encode_marked(self, text: str) -> list[int]:
        """Text rendered from marked strings, encoded at once between its marked tokens (the check, the slow path).

        Without a `tokenizers` backend, transformers' own `encode_marked_chat`,
        which can write only special tokens as plain text.
        """
        if self._whole is not None:
            return self._whole.encode_whole(text).tokens
        from transformers.utils.chat_template_utils import encode_marked_chat

        try:
            return [int(t) for t in encode_marked_chat(self.wrapper._tokenizer, text)]
        except ValueError as exc:  # a control token the tokenizer cannot write as plain text
            raise InvalidRequest(f"the messages hold a control token this tokenizer cannot encode as text: {exc}",
                                 param="messages") from exc  # fmt: skip

    def _message_ends(self, messages, tools, kwargs, text: str, encoded: Encoded, max_hints: int) -> list[int]:
        """Token offsets where messages[:k] ends, for the last `max_hints` values of k (see `boundary_hints`)."""
        keys = MessageEnds.keys(messages, [tools, kwargs])
        n_tokens, hints = len(encoded.tokens), set()
        last = len(messages)
        if self._continues_at_the_end(messages, tools, kwargs, text, keys[last]):
            last -= 1  # the prompt end serves the next turn: no stop (a prefill chunk) just before it
        for k in range(max(1, len(messages) - max_hints + 1), last + 1):
            end = self.message_ends.get(keys[k])
            if end is _UNKNOWN:
                try:
                    prefix = self._apply(messages[:k], tools, kwargs, add_generation_prompt=False)
                    end = (len(prefix), hash(prefix))
                except Exception:  # some templates refuse a conversation without a user turn
                    end = None
                self.message_ends.put(keys[k], end)
            if end is None or not 0 < end[0] < len(text) or hash(text[: end[0]]) != end[1]:
                continue
            offset = self.encoder.prefix_length(encoded, text, end[0])
            if offset is not None and 0 < offset < n_tokens:
                hints.add(offset)
        return sorted(hints)

    def _continues_at_the_end(self, messages, tools, kwargs, text: str, key: int) -> bool:
        """Does the next turn render this prompt's generation prompt as it is (so it starts with all of `text`)?

        Then the prompt end is on the next prompt's path, and the last message's
        end, a few tokens before it, needs no checkpoint of its own. Templates that
        render the generation prompt differently from a past assistant turn (an
        empty think block added only to the prompt) keep it. Remembered per conversation.
        """
        verdict_key = hash((key, "continues"))
        verdict = self.message_ends.get(verdict_key)
        if verdict is _UNKNOWN:
            try:
                after = self._apply(
                    [*messages, {"role": "assistant", "content": "x"}], tools, kwargs, add_generation_prompt=False
                )
                verdict = after.startswith(text)
            except Exception:
                verdict = False
            self.message_ends.put(verdict_key, verdict)
        return verdict

    def _render_tokens(self, messages, tools, kwargs, max_hints: int, token_limit: int = 0) -> RenderedPrompt:
        """The template's own tokenization, and a render per hinted message end (the slow way)."""
        try:
            text = self._apply(messages, tools, kwargs, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        self._check_size(text, token_limit)
        tokens = self._encode_marked(text)
        continues = self._continues_at_the_end(messages, tools, kwargs, text, MessageEnds.keys(messages, [tools, kwargs])[-1])

        def render_prefix(k: int) -> Optional[list[int]]:
            if continues and k == len(messages):
                return None  # see _continues_at_the_end
            try:
                return self._encode_marked(self._apply(messages[:k], tools, kwargs, add_generation_prompt=False))
            except Exception:
                return None

        hints = boundary_hints(tokens, render_prefix, len(messages), max_hints) if max_hints else []
        return RenderedPrompt(tokens, hints, self._initial_state(tokens))

    def _apply(self, messages, tools, kwargs, *, add_generation_prompt: bool) -> str:
        """The template's text for (already marked) messages; it is never tokenized as it is."""
        text = self.wrapper.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
        return self.control.remark_escaped(text)

    def _initial_state(self, tokens: list[int], text: Optional[str] = None) -> str:
        """"reasoning" when the prompt's last think marker opens a block (looked for from the end).

        With the rendered text at hand, a prompt whose text holds neither marker skips the token scan.
        """
        state = "normal"
        markers = (self.wrapper.think_start, self.wrapper.think_end)
        if text is not None and self.wrapper.has_thinking and not any(m and m in text for m in markers):
            return self.wrapper.response_initial_state or state
        if self.wrapper.has_thinking:
            n = len(tokens)
            for window in (256, 4096, n):
                start = max(0, n - window)
                opened = self.wrapper.rfind_think_start(tokens, start=start)
                closed = self.wrapper.rfind_think_end(tokens, start=start)
                if opened >= 0 or closed >= 0:
                    state = "reasoning" if opened > closed else "normal"
                    break
        return self.wrapper.response_initial_state or state

    def encode_text(self, text: str) -> list[int]:
        """A completions prompt, tokenized as mlx_lm.server does (special tokens added).

        A raw prompt is the client's own markup: its control tokens stay control tokens.
        """
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
        prompt: Sequence[int] = (),
    ) -> TextOutput | HarmonyOutput:
        """The output of one generation; a chat reply (`split_reasoning`) of a harmony model is parsed by harmony."""
        if split_reasoning and self.harmony is not None:
            return HarmonyOutput(self.harmony, self.wrapper, prompt=prompt, stop=stop, tools=tools, parse_tools=parse_tools)
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


def _max_token_chars(wrapper: Any) -> int:
    """The most characters one ordinary token stands for (for a lower bound on a text's tokens).

    A byte-level token's string has one character per byte it stands for, a
    SentencePiece one one per character, so no token covers more characters
    of text than its string has.
    """
    try:
        vocab = wrapper.get_vocab()
        added = set(getattr(wrapper, "added_tokens_decoder", {}) or {})
        return max((len(t) for t, i in vocab.items() if i not in added), default=0) or 64
    except Exception:  # a tokenizer without a vocabulary listing: a generous bound
        return 64

"""Text from a client never becomes a control token.

A chat template writes its markup (`<|im_start|>system`, `<|im_end|>`) as the
text of added tokens, and a tokenizer turns every occurrence of that text into
the token, whoever wrote it. So user text, a retrieved document or a tool
result holding `<|im_end|>\\n<|im_start|>system\\n...` would forge a system turn.

Before rendering, every control token inside the request's strings (message
content, names, roles, tool arguments, tool definitions, template arguments) is
wrapped in two private-use markers; the template's own markup is not. The
encoder (`proxy.prompt_tokens`) then encodes a marked token as plain text, with
a copy of the tokenizer that has no added tokens, and drops lone markers (a
template's `split()` can separate them) while still cutting the text there, so
the text on either side cannot join into a control token.

This is what transformers' `apply_chat_template(sanitize_control_tokens=True)`
does, with the same marker code points (so that function, used to check the
first prompts, strips and re-places ours), but with two differences: every
added token that is not whitespace counts as a control token (also the
non-special ones, such as `<think>` or `<tool_call>`, which transformers can
only sanitize when they are special), and a control token in a dictionary
key, which no template can be trusted to escape, is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from proxy.errors import InvalidRequest

MARK_START = "\U000f0000"  # the markers transformers' chat_template_utils uses
MARK_END = "\U000f0001"
_MARKERS = re.compile(f"[{MARK_START}{MARK_END}]")


class ControlTokens:
    """The control tokens of one tokenizer, and how request strings are marked."""

    def __init__(self, contents: Iterable[str]) -> None:
        self.contents = tuple(sorted({c for c in contents if c and not c.isspace()}, key=len, reverse=True))
        # Longest first, so a token wins over the tokens it contains.
        self._pattern = re.compile("|".join(map(re.escape, self.contents))) if self.contents else None
        tokens = "|".join(map(re.escape, self.contents))
        self._escaped = (
            re.compile(rf"(?:\\U000f0000|\\udb80\\udc00)({tokens})(?:\\U000f0001|\\udb80\\udc01)")
            if self.contents
            else None
        )

    @classmethod
    def of(cls, backend: Any) -> ControlTokens:
        """Every added token of a `tokenizers.Tokenizer` that is not whitespace."""
        return cls(token.content for token in backend.get_added_tokens_decoder().values())

    def marked_alternatives(self) -> str:
        """A regex matching a marked control token or a lone marker (for the encoder's splitter)."""
        tokens = "|".join(map(re.escape, self.contents)) or "(?!)"
        return f"{MARK_START}(?:{tokens}){MARK_END}|[{MARK_START}{MARK_END}]"

    def mark(self, value: Any, where: str = "messages") -> Any:
        """`value` (a string, or lists and dicts of them) with each control token wrapped in markers."""
        if isinstance(value, str):
            value = _MARKERS.sub("", value) if MARK_START in value or MARK_END in value else value
            if self._pattern is None:
                return value
            return self._pattern.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", value)
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and self._holds_control(key):
                    raise InvalidRequest(
                        f"a key in {where} holds a control token or marker: {json.dumps(key)[:80]}", param=where
                    )
            return {key: self.mark(item, where) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(item, where) for item in value]
        return value

    def remark_escaped(self, text: str) -> str:
        """Marks again around control tokens whose markers a template printed escaped.

        A template that prints a container (`{{ arguments }}`: Python's repr) or
        ASCII-only JSON writes a marker as the text `\\U000f0000` or `\\udb80\\udc00`,
        leaving the token between them bare. Client text cannot produce that
        bare form (its control tokens are marked), so the escaped pair around a
        control token can only be marked client text: marking it again can only
        ever turn text plain.
        """
        if self._escaped is None or ("\\U000f000" not in text and "\\udb80" not in text):
            return text
        return self._escaped.sub(lambda m: f"{MARK_START}{m.group(1)}{MARK_END}", text)

    def _holds_control(self, text: str) -> bool:
        return bool(_MARKERS.search(text)) or (self._pattern is not None and self._pattern.search(text) is not None)


def is_marked(part: str) -> bool:
    """Is this splitter match a marked control token (else a lone marker)?"""
    return len(part) > 1 and part[0] == MARK_START


def unmarked(part: str) -> str:
    return part[1:-1]

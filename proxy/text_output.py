"""Generated token ids -> what the client sees, one token at a time.

Three stages, in order:
1. mlx-lm's streaming detokenizer turns ids into text (end-of-sequence ids are
   not text and are skipped);
2. stop strings: text that could still become a stop string is held back; when
   one appears the text before it is the last output and `stopped` is set, so
   the caller can abort the worker;
3. for chat, mlx-lm's `TextStateMachine` (the one mlx_lm.server uses) splits
   the text into content, reasoning and tool-call text; a finished tool call is
   parsed with the tokenizer's tool parser into an OpenAI `tool_calls` entry.
   Tool-call text of a request without tools, or that does not parse, stays
   content, markers included, so nothing the model said is lost.

A harmony model's chat reply (GPT-OSS) is read by `proxy.harmony.HarmonyOutput`
instead, which has the same interface.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

log = logging.getLogger("mlx_cache_proxy")


@dataclass
class OutputDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __iadd__(self, other: OutputDelta) -> OutputDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)
        return self


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that a stop string starts with."""
    longest = 0
    for stop in stops:
        for k in range(min(len(text), len(stop) - 1), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextOutput:
    """The per-request text state of one generation."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        stop: Sequence[str] = (),
        skip_ids: set[int] = frozenset(),  # type: ignore[assignment]
        tools: Optional[list[dict[str, Any]]] = None,
        parse_tools: bool = False,
        split_reasoning: bool = False,
        initial_state: str = "normal",
    ) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._stops = [s for s in stop if s]
        self._skip_ids = set(skip_ids)
        self._pending = ""
        self._tools = tools
        self._parse_tools = parse_tools
        self._tool_text = ""
        self.stopped = False  # a stop string ended the text
        self.stop_string: Optional[str] = None  # which one
        self.tool_calls_made = 0
        self._machine = None
        self._machine_state: Any = None
        self._state = initial_state
        if split_reasoning:
            from mlx_lm.generate import make_text_state_machine

            self._machine = make_text_state_machine(tokenizer)
            self._machine_state = self._machine.make_state(initial_state)

    # ------------------------------------------------------------ input

    def add(self, token: int) -> OutputDelta:
        """The text one more generated token adds (maybe none yet)."""
        if self.stopped or token in self._skip_ids:
            return OutputDelta()
        self._detokenizer.add_token(token)
        return self._route(self._release(self._detokenizer.last_segment, final=False))

    def finish(self, finish_reason: str) -> OutputDelta:
        """Everything still held back, at the end of the generation."""
        delta = OutputDelta()
        if not self.stopped:
            self._detokenizer.finalize()
            delta += self._route(self._release(self._detokenizer.last_segment, final=True))
        delta += self._close(finish_reason)
        return delta

    # ------------------------------------------------------------ stages

    def _release(self, segment: str, *, final: bool) -> str:
        self._pending += segment
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        index = find_stop(self._pending, self._stops)
        if index >= 0:
            self.stop_string = next(stop for stop in self._stops if self._pending.find(stop) == index)
            out, self._pending = self._pending[:index], ""
            self.stopped = True
            return out
        keep = 0 if final else held_back(self._pending, self._stops)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _route(self, text: str) -> OutputDelta:
        if self._machine is None:
            return OutputDelta(content=text)
        if not text:
            return OutputDelta()
        from mlx_lm.generate import TextStateMachine

        self._machine_state, segments = TextStateMachine.split(self._machine_state, text)
        return self._collect(segments)

    def _collect(self, segments: list[tuple[Optional[str], str]]) -> OutputDelta:
        delta = OutputDelta()
        for state, text in segments:
            if self._state == "tool" and state != "tool":
                delta += self._tool_call(self._tool_text, closed=True)
                self._tool_text = ""
            if state == "reasoning":
                delta.reasoning += text
            elif state == "tool":
                self._tool_text += text
            else:
                delta.content += text
            self._state = state or "normal"
        return delta

    def _close(self, finish_reason: str) -> OutputDelta:
        delta = OutputDelta()
        if self._machine is not None:
            from mlx_lm.generate import TextStateMachine

            # As mlx_lm.server: a partial marker is dropped at a stop, kept at a cut.
            if finish_reason == "length":
                self._machine_state, flushed, state = TextStateMachine.flush(self._machine_state)
                delta += self._collect([(state, flushed)])
            else:
                self._machine_state, _ = TextStateMachine.discard(self._machine_state)
        if self._state == "tool" and self._tool_text:
            delta += self._tool_call(self._tool_text, closed=False)
            self._tool_text = ""
        return delta

    def _tool_call(self, text: str, *, closed: bool) -> OutputDelta:
        start = self._tokenizer.tool_call_start or ""
        end = (self._tokenizer.tool_call_end or "") if closed else ""
        if not self._parse_tools:
            return OutputDelta(content=start + text + end)
        try:
            parsed = self._tokenizer.tool_parser(text, self._tools)
        except Exception as exc:  # parsers raise ValueError, JSONDecodeError, KeyError...
            log.warning("could not parse a tool call (%s: %s); returning it as text", type(exc).__name__, exc)
            return OutputDelta(content=start + text + end)
        calls = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            calls.append(self._format_call(dict(item)))
        return OutputDelta(tool_calls=calls)

    def _format_call(self, item: dict[str, Any]) -> dict[str, Any]:
        call_id = item.pop("id", None) or f"call_{uuid.uuid4().hex[:24]}"
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = {
            "index": self.tool_calls_made,
            "id": call_id,
            "type": "function",
            "function": {"name": item.get("name", ""), "arguments": arguments},
        }
        self.tool_calls_made += 1
        return call

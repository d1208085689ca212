"""The Anthropic Messages API surface: request bodies -> the chat form the tokenizer renders, and replies.

A Messages request becomes the same `ChatRequest` a chat completion does, so
it renders through the same chat template, with the same checkpoint hints,
into the same queue, worker and pool. The conversion:

- `system` (a string or text blocks) -> a leading system message;
- user text blocks -> user content; `tool_result` blocks -> role "tool"
  messages, in order; assistant text -> content, `thinking` -> reasoning_content,
  `tool_use` -> tool_calls (the template renders them as the model wrote them);
- `tools` ({name, description, input_schema}) -> function tools;
- `tool_choice` auto, any and tool leave the tools in the prompt and parse tool
  calls; any and tool force one (decoding is constrained to a call, as chat
  completions' "required" and named function); none drops them;
- `output_config.format` (or `output_format`) json_schema constrains the reply
  to the schema, as chat completions' `response_format`;
- `thinking` enabled/disabled -> the template's `enable_thinking`.

Usage follows Anthropic's accounting, where the three input counts add up to
the prompt: `cache_read_input_tokens` are the tokens restored from the pool,
`input_tokens` the ones computed, `cache_creation_input_tokens` is always 0
(the pool keeps what it computed without being asked, and may evict it, so no
tokens are "written" the way an explicit cache breakpoint writes them).
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Union

from aiohttp import web

from proxy.errors import ApiError, InvalidRequest, QueueFull
from proxy.generation import Finished
from proxy.grammar import anthropic_output_format, forced_tools
from proxy.namespace import parse_cache_salt
from proxy.openai_api import MAX_STOP_STRINGS, ChatRequest, GenerationOptions, ResponseIdentity, requested_model
from proxy.text_output import OutputDelta

ROUTE_PREFIXES = ("/v1/messages", "/messages")

_MISSING = object()

Event = tuple[str, dict[str, Any]]  # (SSE event name, data)


def is_anthropic_path(path: str) -> bool:
    """Whether `path` belongs to the Messages API (its errors take Anthropic's shape)."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ROUTE_PREFIXES)


# ----------------------------------------------------------------- requests


def parse_messages_request(body: dict[str, Any]) -> ChatRequest:
    value = body.get("max_tokens")
    if value is None:
        raise InvalidRequest("max_tokens: field required", param="max_tokens")
    return _chat_request(body, _int(body, "max_tokens", 0, 1), _bool(body, "stream"))


def parse_count_tokens_request(body: dict[str, Any]) -> ChatRequest:
    """What /v1/messages/count_tokens renders: a Messages request without max_tokens."""
    return _chat_request(body, max_tokens=1, stream=False)


def _chat_request(body: dict[str, Any], max_tokens: int, stream: bool) -> ChatRequest:
    messages = to_chat_messages(body.get("system"), body.get("messages", _MISSING))
    tools = to_chat_tools(body.get("tools"))
    if tool_choice(body.get("tool_choice"), tools) == "none":
        tools = None
    constraint = forced_tools(body.get("tool_choice"), tools) or anthropic_output_format(body)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("metadata: must be an object", param="metadata")
    options = GenerationOptions(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 1.0),  # Anthropic's default, not mlx_lm's 0
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 0),
        stop=_stop_sequences(body.get("stop_sequences")),
        stream=stream,
    )
    return ChatRequest(
        model=requested_model(body),
        messages=messages,
        options=options,
        tools=tools,
        parse_tools=tools is not None,
        template_kwargs=_thinking(body.get("thinking")),
        cache_salt=parse_cache_salt(body),
        constraint=constraint,
    )


def to_chat_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    """Anthropic's system + messages as chat-template messages."""
    if messages is _MISSING:
        raise InvalidRequest("messages: field required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    if system is not None:
        text = "\n".join(_texts(_blocks(system, "system"), "system"))
        if text:
            out.append({"role": "system", "content": text})
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where}: must be an object", param=where)
        role = message.get("role")
        blocks = _blocks(message.get("content", _MISSING), f"{where}.content")
        if role == "user":
            out.extend(_user_turn(blocks, f"{where}.content"))
        elif role == "assistant":
            out.append(_assistant_turn(blocks, f"{where}.content"))
        else:
            raise InvalidRequest(
                f"{where}.role: must be 'user' or 'assistant' (the system prompt is the top-level system field)",
                param=f"{where}.role",
            )
    if messages[-1].get("role") == "assistant":
        # Continuing a final assistant message needs the template to leave the turn open.
        raise InvalidRequest(
            "the last message must be a user message: continuing an assistant message (prefill) is not supported",
            param="messages",
        )
    return out


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is _MISSING:
        raise InvalidRequest(f"{where}: field required", param=where)
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: must be a string or an array of content blocks", param=where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{where}[{j}]: must be a content block with a type", param=f"{where}[{j}]")
    return content


def _texts(blocks: list[dict[str, Any]], where: str) -> list[str]:
    """The text of text-only content (system prompts, tool results)."""
    texts = []
    for j, block in enumerate(blocks):
        if block["type"] != "text":
            raise InvalidRequest(f"{where}[{j}]: only text blocks are supported here", param=f"{where}[{j}]")
        texts.append(_string(block, "text", f"{where}[{j}]"))
    return texts


def _user_turn(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One user message: its text, and a role "tool" message per tool_result, in order."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})  # separate inputs, one per line
            texts.clear()

    for j, block in enumerate(blocks):
        kind, at = block["type"], f"{where}[{j}]"
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "tool_result":
            flush()
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(block, "tool_use_id", at),
                    "content": _tool_result_text(block.get("content"), f"{at}.content"),
                }
            )
        else:
            raise InvalidRequest(f"{at}: {kind} blocks are not supported in user messages", param=at)
    flush()
    return out or [{"role": "user", "content": ""}]


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    return "\n".join(_texts(_blocks(content, where), where))


def _assistant_turn(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind, at = block["type"], f"{where}[{j}]"
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "thinking":
            thoughts.append(_string(block, "thinking", at))
        elif kind == "redacted_thinking":
            continue  # opaque to anything but Anthropic's models: nothing to render
        elif kind == "tool_use":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise InvalidRequest(f"{at}.input: must be an object", param=f"{at}.input")
            calls.append(
                {
                    "id": _string(block, "id", at),
                    "type": "function",
                    "function": {"name": _string(block, "name", at), "arguments": arguments},
                }
            )
        else:
            raise InvalidRequest(f"{at}: {kind} blocks are not supported in assistant messages", param=at)
    # The blocks of a reply are pieces of one generated text: joined as they came.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def to_chat_tools(tools: Any) -> Optional[list[dict[str, Any]]]:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{at}: must be an object", param=at)
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"{at}: server tools ({tool.get('type')}) are not supported; define a custom tool with an input_schema",
                param=at,
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{at}.input_schema: field required (an object)", param=f"{at}.input_schema")
        function: dict[str, Any] = {"name": _string(tool, "name", at)}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out or None


def tool_choice(value: Any, tools: Optional[list[dict[str, Any]]]) -> str:
    """auto, any, tool or none; a named tool must be one of `tools`."""
    if value is None:
        return "auto"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice: type must be auto, any, tool or none", param="tool_choice")
    if kind == "any" and not tools:
        raise InvalidRequest("tool_choice: any needs tools", param="tool_choice")
    if kind == "tool":
        name = _string(value, "name", "tool_choice")
        if name not in {t["function"]["name"] for t in tools or []}:
            raise InvalidRequest(f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
    return kind


def _thinking(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "enabled":
        budget = value.get("budget_tokens")  # checked, not enforced: the model ends its thinking itself
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InvalidRequest("thinking.budget_tokens: must be a positive integer", param="thinking.budget_tokens")
        return {"enable_thinking": True}
    if kind == "disabled":
        return {"enable_thinking": False}
    if kind == "adaptive":
        return {}
    raise InvalidRequest("thinking: type must be enabled, disabled or adaptive", param="thinking")


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop_sequences: must be an array of strings", param="stop_sequences")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop_sequences: at most {MAX_STOP_STRINGS}", param="stop_sequences")
    return tuple(s for s in value if s)


def _string(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{name}: must be a string", param=f"{where}.{name}")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name}: must be a boolean", param=name)
    return value


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name}: must be a number", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name}: must be from {lo} to {hi}", param=name)
    return float(value)


def _int(body: dict[str, Any], name: str, default: int, lo: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name}: must be an integer", param=name)
    if value < lo:
        raise InvalidRequest(f"{name}: must be at least {lo}", param=name)
    return value


# ----------------------------------------------------------------- replies


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: Optional[int]) -> dict[str, Any]:
    cached = cached_tokens or 0
    return {
        "input_tokens": prompt_tokens - cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_reason(finished: Finished) -> tuple[str, Optional[str]]:
    """Anthropic's (stop_reason, stop_sequence) for how a generation ended."""
    if finished.finish_reason == "tool_calls":
        return "tool_use", None
    if finished.finish_reason == "length":
        return "max_tokens", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped parsed tool call (from TextOutput) as a tool_use block."""
    function = call["function"]
    arguments: Union[str, Any] = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        arguments = {"arguments": arguments}  # input must be an object; keep what the model said
    return {"type": "tool_use", "id": call["id"], "name": function.get("name", ""), "input": arguments}


class MessageBuilder:
    """One reply's content blocks, in the order the model produced them, and its stream events.

    Streamed and whole replies are built alike: each `add` returns the events
    it caused (a block opened, a delta, a block closed); a whole reply ignores
    them and takes `message()` at the end.
    """

    def __init__(self, ident: ResponseIdentity, prompt_tokens: int) -> None:
        self.ident = ident
        self.prompt_tokens = prompt_tokens
        self.blocks: list[dict[str, Any]] = []
        self._open: Optional[str] = None  # "text" or "thinking" while that block takes deltas

    def start(self) -> list[Event]:
        # The pool's facts arrive with the first token; message_delta carries the final usage.
        message = self._message([], None, None, usage(self.prompt_tokens, 0, None))
        return [("message_start", {"type": "message_start", "message": message})]

    def add(self, delta: OutputDelta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning:
            events += self._text("thinking", delta.reasoning)
        if delta.content:
            events += self._text("text", delta.content)
        for call in delta.tool_calls:
            events += self._close()
            block = tool_use_block(call)
            index = len(self.blocks)
            self.blocks.append(block)
            events += [
                _event("content_block_start", index=index, content_block={**block, "input": {}}),
                _event(
                    "content_block_delta",
                    index=index,
                    delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)},
                ),
                _event("content_block_stop", index=index),
            ]
        return events

    def finish(self, finished: Finished) -> list[Event]:
        events = self.add(finished.delta) + self._close()
        reason, sequence = stop_reason(finished)
        events.append(
            _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=_usage(finished))
        )
        events.append(_event("message_stop"))
        return events

    def message(self, finished: Finished) -> dict[str, Any]:
        """The whole reply (after `finish`)."""
        reason, sequence = stop_reason(finished)
        return self._message(self.blocks, reason, sequence, _usage(finished))

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open != kind:
            events += self._close()
            if kind == "text":
                block = {"type": "text", "text": ""}
            else:  # signed by no one: clients send it back, and it is not checked
                block = {"type": "thinking", "thinking": "", "signature": ""}
            self.blocks.append(block)
            self._open = kind
            events.append(_event("content_block_start", index=len(self.blocks) - 1, content_block=dict(block)))
        self.blocks[-1][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}  # text_delta or thinking_delta
        events.append(_event("content_block_delta", index=len(self.blocks) - 1, delta=delta))
        return events

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", index=len(self.blocks) - 1)]

    def _message(
        self, content: list[dict[str, Any]], reason: Optional[str], sequence: Optional[str], usage_: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.ident.id,
            "type": "message",
            "role": "assistant",
            "model": self.ident.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage_,
        }


def _usage(finished: Finished) -> dict[str, Any]:
    return usage(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens)


def _event(kind: str, **fields: Any) -> Event:
    return kind, {"type": kind, **fields}


PING: Event = ("ping", {"type": "ping"})


# ----------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_status(error: ApiError) -> int:
    # A full queue is Anthropic's "overloaded" (which its clients retry), not a per-client rate limit.
    if isinstance(error, QueueFull):
        return 529
    if error.code == "request_too_large":  # OpenAI answers an oversize body with a 400, Anthropic with a 413
        return 413
    return error.status


def error_body(error: ApiError) -> dict[str, Any]:
    status = error_status(error)
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error_status(error),
        text=json.dumps(error_body(error)),
        content_type="application/json",
        headers=error.headers(),
    )

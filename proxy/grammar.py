"""Structured output: what a request's reply must match, as an llguidance grammar the worker decodes with.

Two kinds of constraint come from the APIs:
- `JsonOutput`: the reply is one JSON value of a schema (OpenAI `response_format` json_object /
  json_schema, Anthropic `output_config.format` / `output_format`);
- `ToolCallOutput`: the reply is one tool call, of one of the named tools, in the model family's
  own tool-call syntax (OpenAI `tool_choice` required / a named function, Anthropic `tool_choice`
  any / tool), so it is parsed back by the same tool parser as an unforced call.

The grammar is built here, with the model's tokenizer, and compiled once to check it (an
uncompilable schema is a 400 naming what llguidance refused, before the request queues); the
worker compiles the same text again and applies it as a logits mask. JSON is compact apart from
one space after ':' and ',' (as json.dumps writes it): flexible whitespace lets a weak model
emit whitespace until max_tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

from protocol.messages import Grammar, GrammarKind
from proxy.errors import InvalidRequest
from proxy.lru import LockedLRU

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class JsonOutput:
    schema: dict[str, Any]
    param: str  # the request field it came from, for errors


@dataclass(frozen=True)
class ToolCallOutput:
    names: tuple[str, ...]  # the tools the call may be of
    param: str = "tool_choice"


OutputConstraint = Union[JsonOutput, ToolCallOutput]


def openai_response_format(fmt: Any) -> Optional[JsonOutput]:
    """`response_format`: text (None), json_object, or json_schema {name, schema, strict}."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonOutput({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("response_format.json_schema must be an object", param="response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                                 param="response_format.json_schema.schema")  # fmt: skip
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise InvalidRequest("response_format.json_schema.strict must be a boolean",
                                 param="response_format.json_schema.strict")  # fmt: skip
        if schema is False:  # JSON Schema's "nothing is valid": no reply could keep to it
            raise InvalidRequest("response_format.json_schema.schema is false: no value satisfies it",
                                 param="response_format.json_schema.schema")  # fmt: skip
        # strict or not, the reply is decoded within the schema (true: any JSON value)
        return JsonOutput(schema if isinstance(schema, dict) else {}, "response_format.json_schema.schema")
    raise InvalidRequest('response_format type must be "text", "json_object" or "json_schema"', param="response_format")


def anthropic_output_format(body: dict[str, Any]) -> Optional[JsonOutput]:
    """`output_config.format` (or the older top-level `output_format`): {"type": "json_schema", "schema": ...}."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise InvalidRequest("output_config: must be an object", param="output_config")
    fmt, where = (config or {}).get("format"), "output_config.format"
    if fmt is None:
        fmt, where = body.get("output_format"), "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest(f'{where}: type must be "json_schema"', param=where)
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.schema: field required (a JSON schema object)", param=f"{where}.schema")
    return JsonOutput(schema, f"{where}.schema")


CHECKED_GRAMMARS = 1024  # digests of compiled grammars remembered
FORCEABLE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # OpenAI's and Anthropic's name rules, with . and :


def forced_tools(choice: Any, tools: Optional[list[dict[str, Any]]]) -> Optional[ToolCallOutput]:
    """A tool call the reply must be, from a checked OpenAI or Anthropic tool_choice; None when not forced."""
    if not tools:
        return None
    names = tuple(t["function"]["name"] for t in tools)
    forcing = choice == "required" or (isinstance(choice, dict) and choice.get("type") in ("any", "function", "tool"))
    for name in names if forcing else ():
        if not FORCEABLE_NAME.fullmatch(name):
            # The call's text is parsed back at the family's markers: a name holding one would split it.
            raise InvalidRequest(
                f"a tool call can be forced only for tools named with letters, digits, _ . : - "
                f"(at most 128 characters): {json.dumps(name)[:80]}",
                param="tool_choice",
            )
    if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "any"):
        return ToolCallOutput(names)
    if isinstance(choice, dict) and choice.get("type") == "function":
        return ToolCallOutput((choice["function"]["name"],))
    if isinstance(choice, dict) and choice.get("type") == "tool":
        return ToolCallOutput((choice["name"],))
    return None


# ----------------------------------------------------------------- grammars


def _json_rule(schema: dict[str, Any]) -> str:
    """A Lark `%json` item for `schema`, with our whitespace options (llguidance reads them from x-guidance)."""
    given = schema.get("x-guidance") or {}
    if not isinstance(given, dict):
        raise InvalidRequest("x-guidance in a schema must be an object of llguidance options", param="response_format")
    guided = {**schema, "x-guidance": {**JSON_OPTIONS, **given}}
    return f"%json {json.dumps(guided, ensure_ascii=False)}"


class GrammarBuilder:
    """Grammars for one model's tokenizer (mlx-lm's TokenizerWrapper); llguidance's tokenizer is built on first use."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper
        self._ll: Any = None
        self._lock = threading.Lock()
        self._checked = LockedLRU(CHECKED_GRAMMARS)  # digests of grammars that compiled: clients repeat schemas

    def grammar(
        self, constraint: OutputConstraint, tools: Optional[list[dict[str, Any]]], initial_state: str = "normal"
    ) -> Grammar:
        """The checked grammar of `constraint`; InvalidRequest (a 400) names what cannot be compiled."""
        import llguidance as llg

        from worker.grammar import GrammarError, check_grammar

        if isinstance(constraint, JsonOutput):
            body = _json_rule(constraint.schema)
        else:
            body = self._tool_call(constraint, tools or [])
        # A template that opened a think block: close it at once, so the JSON is the reply, not its reasoning.
        opening = self._literal(self.wrapper.think_end) + ' "\\n\\n" ' if initial_state == "reasoning" else ""
        lark = f"start: {opening}{body}\n"
        text = llg.LLMatcher.grammar_from_lark(lark)
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if self._checked.get(key, False):
            return Grammar(GrammarKind.LLGUIDANCE, text)  # a schema seen before: not compiled again
        try:
            check_grammar(text, self._tokenizer())
            self._checked.put(key, True)
        except GrammarError as exc:
            reason = str(exc).split("\n   1 | ")[0]  # llguidance quotes the grammar after its reason: not ours to show
            raise InvalidRequest(f"the schema cannot be used for constrained decoding: {reason}", param=constraint.param) from exc
        return Grammar(GrammarKind.LLGUIDANCE, text)

    def _tool_call(self, constraint: ToolCallOutput, tools: list[dict[str, Any]]) -> str:
        """The model family's tool-call syntax around {"name": ..., "arguments": ...} of an allowed tool."""
        parser = getattr(self.wrapper.tool_parser, "__module__", "") or ""
        start, end = self.wrapper.tool_call_start, self.wrapper.tool_call_end
        if not parser.endswith(".json_tools") or not start or not end:
            family = parser.rsplit(".", 1)[-1] or "none"
            raise InvalidRequest(
                f"tool_choice cannot force a call with this model's tool-call format ({family}); "
                "forcing is supported for JSON tool calls (<tool_call>{...}</tool_call>)",
                param=constraint.param,
            )
        parameters = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters[name]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in constraint.names
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return f'{self._literal(start)} "\\n" {_json_rule(schema)} "\\n" {self._literal(end)}'

    def _literal(self, text: str) -> str:
        """A marker as the model writes it: its own token when it is one, else its characters."""
        ids = self.wrapper.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return f"<[{int(ids[0])}]>"
        return json.dumps(text)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                from worker.grammar import ll_tokenizer

                self._ll = ll_tokenizer(self.wrapper)
            return self._ll

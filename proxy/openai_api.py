"""The OpenAI API surface: request bodies -> typed requests, and response builders.

Parsing is strict about types and ranges (a wrong one is a 400 naming the
parameter) and lenient about fields we have no use for (`user`, `metadata`,
`parallel_tool_calls`, ... are ignored). Settings we cannot honour (`n` above
MAX_CHOICES) are refused rather than silently ignored. JSON response formats and
a forced tool_choice become an output constraint (`proxy.grammar`) that decoding
keeps to.

`presence_penalty`, `frequency_penalty` and `logit_bias` mean what they mean to
mlx_lm.server (mlx-lm's own logits processors, `worker/sampling.py`): OpenAI's
ranges, but a penalty counts the last `*_context_size` tokens (default 20) of
prompt and output, as mlx-lm's do, not the whole output as OpenAI's do.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from protocol.messages import Grammar, Hello, SamplingParams
from proxy.errors import InvalidJson, InvalidRequest
from proxy.grammar import OutputConstraint, forced_tools, openai_response_format
from proxy.namespace import parse_cache_salt

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_TEMPERATURE = 2.0
MAX_CHOICES = 8  # n: each choice is a row of the worker's batch
MAX_PENALTY = 2.0  # presence_penalty, frequency_penalty: OpenAI's -2..2
MAX_LOGIT_BIAS = 100.0  # logit_bias values: OpenAI's -100..100
DEFAULT_PENALTY_CONTEXT = 20  # mlx_lm.server's *_context_size
MAX_PENALTY_CONTEXT = 1 << 24  # tokens a penalty may look back at (mlx-lm slices with 32-bit indices)
SEED_RANGE = (-(2**63), 2**64 - 1)  # int64 as OpenAI documents it, and uint64 as MLX takes it
MAX_JSON_DEPTH = 100
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

_MISSING = object()


# ----------------------------------------------------------------- typed requests


@dataclass(frozen=True)
class GenerationOptions:
    """What every generating endpoint shares."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = -1  # -1: no logprobs; 0: the chosen token only; n: n alternatives
    stream: bool = False
    include_usage: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_context_size: int = DEFAULT_PENALTY_CONTEXT
    presence_context_size: int = DEFAULT_PENALTY_CONTEXT
    frequency_context_size: int = DEFAULT_PENALTY_CONTEXT
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    n: int = 1  # choices: the same prompt generated n times (proxy.choices)
    grammar: Optional[Grammar] = None  # the reply's constraint, compiled for the model (proxy.grammar)

    def sampling(self, stop_token_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            stop_token_ids=list(stop_token_ids),
            top_logprobs=self.top_logprobs,
            # MLX seeds are unsigned 64-bit; a negative (int64) seed maps onto one deterministically.
            seed=None if self.seed is None else self.seed % 2**64,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            presence_context_size=self.presence_context_size,
            frequency_penalty=self.frequency_penalty,
            frequency_context_size=self.frequency_context_size,
            logit_bias_ids=[token for token, _ in self.logit_bias],
            logit_bias_values=[bias for _, bias in self.logit_bias],
            grammar=self.grammar,
        )


@dataclass(frozen=True)
class ChatRequest:
    model: Optional[str]
    messages: list[dict[str, Any]]
    options: GenerationOptions
    tools: Optional[list[dict[str, Any]]] = None
    parse_tools: bool = False  # tools given and tool_choice is not "none"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    cache_salt: Optional[str] = None  # splits the cache namespace further (proxy.namespace)
    constraint: Optional[OutputConstraint] = None  # what the reply must match (JSON, a forced tool call)


@dataclass(frozen=True)
class CompletionRequest:
    model: Optional[str]
    prompt: Union[str, list[int]]
    options: GenerationOptions
    cache_salt: Optional[str] = None


# ----------------------------------------------------------------- parsing


# A lone surrogate can only come in as a \uD800-\uDFFF escape: the raw body is valid UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"the request body is not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidJson("the request body is nested too deeply") from exc
    if not isinstance(body, dict):
        raise InvalidJson("the request body must be a JSON object")
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        # Copying or rendering it would exhaust Python's recursion limit.
        raise InvalidJson(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            # A tokenizer cannot encode it, and the reply could not be encoded either.
            raise InvalidJson("the request body holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)") from exc
    return body


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Do containers nest more than `limit` levels (the value itself the first)? A walk level by level."""
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        children: list[Any] = []
        for node in level:
            items = node.values() if isinstance(node, dict) else node
            children.extend(v for v in items if isinstance(v, (dict, list)))
        level, depth = children, depth + 1
    return False


def requested_model(body: dict[str, Any]) -> Optional[str]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model")
    return model


def parse_chat_request(body: dict[str, Any], default_max_tokens: int) -> ChatRequest:
    messages = body.get("messages", _MISSING)
    if messages is _MISSING:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    tools = _optional(body, "tools", list)
    if tools is not None:
        for i, tool in enumerate(tools):
            _check_tool(tool, f"tools[{i}]")
    tools = tools or None
    tool_choice = body.get("tool_choice")
    _check_tool_choice(tool_choice, tools)
    if tool_choice == "none":
        tools = None
    template_kwargs = check_template_kwargs(_optional(body, "chat_template_kwargs", dict) or {})

    max_tokens = _first_int(body, ("max_completion_tokens", "max_tokens"), default_max_tokens)
    top_logprobs = -1
    if _optional(body, "logprobs", bool):
        top_logprobs = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    json_output = openai_response_format(body.get("response_format"))
    return ChatRequest(
        model=requested_model(body),
        messages=messages,
        options=_options(body, max_tokens, top_logprobs),
        tools=tools,
        parse_tools=tools is not None,
        template_kwargs=template_kwargs,
        cache_salt=parse_cache_salt(body),
        constraint=forced_tools(tool_choice, tools) or json_output,  # a forced call is the whole reply
    )


# apply_chat_template's own parameters, and what the template reads besides the request's own
# variables: a client may set template variables, never the template, its tokenizing or the
# special tokens it writes.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "conversation", "messages", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens", "raise_exception", "strftime_now", "date_string",
})  # fmt: skip
MAX_TEMPLATE_KWARG_CHARS = 1000


def check_template_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`chat_template_kwargs`: plain template variables (enable_thinking, reasoning_effort, ...) with scalar values."""
    for key, value in kwargs.items():
        where = f"chat_template_kwargs.{key}"
        if not key.isidentifier() or key in RESERVED_TEMPLATE_KWARGS:
            raise InvalidRequest(f"chat_template_kwargs may not set {key[:40]!r}", param=where)
        if isinstance(value, str):
            if len(value) > MAX_TEMPLATE_KWARG_CHARS:
                raise InvalidRequest(f"{where} is longer than {MAX_TEMPLATE_KWARG_CHARS} characters", param=where)
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise InvalidRequest(f"{where} must be a string, number, boolean or null", param=where)
    return kwargs


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise InvalidRequest("each message must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidRequest("each message needs a string role", param=f"{where}.role")
    if role not in ROLES:
        raise InvalidRequest(
            f"unknown role {role[:40]!r}; expected one of {', '.join(sorted(ROLES))}", param=f"{where}.role"
        )
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise InvalidRequest(
            "content must be a string, an array of content parts, or null", param=f"{where}.content"
        )
    for text_field in ("name", "reasoning_content", "reasoning", "tool_call_id"):
        if message.get(text_field) is not None and not isinstance(message[text_field], str):
            raise InvalidRequest(f"{text_field} must be a string", param=f"{where}.{text_field}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(
            isinstance(call, dict) and isinstance(call.get("function"), dict) for call in tool_calls
        ):
            raise InvalidRequest(
                "tool_calls must be an array of {type, id, function: {name, arguments}} objects",
                param=f"{where}.tool_calls",
            )


def _check_tool(tool: Any, where: str) -> None:
    """A function tool whose parameters, if given, are a JSON schema object."""
    if not isinstance(tool, dict):
        raise InvalidRequest("each tool must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise InvalidRequest("only tools of type function are supported", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest("a tool needs a function object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("a function needs a non-empty string name", param=f"{where}.function.name")
    if function.get("description") is not None and not isinstance(function["description"], str):
        raise InvalidRequest("description must be a string", param=f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise InvalidRequest("parameters must be a JSON schema object", param=f"{where}.function.parameters")
        _check_schema(parameters, f"{where}.function.parameters")


def _check_tool_choice(tool_choice: Any, tools: Optional[list[dict[str, Any]]]) -> None:
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if isinstance(tool_choice, str):
        if tool_choice != "required":
            raise InvalidRequest("tool_choice must be none, auto, required or a function", param="tool_choice")
    elif isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequest('tool_choice must be {"type": "function", "function": {"name": ...}}', param="tool_choice")
        names = {t["function"]["name"] for t in tools or ()}
        if function.get("name") not in names:
            raise InvalidRequest("tool_choice names a function that is not among the tools", param="tool_choice")
    else:
        raise InvalidRequest("tool_choice must be a string or an object", param="tool_choice")
    if not tools:
        raise InvalidRequest("tool_choice is only allowed when tools are given", param="tool_choice")


_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames")
MAX_SCHEMA_DEPTH = 32


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """The structure of a JSON schema: the keywords a template or a parser will read have the right shapes."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object or a boolean", param=where)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param=where)
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in _SCHEMA_TYPES for k in kinds):
            raise InvalidRequest(
                f"type must be one of {', '.join(sorted(_SCHEMA_TYPES))} (or an array of them)", param=f"{where}.type"
            )
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise InvalidRequest("required must be an array of property names", param=f"{where}.required")
    if schema.get("enum") is not None and not isinstance(schema["enum"], list):
        raise InvalidRequest("enum must be an array", param=f"{where}.enum")
    for key in _SCHEMA_MAPS:
        value = schema.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise InvalidRequest(f"{key} must be an object of schemas", param=f"{where}.{key}")
        for name, sub in value.items():
            _check_schema(sub, f"{where}.{key}.{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        value = schema.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise InvalidRequest(f"{key} must be a non-empty array of schemas", param=f"{where}.{key}")
        for i, sub in enumerate(value):
            _check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    for key in _SCHEMA_ONE:
        value = schema.get(key)
        if value is None:
            continue
        subs = value if key == "items" and isinstance(value, list) else [value]  # draft-4 tuple items
        for sub in subs:
            _check_schema(sub, f"{where}.{key}", depth + 1)


def check_model_limits(options: GenerationOptions, hello: Optional[Hello]) -> None:
    """What only the model decides: top_k must leave some of the vocabulary out; logit_bias names its tokens."""
    vocab = hello.vocab_size if hello is not None else 0
    if vocab and options.top_k >= vocab:
        raise InvalidRequest(f"top_k must be below the vocabulary size {vocab} (0 turns it off)", param="top_k")
    bad = next((token for token, _ in options.logit_bias if vocab and token >= vocab), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias: token id {bad} is not below the vocabulary size {vocab}", param="logit_bias")


def parse_completion_request(body: dict[str, Any], default_max_tokens: int) -> CompletionRequest:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING:
        raise InvalidRequest("prompt is required", param="prompt")
    prompt = _single_prompt(prompt)
    max_tokens = _first_int(body, ("max_tokens",), default_max_tokens)
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        top_logprobs = -1
    elif isinstance(logprobs, int) and not isinstance(logprobs, bool) and 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        top_logprobs = logprobs
    else:
        raise InvalidRequest(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}", param="logprobs")
    if body.get("echo"):
        raise InvalidRequest("echo is not supported", param="echo")
    if body.get("suffix"):
        raise InvalidRequest("suffix is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("best_of must be 1", param="best_of")
    return CompletionRequest(
        model=requested_model(body),
        prompt=prompt,
        options=_options(body, max_tokens, top_logprobs),
        cache_salt=parse_cache_salt(body),
    )


def _single_prompt(prompt: Any) -> Union[str, list[int]]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(t < 0 for t in prompt):
                raise InvalidRequest("token ids must be >= 0", param="prompt")
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return _single_prompt(prompt[0])
        raise InvalidRequest("only one prompt per request is supported", param="prompt")
    raise InvalidRequest("prompt must be a string or a non-empty array of token ids", param="prompt")


def _options(body: dict[str, Any], max_tokens: int, top_logprobs: int) -> GenerationOptions:
    stream = _optional(body, "stream", bool) or False
    stream_options = _optional(body, "stream_options", dict) or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest("stream_options.include_usage must be a boolean", param="stream_options")
    repetition_penalty = _float(body, "repetition_penalty", 1.0, 0.0, None)
    seed = _int(body, "seed", None, *SEED_RANGE)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise InvalidRequest("top_p must be greater than 0 and at most 1", param="top_p")
    return GenerationOptions(
        max_tokens=max_tokens,
        # mlx_lm.server's default temperature (greedy), not OpenAI's 1.0.
        temperature=_float(body, "temperature", 0.0, 0.0, MAX_TEMPERATURE),
        top_p=top_p,
        top_k=_int(body, "top_k", 0, 0, None),
        min_p=_float(body, "min_p", 0.0, 0.0, 1.0),
        # mlx_lm.server treats 0 as "off"; the worker's "off" is 1.0.
        repetition_penalty=repetition_penalty or 1.0,
        seed=seed,
        stop=_stop(body.get("stop")),
        top_logprobs=top_logprobs,
        stream=stream,
        include_usage=include_usage,
        presence_penalty=_float(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        repetition_context_size=_int(body, "repetition_context_size", DEFAULT_PENALTY_CONTEXT, 1, MAX_PENALTY_CONTEXT),
        presence_context_size=_int(body, "presence_context_size", DEFAULT_PENALTY_CONTEXT, 1, MAX_PENALTY_CONTEXT),
        frequency_context_size=_int(body, "frequency_context_size", DEFAULT_PENALTY_CONTEXT, 1, MAX_PENALTY_CONTEXT),
        logit_bias=_logit_bias(body.get("logit_bias")),
        n=_int(body, "n", 1, 1, MAX_CHOICES),
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map (JSON keys are strings) -> (id, bias) pairs."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise InvalidRequest(f"logit_bias[{key}] must be a number", param="logit_bias")
        if abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(
                f"logit_bias[{key}] must be from -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}", param="logit_bias"
            )
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return tuple(s for s in value if s)
    raise InvalidRequest("stop must be a string or an array of strings", param="stop")


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidRequest(f"{name} must be of type {_TYPE_NAMES.get(kind, kind.__name__)}", param=name)
    return value


_TYPE_NAMES = {list: "array", dict: "object", bool: "boolean", str: "string"}


def _float(body: dict[str, Any], name: str, default: float, lo: Optional[float], hi: Optional[float]) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number", param=name)
    _range(name, value, lo, hi)
    return float(value)


def _int(body: dict[str, Any], name: str, default: Any, lo: Optional[int], hi: Optional[int]) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", param=name)
    _range(name, value, lo, hi)
    return value


def _first_int(body: dict[str, Any], names: Sequence[str], default: int) -> int:
    for name in names:
        if body.get(name) is not None:
            return _int(body, name, default, 1, None)
    return default


def _range(name: str, value: float, lo: Optional[float], hi: Optional[float]) -> None:
    if lo is not None and value < lo:
        raise InvalidRequest(f"{name} must be at least {lo}", param=name)
    if hi is not None and value > hi:
        raise InvalidRequest(f"{name} must be at most {hi}", param=name)


# ----------------------------------------------------------------- responses


@dataclass(frozen=True)
class TokenLogprobView:
    """One generated token's logprob, already turned into text."""

    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chat_logprobs(entries: Sequence[TokenLogprobView]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(e.text.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in e.top
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[TokenLogprobView], text_offset: int = 0) -> dict[str, Any]:
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


@dataclass
class ResponseIdentity:
    """What every chunk of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = "mlx-cache-proxy"

    def envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


# Where reasoning goes in messages and deltas (--reasoning-field): mlx_lm.server and newer vLLM
# write "reasoning", DeepSeek's API, older vLLM and chat templates "reasoning_content".
REASONING_FIELDS: dict[str, tuple[str, ...]] = {
    "both": ("reasoning", "reasoning_content"),
    "reasoning": ("reasoning",),
    "reasoning_content": ("reasoning_content",),
}
DEFAULT_REASONING_FIELD = "both"


def reasoning_fields(reasoning: str, choice: str = DEFAULT_REASONING_FIELD) -> dict[str, str]:
    return {name: reasoning for name in REASONING_FIELDS[choice]} if reasoning else {}


def chat_message(
    content: str, reasoning: str, tool_calls: list[dict[str, Any]], reasoning_field: str = DEFAULT_REASONING_FIELD
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    message.update(reasoning_fields(reasoning, reasoning_field))
    if tool_calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
    return message


def chat_completion(
    ident: ResponseIdentity,
    message: dict[str, Any],
    finish_reason: str,
    usage_: dict[str, Any],
    logprobs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    out = ident.envelope("chat.completion")
    out["choices"] = [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}]
    out["usage"] = usage_
    return out


def chat_chunk(
    ident: ResponseIdentity,
    delta: dict[str, Any],
    finish_reason: Optional[str] = None,
    logprobs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    out = ident.envelope("chat.completion.chunk")
    out["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    return out


def text_completion(
    ident: ResponseIdentity,
    text: str,
    finish_reason: str,
    usage_: dict[str, Any],
    logprobs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    out = ident.envelope("text_completion")
    out["choices"] = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    out["usage"] = usage_
    return out


def text_chunk(
    ident: ResponseIdentity,
    text: str,
    finish_reason: Optional[str] = None,
    logprobs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    out = ident.envelope("text_completion")
    out["choices"] = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    return out


def usage_chunk(ident: ResponseIdentity, obj: str, usage_: dict[str, Any]) -> dict[str, Any]:
    out = ident.envelope(obj)
    out["choices"] = []
    out["usage"] = usage_
    return out


def model_list(model_ids: Sequence[str], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": "mlx-cache-proxy"} for m in model_ids],
    }

"""The stricter checks on request bodies: roles, ranges, seeds, tool schemas, odd JSON."""

from __future__ import annotations

import json

import pytest

from proxy import openai_api as api
from proxy.errors import InvalidJson, InvalidRequest
from tests.unit.test_openai_validation import bad_param, chat
from tests.unit.test_worker_client import HELLO  # vocab_size 100

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def tool(**function):
    return [{"type": "function", "function": {"name": "f", **function}}]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name"),
        ({"messages": [{"role": "assistant", "tool_calls": "call it"}]}, "messages[0].tool_calls"),
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": tool(name="")}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
        ({"tools": tool(description=5)}, "tools[0].function.description"),
        ({"tools": tool(parameters=[])}, "tools[0].function.parameters"),
        ({"tools": tool(parameters={"type": "dict"})}, "tools[0].function.parameters.type"),
        ({"tools": tool(parameters={"type": ["string", 3]})}, "tools[0].function.parameters.type"),
        ({"tools": tool(parameters={"required": "a"})}, "tools[0].function.parameters.required"),
        ({"tools": tool(parameters={"enum": "a"})}, "tools[0].function.parameters.enum"),
        ({"tools": tool(parameters={"properties": {"a": 5}})}, "tools[0].function.parameters.properties.a"),
        ({"tools": tool(parameters={"anyOf": []})}, "tools[0].function.parameters.anyOf"),
        ({"tools": tool(parameters={"items": {"type": "nope"}})}, "tools[0].function.parameters.items.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": 3}, "tool_choice"),
    ],
)
def test_invalid(fields, param):
    assert bad_param(chat, **fields) == param


def test_valid_tools_and_schemas_pass():
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "where"},
            "days": {"type": ["integer", "null"], "minimum": 1},
            "units": {"enum": ["c", "f"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/point"}]},
        },
        "required": ["city"],
        "additionalProperties": False,
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    tools = tool(description="weather", parameters=parameters)
    req = chat(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    assert req.tools == tools and req.parse_tools
    assert chat(tools=tools, tool_choice="required").parse_tools


@pytest.mark.parametrize("role", sorted(api.ROLES))
def test_every_openai_role_is_accepted(role):
    assert chat(messages=[{"role": role, "content": "x"}]).messages[0]["role"] == role


def test_ranges_at_their_edges_are_accepted():
    options = chat(temperature=2, top_p=1, min_p=1, top_k=0, seed=2**64 - 1).options
    assert (options.temperature, options.top_p, options.min_p) == (2.0, 1.0, 1.0)


def test_a_negative_seed_maps_onto_an_unsigned_one():
    assert chat(seed=-1).options.sampling([]).seed == 2**64 - 1
    assert chat(seed=5).options.sampling([]).seed == 5
    assert chat().options.sampling([]).seed is None


def test_top_k_must_leave_part_of_the_vocabulary_out():
    api.check_model_limits(chat(top_k=99).options, HELLO)
    api.check_model_limits(chat(top_k=0).options, HELLO)
    api.check_model_limits(chat(top_k=10**6).options, None)  # no Hello yet: nothing to check against
    with pytest.raises(InvalidRequest) as info:
        api.check_model_limits(chat(top_k=100).options, HELLO)
    assert info.value.param == "top_k" and "100" in info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": "\\udc00"}',  # a lone low surrogate
        b'{"a": ["\\ud83d"]}',  # a high surrogate without its pair
        b'{"x": ' + b"[" * 150 + b"]" * 150 + b"}",  # parses, but nests too deep to handle
        b'{"x": ' + b"[" * 50000 + b"]" * 50000 + b"}",  # too deep for the parser itself
        b'{"content": "caf\xe9"}',  # Latin-1, not UTF-8
    ],
)
def test_bodies_the_service_cannot_handle_are_invalid_json(raw):
    with pytest.raises(InvalidJson):
        api.parse_json_body(raw)


def test_escaped_text_that_only_looks_like_a_surrogate_is_fine():
    assert api.parse_json_body(b'{"a": "\\\\ud800", "b": "\\ud83d\\ude00"}') == {"a": "\\ud800", "b": "\U0001f600"}
    assert api.parse_json_body(json.dumps({"x": [[[[1]]]]}).encode()) == {"x": [[[[1]]]]}

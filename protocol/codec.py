"""msgpack encoding of `protocol.messages`: explicit tag, explicit version, no pickle.

A frame is a msgpack map `{"v": PROTOCOL_VERSION, "kind": KIND, "body": {...}}`.
Decoding checks the version and the kind first, then builds the typed record
field by field from its type hints; anything unexpected raises `ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from enum import Enum
from typing import Any, Union

import msgpack

from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


_BY_KIND: dict[str, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}


def encode(message: Message) -> bytes:
    if _BY_KIND.get(getattr(type(message), "KIND", None)) is not type(message):
        raise ProtocolError(f"not a protocol message: {type(message).__name__}")
    frame = {"v": PROTOCOL_VERSION, "kind": message.KIND, "body": _to_plain(message)}
    return msgpack.packb(frame, use_bin_type=True)


def decode(data: bytes) -> Message:
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(frame, dict) or not {"v", "kind", "body"} <= frame.keys():
        raise ProtocolError("frame is not a {v, kind, body} map")
    if frame["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {frame['v']!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    cls = _BY_KIND.get(frame["kind"])
    if cls is None:
        raise ProtocolError(f"unknown message kind {frame['kind']!r}")
    return _from_plain(cls, frame["body"])


def frame_version(data: bytes) -> Any:
    """The version field of a frame, without decoding the rest (for handshake errors)."""
    try:
        frame = msgpack.unpackb(data, raw=False)
        return frame.get("v") if isinstance(frame, dict) else None
    except Exception:
        return None


# ----------------------------------------------------------------- plain <-> typed


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        if _all_ints(value):
            return value  # token ids: msgpack packs them as they are (no per-item walk)
        return [_to_plain(v) for v in value]
    return value


def _all_ints(values: Any) -> bool:
    """A list of plain ints (not bools), checked at C speed: a prompt's 100K token ids cost ~1 ms."""
    return all(map(int.__instancecheck__, values)) and not any(map(bool.__instancecheck__, values))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_plain(cls: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__}: body is not a map")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = body.keys() - names
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, raw in body.items():
        kwargs[name] = _convert(hints[name], raw, f"{cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ProtocolError(f"{cls.__name__}: {exc}") from exc


def _convert(tp: Any, raw: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, raw, where)
    if origin is list:
        if not isinstance(raw, list):
            raise ProtocolError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        if item is int:
            if not _all_ints(raw):
                raise ProtocolError(f"{where}: expected a list of int")
            return raw
        return [_convert(item, v, where) for v in raw]
    if dataclasses.is_dataclass(tp):
        return _from_plain(tp, raw)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(raw)
        except ValueError as exc:
            raise ProtocolError(f"{where}: {exc}") from exc
    if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if tp in (int, float, str, bool) and not (isinstance(raw, tp) and (tp is bool or not isinstance(raw, bool))):
        raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(raw).__name__}")
    return raw

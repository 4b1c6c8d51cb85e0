"""Strict msgpack encoding: version tag, known fields only, size caps, no extension types.

`decode` is the single entry point for bytes from a peer: it returns a valid message or raises
a `RemoteProtocolError` subclass (never anything else — fuzz-tested).
"""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from functools import cache
from typing import Any, TypeVar

import msgpack

from ._errors import DecodeError, LocalProtocolError, OversizeError
from ._ids import PROTOCOL_VERSION
from ._limits import MAX_FRAME
from ._messages import MESSAGE_TYPES, Message

__all__ = ["decode", "encode"]

M = TypeVar("M", bound=Message)


@cache
def _schema(cls: type[Message]) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in fields(cls))  # type: ignore[arg-type]


@cache
def _defaults(cls: type[Message]) -> dict[str, Any]:
    """The defaults of `cls.OPTIONAL` fields (what an absent optional field decodes to)."""
    return {f.name: f.default for f in fields(cls) if f.name in cls.OPTIONAL}  # type: ignore[arg-type]


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        skip = _defaults(type(value))
        return {name: _to_wire(getattr(value, name)) for name, _ in _schema(type(value))
                if name not in skip or getattr(value, name) != skip[name]}
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """Encode a message with its version and type tag."""
    if type(msg).TYPE not in MESSAGE_TYPES:
        raise LocalProtocolError(f"not a protocol message: {type(msg).__name__}")
    wire = {"v": PROTOCOL_VERSION, "t": msg.TYPE, "f": _to_wire(msg)}
    return msgpack.packb(wire, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} not allowed")


def _convert(value: Any, typ: Any, where: str) -> Any:
    """Check a decoded msgpack value against a field's annotated type, converting containers."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(typ)
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected array, got {type(value).__name__}")
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(typ, type) and issubclass(typ, Message):
        return _build(typ, value, where)
    if typ is float:
        # msgpack may carry an int where a float is meant (e.g. 0); bools are not numbers here.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise DecodeError(f"{where}: NaN or infinity")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if typ in (str, bytes, bool):
        if type(value) is not typ:
            raise DecodeError(f"{where}: expected {typ.__name__}, got {type(value).__name__}")
        return value
    raise LocalProtocolError(f"{where}: unsupported field type {typ!r}")


def _build(cls: type[M], raw: Any, where: str) -> M:
    if not isinstance(raw, dict):
        raise DecodeError(f"{where}: expected map for {cls.TYPE}")
    schema = _schema(cls)
    names = {name for name, _ in schema}
    optional = _defaults(cls)
    if not set(raw) <= names or not names - set(optional) <= set(raw):
        missing, extra = names - set(optional) - set(raw), set(raw) - names
        raise DecodeError(f"{where}: {cls.TYPE} missing {sorted(missing)} / unknown {sorted(map(str, extra))}")
    kwargs = {name: _convert(raw[name], typ, f"{where}.{name}") for name, typ in schema if name in raw}
    try:
        return cls(**kwargs)
    except LocalProtocolError as exc:
        raise DecodeError(str(exc)) from exc


def decode(
    data: bytes, expect: type[M] | tuple[type[Message], ...] | None = None, *, max_size: int = MAX_FRAME
) -> M:
    """Decode bytes from a peer into a message, optionally of one expected type.

    Raises:
        OversizeError: `data` is larger than `max_size` (checked before unpacking).
        DecodeError: anything else wrong — bad msgpack, version, type, fields or values.
    """
    if len(data) > max_size:
        raise OversizeError(f"message of {len(data)} bytes exceeds cap {max_size}")
    try:
        wire = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_ext_hook,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=65_536,
            max_map_len=64,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(wire, dict) or set(wire) != {"v", "t", "f"}:
        raise DecodeError("not a KNEXA message envelope")
    if wire["v"] != PROTOCOL_VERSION or isinstance(wire["v"], bool):
        raise DecodeError(f"unsupported protocol version {wire['v']!r}")
    cls = MESSAGE_TYPES.get(wire["t"]) if isinstance(wire["t"], str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {wire['t']!r}")
    allowed = expect if isinstance(expect, tuple) else (expect,) if expect is not None else None
    if allowed is not None and cls not in allowed:
        raise DecodeError(f"expected {'/'.join(t.TYPE for t in allowed)}, got {cls.TYPE}")
    return _build(cls, wire["f"], cls.TYPE)  # type: ignore[return-value]

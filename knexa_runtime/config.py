"""TOML config files -> frozen dataclasses, with `--set table.key=value` overrides.

One loader for both daemons and the lab (Flower's habit): defaults live only in the dataclasses;
a file overrides them; flags override the file. Unknown keys and wrong types are all collected
into one `ConfigError` so a user fixes everything in one go.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "dump_config", "load_config", "parse_overrides", "to_toml_dict"]

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem found."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `a.b=value` strings; the value is read as TOML (so types match), else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects table.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _coerce(value: Any, typ: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table")
            return None
        return _build(typ, value, where, errors)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list")
            return None
        (inner, *_) = typing.get_args(typ) or (Any,)
        return tuple(_coerce(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], where, errors)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is Path:
        if not isinstance(value, (str, Path)):
            errors.append(f"{where}: expected a path string")
        return Path(value)
    if typ in (int, float, str, bool):
        if type(value) is not typ:
            errors.append(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], where: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            errors.append(f"{where + '.' if where else ''}{key}: unknown setting (known: {', '.join(sorted(names))})")
    kwargs = {
        k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}", errors)
        for k, v in data.items()
        if k in names
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where or 'config'}: {exc}")
        return None  # type: ignore[return-value]


def load_config(cls: type[T], path: Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults < TOML file at `path` < `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    data = _merge(data, overrides or {})
    errors: list[str] = []
    cfg = _build(cls, data, "", errors)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def to_toml_dict(cfg: Any) -> dict[str, Any]:
    """The effective config as plain data (for logging and saving beside state)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


def dump_config(cfg: Any) -> str:
    """The effective config as TOML text that `load_config` reads back (None values omitted)."""
    import tomli_w

    def drop_none(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: drop_none(x) for k, x in v.items() if x is not None}
        return v

    return tomli_w.dumps(drop_none(to_toml_dict(cfg)))

"""Human-readable rendering of a daemon's `status` answer (the JSON stays the API)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["format_status", "print_status"]

_ORDER = ("daemon", "health", "peer", "federation", "model", "policy", "round", "completed", "phase",
          "uptime_s", "peers", "metrics_port")


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
    return "-" if value is None else str(value)


def format_status(answer: dict[str, Any]) -> str:
    keys = [k for k in _ORDER if k in answer] + sorted(k for k in answer if k not in _ORDER and k != "last_rounds")
    width = max(len(k) for k in keys) if keys else 0
    lines = [f"{k.ljust(width)}  {_fmt(answer[k])}" for k in keys]
    rounds = answer.get("last_rounds") or []
    if rounds:
        lines.append("last rounds:")
        for r in rounds:
            lines.append("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    return "\n".join(lines)


def print_status(state_dir_of: Callable[[], Path], *, as_json: bool, prog: str, error_code: int) -> int:
    """`<daemon> status`: ask the daemon over its control socket and print the answer.

    ``state_dir_of`` resolves the state directory (from a flag or the config file) and may raise
    ConfigError; it and every control-socket failure become one line on stderr and ``error_code``.
    """
    from .config import ConfigError
    from .control import CONTROL_SOCKET, ControlError, query

    try:
        answer = query(Path(state_dir_of()) / CONTROL_SOCKET)
    except (ControlError, ConfigError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return error_code
    print(json.dumps(answer, indent=2) if as_json else format_status(answer))
    return 0

"""The CPM's persistent state: one msgpack snapshot, written atomically after every change.

A kill -9 at any instant leaves either the previous snapshot or the new one on disk, so a
restarted `knexa-cpm serve` resumes with the exact bandit and round state it had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from knexa_runtime.atomic import atomic_write_bytes

from .errors import StateError

__all__ = ["STATE_FILE", "load_state", "save_state"]

STATE_FILE = "cpm-state.msgpack"
STATE_VERSION = 1


def save_state(state_dir: Path, state: dict[str, Any]) -> None:
    payload = msgpack.packb({"version": STATE_VERSION, **state}, use_bin_type=True)
    atomic_write_bytes(state_dir / STATE_FILE, payload, mode=0o600)


def load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except Exception as exc:
        raise StateError(f"{path}: unreadable state ({exc}); move it away to start fresh") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise StateError(f"{path}: unsupported state version")
    return state

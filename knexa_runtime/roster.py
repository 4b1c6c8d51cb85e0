"""The federation roster file: which peer ids belong, with optional names and addresses.

TOML, so operators can comment it::

    [[peer]]
    id = "12D3KooW..."                       # base58 Ed25519 peer id (required)
    name = "acme"                            # shown in logs and `status`
    addr = "/dns4/acme.example/tcp/4002/p2p/12D3KooW..."   # optional: a node dials it

Both daemons read it at start and again on SIGHUP, so a new member joins a running federation
by adding a line and reloading.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import base58

__all__ = ["RosterEntry", "RosterError", "load_roster", "peer_id_ok"]

_ED25519_PREFIX = b"\x00\x24\x08\x01\x12\x20"


class RosterError(ValueError):
    """The roster file is missing or malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class RosterEntry:
    id: str
    name: str = ""
    addr: str = ""


def peer_id_ok(peer_id: str) -> bool:
    """True for a base58 Ed25519 libp2p peer id (the only kind KNEXA identities use)."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        return False
    return len(raw) == 38 and raw.startswith(_ED25519_PREFIX)


def load_roster(path: Path) -> list[RosterEntry]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise RosterError(f"roster file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RosterError(f"{path}: invalid TOML: {exc}") from exc
    peers = data.get("peer", [])
    if not isinstance(peers, list):
        raise RosterError(f"{path}: expected [[peer]] tables")
    out: list[RosterEntry] = []
    problems: list[str] = []
    for i, p in enumerate(peers):
        if not isinstance(p, dict) or not isinstance(p.get("id"), str):
            problems.append(f"peer[{i}]: needs id = \"<peer id>\"")
            continue
        unknown = sorted(set(p) - {"id", "name", "addr"})
        if unknown:
            problems.append(f"peer[{i}]: unknown keys {unknown}")
        if not peer_id_ok(p["id"]):
            problems.append(f"peer[{i}]: {p['id']!r} is not an Ed25519 peer id")
        addr = p.get("addr", "")
        if addr and not str(addr).endswith("/p2p/" + p["id"]):
            problems.append(f"peer[{i}]: addr must end with /p2p/{p['id']}")
        out.append(RosterEntry(p["id"], str(p.get("name", "")), str(addr)))
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):
        problems.append("duplicate peer ids")
    if problems:
        raise RosterError(f"{path}: " + "; ".join(problems))
    return out

"""The federation's public sets (transfer X_u + test), versioned in the CPM's state directory.

Every member must answer the same transfer prompts and be scored on the same test problems, or
distillation pairs answers with the wrong prompts and Pass@1 numbers stop being comparable. So
the operator publishes them through the CPM (`knexa-cpm public-set add`), the CPM announces the
current version's digest (a signed `PublicSetAnnounce`) and serves the bundle in chunks over
`PUBLIC_SET_PROTOCOL`; nodes fetch it when they lack it and refuse to run rounds on any other.

Layout (``STATE_DIR/public-sets/``), every file written atomically::

    index.json              [{version, digest, size, test, transfer, published_at, sources}, ...]
    v0001.bundle            the canonical bundle bytes (protocol._public_set) of version 1
    v0002.bundle            ...

The last entry of ``index.json`` is current. A version is never changed or removed: publishing
new problems is a new version, and since the digest covers the version, results of rounds run
on different versions cannot be mixed up (nodes tag every round with it; the CPM records from
which round on each version was announced in its stats).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from knexa_runtime.atomic import atomic_write_bytes, atomic_write_json
from protocol import (
    LocalProtocolError,
    PublicSetAnnounce,
    PublicSetChunk,
    PublicSetFetch,
    PublicSetQuery,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Signed,
    bundle_digest,
    decode,
    decode_bundle,
    encode,
    encode_bundle,
    open_signed,
    sign,
)
from protocol._limits import BUNDLE_CHUNK, FRAME_CAPS

__all__ = ["PublicSet", "PublicSetError", "PublicSetStore", "configure_parser", "run", "serve_public_set"]

logger = logging.getLogger("knexa_cpm")
FOLDER = "public-sets"
INDEX = "index.json"
READ_TIMEOUT_S = 10.0
#: a fetch that takes longer (a reader stalling Yamux's flow control) is cut off
SEND_TIMEOUT_S = 300.0


class PublicSetError(Exception):
    """A public set cannot be published or read (bad input file, identical content, corrupt store)."""


@dataclass(frozen=True, slots=True)
class PublicSet:
    """The current version: its announcement fields and its bytes (served in chunks)."""

    version: int
    digest: bytes
    data: bytes
    published_at: float
    test: int
    transfer: int

    @property
    def label(self) -> str:
        return f"v{self.version} ({self.digest.hex()[:12]})"


def _read_problems(path: Path, name: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PublicSetError(f"{path}:{lineno}: bad JSON ({exc.msg})") from exc
    except OSError as exc:
        raise PublicSetError(f"--{name} {path}: {exc.strerror or exc}") from exc
    return rows


class PublicSetStore:
    """Versions of the public set under ``state_dir/public-sets``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / FOLDER

    def index(self) -> list[dict[str, Any]]:
        path = self.root / INDEX
        if not path.exists():
            return []
        try:
            entries = json.loads(path.read_text())
        except ValueError as exc:
            raise PublicSetError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(entries, list):
            raise PublicSetError(f"{path}: not a list of versions")
        return entries

    def current(self) -> PublicSet | None:
        """The newest version, re-verified against its recorded digest; None if none was published."""
        entries = self.index()
        if not entries:
            return None
        entry = entries[-1]
        path = self.root / f"v{entry['version']:04d}.bundle"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PublicSetError(f"{path}: {exc.strerror or exc}") from exc
        try:
            bundle = decode_bundle(data, digest=bytes.fromhex(entry["digest"]))
        except RemoteProtocolError as exc:
            raise PublicSetError(f"{path} does not match {INDEX} ({exc}); restore it or publish a new version") from exc
        return PublicSet(bundle.version, bytes.fromhex(entry["digest"]), data, float(entry["published_at"]),
                         len(bundle.test), len(bundle.transfer))

    def add(self, test: Path, transfer: Path) -> PublicSet:
        """Publish a new version made of two HumanEval-style jsonl files.

        Raises:
            PublicSetError: unreadable file, invalid problem, overlapping sets, or the same
                problems as the current version (that would be a version that changes nothing).
        """
        test_rows, transfer_rows = _read_problems(test, "test"), _read_problems(transfer, "transfer")
        entries = self.index()
        version = (entries[-1]["version"] + 1) if entries else 1
        try:
            data = encode_bundle(version, test_rows, transfer_rows)
            if entries:
                old = decode_bundle((self.root / f"v{entries[-1]['version']:04d}.bundle").read_bytes())
                if encode_bundle(version, old.test, old.transfer) == data:
                    raise PublicSetError(f"the same problems as the current version v{old.version}; nothing to publish")
        except LocalProtocolError as exc:
            raise PublicSetError(f"{str(exc).removeprefix('public set: ')} (in --test {test} / --transfer "
                                 f"{transfer}; rows need the HumanEval fields: prepare MBPP-style files with "
                                 "`knexa-node data prepare` first)") from exc
        digest = bundle_digest(data)
        now = time.time()
        atomic_write_bytes(self.root / f"v{version:04d}.bundle", data)
        entries.append({"version": version, "digest": digest.hex(), "size": len(data), "test": len(test_rows),
                        "transfer": len(transfer_rows), "published_at": now,
                        "sources": {"test": str(test), "transfer": str(transfer)}})
        atomic_write_json(self.root / INDEX, entries)  # the bundle first: the index never names a missing file
        return PublicSet(version, digest, data, now, len(test_rows), len(transfer_rows))


def announcement(current: PublicSet, federation: str, cpm: bytes) -> PublicSetAnnounce:
    return PublicSetAnnounce(federation, cpm, current.version, current.digest, len(current.data),
                             BUNDLE_CHUNK, current.published_at)


async def serve_public_set(stream: Any, current: PublicSet | None, *, federation: str, identity: Any,
                           allowed: Any, round_: int) -> str:
    """Answer one PUBLIC_SET_PROTOCOL stream: a signed announce, or the bundle's chunks in order.

    Args:
        stream: a knexa_p2p FramedStream. current: what to serve (None: nothing published).
        identity: the CPM's identity (signs the announce). allowed: peer -> bool (the roster).
    Returns:
        What happened, for the log ("announce", "fetch", "none", or a rejection code).
    """
    peer = stream.remote_peer
    try:
        raw = await stream.receive(max_size=FRAME_CAPS["directive_request"], timeout=READ_TIMEOUT_S)
        msg = open_signed(decode(raw, Signed, max_size=FRAME_CAPS["directive_request"]),
                          (PublicSetQuery, PublicSetFetch), authenticated=peer, sender_of=lambda m: m.node,
                          max_size=FRAME_CAPS["directive_request"])
    except RemoteProtocolError as exc:
        code = exc.code if exc.code in ReplyCode.ALL else ReplyCode.DECODE
        await stream.send(encode(Reply(False, code, str(exc)[:200], round_)))
        return code
    if msg.federation != federation or not allowed(peer):
        await stream.send(encode(Reply(False, ReplyCode.UNAUTHORIZED, "not a member of this federation", round_)))
        return ReplyCode.UNAUTHORIZED
    if current is None:
        await stream.send(encode(Reply(False, ReplyCode.NOT_READY, "no public set published", round_)))
        return "none"
    if isinstance(msg, PublicSetQuery):
        await stream.send(encode(sign(announcement(current, federation, identity.peer_bytes), identity.signing_key)))
        return "announce"
    if msg.digest != current.digest:
        await stream.send(encode(Reply(False, ReplyCode.NOT_READY, f"not the current public set {current.label}",
                                       round_)))
        return "stale_fetch"
    with trio.move_on_after(SEND_TIMEOUT_S) as scope:
        await stream.send(encode(Reply(True, ReplyCode.OK, current.label, round_)))
        for index, start in enumerate(range(0, len(current.data), BUNDLE_CHUNK)):
            await stream.send(encode(PublicSetChunk(current.digest, index, current.data[start:start + BUNDLE_CHUNK])))
    if scope.cancelled_caught:
        await stream.reset()
        return "fetch_timeout"
    return "fetch"


# ---- `knexa-cpm public-set ...` ---------------------------------------------------------------------

def configure_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ps = sub.add_parser("public-set", help="publish and list the federation's public sets (transfer X_u + test)",
                        description="The public sets every node answers (transfer X_u) and is scored on (test). "
                        "Nodes fetch the current version from the CPM and refuse rounds on any other. "
                        "A running CPM announces a new version after `systemctl reload` (SIGHUP).")
    pss = ps.add_subparsers(dest="public_set_command", required=True)
    add = pss.add_parser("add", help="publish a new version from two HumanEval-style jsonl files")
    listing = pss.add_parser("list", help="list the published versions (the last is current)")
    for p in (add, listing):
        p.add_argument("--config", type=Path, help="the CPM's config file (state_dir is read from it)")
        p.add_argument("--state-dir", type=Path, help="or: the CPM's state directory")
    add.add_argument("--test", type=Path, required=True, help="test set: one problem per line")
    add.add_argument("--transfer", type=Path, required=True, help="transfer set X_u: one problem per line")


def run(args: argparse.Namespace) -> int:
    from knexa_runtime.config import ConfigError, load_config

    from .config import CpmConfig
    from .errors import ExitCode

    try:
        state_dir = args.state_dir or load_config(CpmConfig, args.config).cpm.state_dir
        store = PublicSetStore(state_dir)
        if args.public_set_command == "add":
            new = store.add(args.test, args.transfer)
            print(f"published public set {new.label}: test={new.test} transfer={new.transfer} "
                  f"bytes={len(new.data)}\ndigest {new.digest.hex()}\n"
                  "a running CPM announces it after `systemctl reload knexa-cpm` (SIGHUP); nodes fetch it on "
                  "their next start and refuse rounds on the old one until restarted")
            return ExitCode.OK
        entries = store.index()
        if not entries:
            print("no public set published")
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e["published_at"]))
            print(f"v{e['version']}  {e['digest'][:12]}  test={e['test']} transfer={e['transfer']} "
                  f"bytes={e['size']}  {when} UTC")
        return ExitCode.OK
    except (PublicSetError, ConfigError) as exc:
        print(f"knexa-cpm: {exc}", file=sys.stderr)
        return ExitCode.CONFIG

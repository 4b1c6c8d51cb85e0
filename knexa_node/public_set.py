"""A node's copy of the federation's public sets: fetch it from the CPM, verify it, refuse others.

The transfer set X_u and the test set must be the same on every member (a teacher's answers are
matched to the student's prompts by task id; Pass@1 is compared across members), so the node
does not trust whatever files sit in a folder. The CPM announces the current bundle (signed:
version, SHA-256 digest, size); the node

* fetches it over ``PUBLIC_SET_PROTOCOL`` when it has no copy (chunks of at most
  ``BUNDLE_CHUNK``, the whole capped at the announced size and at ``MAX_BUNDLE_BYTES``), checks
  the digest, and writes ``test.jsonl``, ``transfer.jsonl`` and ``bundle.json`` atomically;
* recomputes the digest from the files the model actually reads before it starts rounds and
  refuses (``PublicSetMismatch``, one line) when they are another version or were edited;
* asks again before every round and refuses the round when the CPM has moved to another version
  (the node then exits; on restart it fetches the new version into its own folder, so the
  rounds of each version stay apart: ``state_dir/public-sets/v0002-<digest>/``).

Where the copy lives: ``public_dir`` from the config when set (then it must hold exactly the
announced version, or be empty), else ``state_dir/public-sets/v<version>-<digest12>/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import trio

from knexa_p2p.host import DialError, P2PHost
from knexa_p2p.streams import StreamBroken
from knexa_runtime.atomic import atomic_write_json
from knexa_runtime.config import ConfigError
from protocol import (
    PUBLIC_SET_PROTOCOL,
    DecodeError,
    LocalProtocolError,
    PublicSetAnnounce,
    PublicSetChunk,
    PublicSetFetch,
    PublicSetQuery,
    Reply,
    ReplyCode,
    Signed,
    UnauthorizedError,
    bundle_digest,
    decode,
    decode_bundle,
    encode,
    encode_bundle,
    open_signed,
    sign,
)
from protocol._limits import FRAME_CAPS

from .data import read_jsonl, write_jsonl

__all__ = ["MISSING", "PublicSetMismatch", "ask_until_answered", "bundle_dir", "check_local", "ensure", "fetch",
           "fetch_for_config", "install", "label", "query"]

logger = logging.getLogger("knexa_node")
MISSING = "has no public set"
BUNDLE_META = "bundle.json"


class PublicSetMismatch(ConfigError):
    """This node's public set is not the one the CPM announces; no round runs on it."""


def label(ann: PublicSetAnnounce) -> str:
    return f"v{ann.version} ({ann.digest.hex()[:12]})"


def bundle_dir(state_dir: Path, ann: PublicSetAnnounce) -> Path:
    """The default home of one version: apart from every other version."""
    return Path(state_dir) / "public-sets" / f"v{ann.version:04d}-{ann.digest.hex()[:12]}"


def check_local(folder: Path, ann: PublicSetAnnounce) -> str | None:
    """None when ``folder``'s test/transfer files are exactly the announced bundle, ``MISSING``
    when it holds neither file, else why it is not (for the one-line refusal)."""
    test, transfer = folder / "test.jsonl", folder / "transfer.jsonl"
    if not test.exists() and not transfer.exists():
        return MISSING
    try:
        digest = bundle_digest(encode_bundle(ann.version, read_jsonl(test), read_jsonl(transfer)))
    except (OSError, ValueError, LocalProtocolError) as exc:
        return f"does not hold a valid public set ({str(exc)[:120]})"
    if digest == ann.digest:
        return None
    meta: dict[str, Any] = {}
    if (folder / BUNDLE_META).is_file():
        try:
            meta = json.loads((folder / BUNDLE_META).read_text())
        except ValueError:
            meta = {}
    if meta.get("digest") == ann.digest.hex():
        return f"was modified after it was fetched (its files no longer hash to {label(ann)})"
    if meta.get("version") is not None:
        return f"holds public set v{meta['version']} ({str(meta.get('digest', ''))[:12]})"
    return "holds other problems than the federation's public set"


def install(folder: Path, data: bytes, ann: PublicSetAnnounce) -> None:
    """Write a verified bundle as the files a node reads; ``bundle.json`` last (it names what is there)."""
    bundle = decode_bundle(data, digest=ann.digest)
    write_jsonl(folder / "test.jsonl", bundle.test)
    write_jsonl(folder / "transfer.jsonl", bundle.transfer)
    atomic_write_json(folder / BUNDLE_META, {"version": ann.version, "digest": ann.digest.hex(), "size": ann.size,
                                             "test": len(bundle.test), "transfer": len(bundle.transfer),
                                             "fetched_at": time.time()})


async def query(host: P2PHost, cpm: bytes, identity: Any, federation: str, *, timeout: float) -> PublicSetAnnounce | None:
    """The CPM's signed announcement of the current public set; None when it has published none.

    Raises:
        StreamBroken / DialError: the CPM could not be asked (callers retry).
        RemoteProtocolError: a bad or refused answer (not a member, forged signature ...).
    """
    stream = await host.open_stream(cpm, PUBLIC_SET_PROTOCOL, timeout=timeout)
    try:
        await stream.send(encode(sign(PublicSetQuery(federation, identity.peer_bytes), identity.signing_key)))
        raw = await stream.receive(max_size=FRAME_CAPS["public_set"], timeout=timeout)
    finally:
        await stream.close()
    msg = decode(raw, (Signed, Reply), max_size=FRAME_CAPS["public_set"])
    if isinstance(msg, Reply):
        if msg.code == ReplyCode.NOT_READY:
            return None
        raise UnauthorizedError(f"CPM refused the public-set query: {msg.code} {msg.detail}")
    ann = open_signed(msg, PublicSetAnnounce, authenticated=cpm, sender_of=lambda a: a.cpm,
                      max_size=FRAME_CAPS["public_set"])
    if ann.federation != federation:
        raise UnauthorizedError("public set announced for another federation")
    return ann


async def fetch(host: P2PHost, cpm: bytes, identity: Any, ann: PublicSetAnnounce, *, timeout: float) -> bytes:
    """Download the announced bundle chunk by chunk and verify it against the signed digest.

    Raises:
        StreamBroken / DialError: the transfer broke. RemoteProtocolError: refused, out-of-order,
        oversize or tampered data (nothing is written in any of these cases).
    """
    stream = await host.open_stream(cpm, PUBLIC_SET_PROTOCOL, timeout=timeout)
    parts: list[bytes] = []
    received = 0
    try:
        await stream.send(encode(sign(PublicSetFetch(ann.federation, identity.peer_bytes, ann.digest),
                                      identity.signing_key)))
        reply = decode(await stream.receive(max_size=FRAME_CAPS["reply"], timeout=timeout), Reply)
        if not reply.ok:
            raise UnauthorizedError(f"CPM refused the public-set fetch: {reply.code} {reply.detail}")
        for index in range(ann.chunks):
            raw = await stream.receive(max_size=FRAME_CAPS["public_set_chunk"], timeout=timeout)
            chunk = decode(raw, PublicSetChunk, max_size=FRAME_CAPS["public_set_chunk"])
            if chunk.digest != ann.digest or chunk.index != index:
                raise DecodeError(f"public set chunk {chunk.index} out of order or for another bundle")
            received += len(chunk.data)
            if received > ann.size:
                raise DecodeError(f"public set larger than the announced {ann.size} bytes")
            parts.append(chunk.data)
    finally:
        await stream.close()
    data = b"".join(parts)
    if len(data) != ann.size or bundle_digest(data) != ann.digest:
        raise DecodeError(f"fetched public set does not match the announced {label(ann)}")
    return data


async def ask_until_answered(host: P2PHost, cpm: bytes, identity: Any, federation: str, *,
                             timeout: float) -> PublicSetAnnounce | None:
    """:func:`query`, retried with backoff while the CPM is unreachable (it may be restarting)."""
    delay = 1.0
    while True:
        try:
            return await query(host, cpm, identity, federation, timeout=timeout)
        except (StreamBroken, DialError) as exc:
            logger.warning("public set query failed (%s); retrying in %.0fs", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def ensure(host: P2PHost, cpm: bytes, identity: Any, *, federation: str, state_dir: Path,
                 public_dir: Path | None, timeout: float) -> tuple[PublicSetAnnounce | None, Path | None]:
    """Make sure this node holds the announced public set; fetch it if it has none.

    Returns:
        (announcement, folder holding it), or (None, public_dir) when the CPM publishes none
        (then the configured folder is used as it is, as before public sets existed).
    Raises:
        PublicSetMismatch: the folder holds another version or edited files.
    """
    ann = await ask_until_answered(host, cpm, identity, federation, timeout=timeout)
    if ann is None:
        if public_dir is None or not ((public_dir / "test.jsonl").is_file() and (public_dir / "transfer.jsonl").is_file()):
            raise PublicSetMismatch("the CPM publishes no public set and this node has none (test.jsonl, "
                                    "transfer.jsonl): the federation's operator publishes one with "
                                    "`knexa-cpm public-set add`")
        logger.info("the CPM publishes no public set; using %s as configured", public_dir)
        return None, public_dir
    folder = Path(public_dir) if public_dir is not None else bundle_dir(state_dir, ann)
    problem = check_local(folder, ann)
    if problem == MISSING:
        logger.info("fetching public set %s (%d bytes) from the CPM into %s", label(ann), ann.size, folder)
        data = await fetch(host, cpm, identity, ann, timeout=timeout)
        install(folder, data, ann)
        problem = check_local(folder, ann)
    if problem is not None:
        fix = ("empty that folder or drop public_dir from the config" if public_dir is not None
               else "delete that folder") + " and restart: the node then fetches it"
        raise PublicSetMismatch(f"public set: {folder} {problem}, but the CPM announces {label(ann)}; "
                                f"no round runs on it ({fix})")
    logger.info("public set %s verified in %s", label(ann), folder)
    return ann, folder


async def fetch_for_config(cfg: Any) -> tuple[PublicSetAnnounce | None, Path | None]:
    """`knexa-node public-set fetch`: get the public set with the node's own identity, before the
    daemon first starts (so `knexa-node data prepare --public DIR` can remove overlapping rows).

    Args:
        cfg: the node's NodeSection (state_dir, cpm, federation, public_dir, timeouts).
    Raises:
        DialError: the CPM is unreachable. PublicSetMismatch / RemoteProtocolError: as `ensure`.
    """
    from knexa_p2p.host import open_host
    from knexa_p2p.identity import load_or_create_identity

    from .service import parse_peer

    identity = load_or_create_identity(Path(cfg.state_dir) / "identity.key")
    async with open_host(identity, ("/ip4/127.0.0.1/tcp/0",)) as host:
        await host.connect(cfg.cpm, timeout=cfg.cpm_connect_timeout_s or 30.0)
        return await ensure(host, parse_peer(cfg.cpm), identity, federation=cfg.federation,
                            state_dir=Path(cfg.state_dir), public_dir=cfg.public_dir, timeout=cfg.stream_timeout_s)

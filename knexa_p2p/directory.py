"""Discovery through the CPM: members publish signed peer records, the CPM hands them out.

A node configured with only the CPM's address publishes its own libp2p *signed peer record*
(the standard envelope: peer id, listen addresses and a timestamp sequence number, signed by the
peer's own key) to the CPM on `PEERS_PROTOCOL` and gets back the current record of every other
member. Records are verified on both sides: the envelope signature, that the signer is the peer
the record names, and (at the CPM) that the signer is the authenticated stream peer. A newer
record (higher seq) replaces an older one, so a member that restarts on another address is found
again at the next exchange. The CPM relays records; it cannot forge or alter one, only withhold it.

Only members reach the CPM at all (the connection gate), and the CPM serves only records of
peers that are still members, to members: the directory never gives out an outsider's address,
nor a member's address to an outsider.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord

from .host import P2PHost
from .streams import FramedStream

__all__ = ["PEERS_PROTOCOL", "DirectoryError", "PeerDirectory", "SignedRecord", "exchange_records", "open_record"]

logger = logging.getLogger(__name__)
PEERS_PROTOCOL = "/knexa/peers/1.0.0"
RECORD_CAP = 8 * 1024  # one envelope: a key, a signature and a handful of multiaddrs
REPLY_CAP = 4 << 20  # every member's record, ~200 bytes each
MAX_ADDRS = 16
DOMAIN = PeerRecord().domain()


class DirectoryError(ValueError):
    """A peer record that does not verify, or a directory reply that does not parse."""


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A verified peer record, and its envelope bytes to pass on unchanged."""

    peer: bytes
    seq: int
    addrs: tuple[str, ...]
    envelope: bytes


def open_record(data: bytes, *, signer: bytes | None = None) -> SignedRecord:
    """Verify an envelope; `signer`, when given, must be the peer the record is about."""
    try:
        env, record = consume_envelope(data, DOMAIN)
        owner = ID.from_pubkey(env.public_key)
    except Exception as exc:  # protobuf, key and signature errors come in many types
        raise DirectoryError(f"invalid peer record: {type(exc).__name__}: {exc}") from exc
    if owner != record.peer_id:
        raise DirectoryError(f"peer record for {record.peer_id} signed by {owner}")
    if signer is not None and owner.to_bytes() != signer:
        raise DirectoryError(f"peer record for {owner} sent by {ID(signer)}")
    if len(record.addrs) > MAX_ADDRS:
        raise DirectoryError(f"peer record with {len(record.addrs)} addresses (max {MAX_ADDRS})")
    return SignedRecord(owner.to_bytes(), int(record.seq), tuple(str(a) for a in record.addrs), data)


class PeerDirectory:
    """The CPM's side: the newest record per member, served to members."""

    def __init__(self, is_member: Callable[[bytes], bool], timeout: float = 10.0,
                 on_rejected: Callable[[str], None] | None = None) -> None:
        self.is_member = is_member
        self.timeout = timeout
        self.on_rejected = on_rejected
        self.records: dict[bytes, SignedRecord] = {}
        self.rejected: Counter[str] = Counter()

    def offer(self, record: SignedRecord) -> bool:
        """Keep `record` if it is the newest for its peer; False if older or the same."""
        old = self.records.get(record.peer)
        if old is not None and old.seq >= record.seq:
            return False
        self.records[record.peer] = record
        return True

    def current(self, exclude: bytes = b"") -> list[SignedRecord]:
        """Records of peers that are still members (a removed member's record is forgotten)."""
        for peer in [p for p in self.records if not self.is_member(p)]:
            del self.records[peer]
        return [r for p, r in self.records.items() if p != exclude]

    def _reject(self, reason: str, peer: bytes, detail: object) -> None:
        self.rejected[reason] += 1
        if self.on_rejected is not None:
            self.on_rejected(reason)
        logger.warning("rejected peer record peer=%s reason=%s detail=%s", ID(peer), reason, detail)

    async def handle(self, stream: FramedStream) -> None:
        """One exchange: the member's own record (or an empty frame) in, everyone else's out."""
        peer = stream.remote_peer
        if not self.is_member(peer):  # the gate stops non-members first; this is the second lock
            self._reject("not_member", peer, "not on the roster")
            await stream.send(msgpack.packb({"ok": False, "error": "not a member", "records": []}))
            return
        raw = await stream.receive(max_size=RECORD_CAP, timeout=self.timeout)
        if raw:
            try:
                record = open_record(raw, signer=peer)
            except DirectoryError as exc:
                self._reject("bad_record", peer, exc)
                await stream.send(msgpack.packb({"ok": False, "error": str(exc)[:200], "records": []}))
                return
            previous = self.records.get(peer)
            if self.offer(record) and (previous is None or previous.addrs != record.addrs):
                logger.info("peer record peer=%s seq=%d addrs=%s", str(ID(peer))[-8:], record.seq,
                            ",".join(record.addrs))
        records = [r.envelope for r in self.current(exclude=peer)]
        await stream.send(msgpack.packb({"ok": True, "error": "", "records": records}), max_size=REPLY_CAP)


async def exchange_records(host: P2PHost, cpm: bytes, *, publish: bool = True,
                           timeout: float = 10.0) -> list[SignedRecord]:
    """Publish our record to the CPM and return every other member's verified record.

    Each record also goes into the host's peerstore (newest seq wins and replaces older
    addresses), so `open_stream` to a member dials its current address. A record that does not
    verify is skipped with a log line: the CPM relays records, it cannot make them.
    """
    stream = await host.open_stream(cpm, PEERS_PROTOCOL, timeout=timeout)
    try:
        await stream.send(host.signed_record() if publish else b"")
        raw = await stream.receive(max_size=REPLY_CAP, timeout=timeout)
    finally:
        await stream.close()
    try:
        reply = msgpack.unpackb(raw, raw=False)
        ok, error, envelopes = reply["ok"], reply["error"], list(reply["records"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise DirectoryError(f"bad directory reply: {exc}") from exc
    if not ok:
        raise DirectoryError(f"the CPM refused our peer record: {error}")
    out: list[SignedRecord] = []
    for data in envelopes:
        try:
            record = open_record(bytes(data))
        except (DirectoryError, TypeError) as exc:
            logger.warning("skipped a peer record from the directory: %s", exc)
            continue
        if record.peer != host.peer_id:
            host.learn_record(record.envelope)
            out.append(record)
    return out

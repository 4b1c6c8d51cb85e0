"""The replay book is saved atomically with the node's state: a node that restarts and then gets
the same directive redelivered (GossipSub caches recent messages) and the same package replayed
must treat both as old, exactly as it would without the restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import trio

from knexa_node.config import NodeSection
from knexa_node.service import STATE_FILE, NodeService, _kem_public
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from protocol import (
    Hello,
    Match,
    MatchDirective,
    PackageBody,
    PackageItem,
    Reply,
    ReplyCode,
    Signed,
    decode,
    encode,
    open_signed,
    seal_package,
    sign,
)
from tests.support.fake_backend import FakeBackend

FED = "replay"


class ScriptedStream:
    """Stands in for a FramedStream: the teacher's side is scripted, the node's sends are kept."""

    def __init__(self, peer: bytes, incoming: list[bytes]) -> None:
        self.remote_peer = peer
        self.incoming = list(incoming)
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def receive(self, *, max_size: int, timeout: float) -> bytes:
        return self.incoming.pop(0)


def start_node(state_dir: Path, cpm_peer_id: str) -> NodeService:
    cfg = NodeSection(federation=FED, state_dir=state_dir, cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{cpm_peer_id}")
    return NodeService(cfg, FakeBackend(), load_or_create_identity(state_dir / "identity.key"),
                       load_or_create_kem_key(state_dir / "kem.key"))


def sealed_package(node: NodeService, teacher_key, teacher: bytes, did: bytes) -> bytes:
    """What an honest teacher sends for directive `did`: signed, sealed to the node's KEM key."""
    body = PackageBody(items=(PackageItem("T/0", "    return x\n"),), blocked=0)
    sealed = seal_package(body, federation=FED, round=0, directive_id=did, sender=teacher,
                          recipient=node.me, recipient_kem_public=_kem_public(node.kem_key))
    return encode(sign(sealed, teacher_key))


async def deliver(node: NodeService, teacher: bytes, payload: bytes) -> Reply:
    """Run the node's real KD handler (it sends its Hello, reads the package, replies)."""
    stream = ScriptedStream(teacher, [payload])
    await node.handle_kd(stream)
    assert open_signed(decode(stream.sent[0], Signed), Hello, authenticated=node.me, sender_of=lambda h: h.node)
    return decode(stream.sent[-1], Reply)


async def test_restart_then_redelivered_directive_and_replayed_package_are_old(tmp_path: Path) -> None:
    cpm = load_or_create_identity(tmp_path / "cpm.key")
    teacher = load_or_create_identity(tmp_path / "teacher.key")
    state = tmp_path / "node"
    node = start_node(state, str(cpm.peer_id))
    did = os.urandom(16)
    directive = MatchDirective(FED, 0, cpm.peer_bytes, time.time(), (Match(did, teacher.peer_bytes, node.me),),
                               (teacher.peer_bytes, node.me))
    signed = sign(directive, cpm.signing_key)
    assert node._accept_directive(signed, "pubsub") == directive

    payload = sealed_package(node, teacher.signing_key, teacher.peer_bytes, did)
    reply = await deliver(node, teacher.peer_bytes, payload)
    assert reply.ok, reply
    assert did.hex() in json.loads((state / STATE_FILE).read_text())["replay"]["consumed"]

    restarted = start_node(state, str(cpm.peer_id))  # a new process on the same state directory
    assert restarted._accept_directive(signed, "pubsub") is None, "redelivered directive counted as new"
    with trio.fail_after(10):  # a known round needs no wait for its directive
        replay = await deliver(restarted, teacher.peer_bytes, payload)
    assert not replay.ok and replay.code == ReplyCode.REPLAY, replay
    assert did not in restarted._inbox

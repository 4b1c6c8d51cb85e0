"""CPM and nodes in one trio run over real libp2p on loopback, with a fake model backend.

Tests the network layer without torch, and attacks a live federation: garbage, truncated frames,
oversize prefixes, slow-loris streams, replayed packages and forged directives.
"""

import os
from pathlib import Path

import pytest
import trio

import protocol as P
from knexa_cpm.config import CpmSection
from knexa_cpm.service import serve
from knexa_node.config import NodeSection
from knexa_node.service import NodeService
from knexa_p2p.host import open_host
from knexa_p2p.identity import Identity, load_or_create_identity, load_or_create_kem_key
from tests.support.fake_backend import FakeBackend


def _cpm_cfg(tmp: Path, roster: list[str], quorum: float = 1.0) -> CpmSection:
    return CpmSection(federation="t", state_dir=tmp / "cpm", roster=tuple(roster), round_timeout_s=30.0, quorum=quorum)


def _node(tmp: Path, i: int, cpm_addr: str, roster: list[str], rounds: int, addrs: list[str] = ()) -> NodeService:
    d = tmp / f"node-{i}"
    listen = (addrs[i].split("/p2p/")[0],) if addrs else ("/ip4/127.0.0.1/tcp/0",)
    cfg = NodeSection(federation="t", state_dir=d, cpm=cpm_addr, roster=tuple(roster), rounds=rounds, listen=listen,
                      bootstrap=tuple(a for j, a in enumerate(addrs) if j != i),
                      directive_timeout_s=60, package_timeout_s=60, stream_timeout_s=10, final_eval=False)
    return NodeService(cfg, FakeBackend(f"fake-{i}", seed=i), load_or_create_identity(d / "identity.key"),
                       load_or_create_kem_key(d / "kem.key"))


async def _attack_cpm(cpm_addr: str, cpm_peer: bytes, rogue: Identity) -> None:
    """Feed the live CPM garbage while honest nodes run their round: an outsider is refused at
    the connection; a rogue member (on the roster, running no node) gets to send garbage."""
    from knexa_p2p.host import DialError

    async with open_host(Identity.from_seed(os.urandom(32))) as outsider:
        with pytest.raises(DialError):
            await outsider.connect(cpm_addr)
    async with open_host(rogue) as evil:
        await evil.connect(cpm_addr)
        for payload in (b"\x00\x00\x00\x05hello", os.urandom(40), (1 << 31).to_bytes(4, "big"), b"\x00\x00\x10\x00abc"):
            s = await evil.open_stream(cpm_peer, P.CPM_PROTOCOL)
            await s._stream.write(payload)
            await s.close()
        # slow loris: open and say nothing
        await evil.open_stream(cpm_peer, P.CPM_PROTOCOL)
        # a well-formed profile signed for another member: refused (the signer must be the peer)
        s = await evil.open_stream(cpm_peer, P.CPM_PROTOCOL)
        key = evil.identity.signing_key
        other = Identity.from_seed(os.urandom(32))
        await s.send(P.encode(P.sign(P.Profile("t", 0, other.peer_bytes, tuple([0.1] * 32)), key)))
        reply = P.decode(await s.receive(max_size=4096, timeout=10), P.Reply)
        assert not reply.ok


async def test_rounds_complete_under_attack(tmp_path):
    ids = [load_or_create_identity(tmp_path / f"node-{i}" / "identity.key") for i in range(3)]
    rogue = Identity.from_seed(os.urandom(32))
    roster = [str(i.peer_id) for i in ids]
    async with trio.open_nursery() as nursery:
        # the rogue member is on the CPM's roster; quorum 3 of 4 so rounds close without it
        addrs = await nursery.start(serve, _cpm_cfg(tmp_path, [*roster, str(rogue.peer_id)], quorum=0.75))
        cpm_addr = addrs[0]
        from knexa_node.service import parse_peer

        cpm_peer = parse_peer(cpm_addr)
        from knexa_lab.launcher import _free_ports

        node_addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{i.peer_id}" for p, i in zip(_free_ports(3), ids, strict=True)]
        nodes = [_node(tmp_path, i, cpm_addr, roster, rounds=2, addrs=node_addrs) for i in range(3)]
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                inner.start_soon(_attack_cpm, cpm_addr, cpm_peer, rogue)
                for n in nodes:
                    inner.start_soon(n.run)
        nursery.cancel_scope.cancel()

    from knexa_cpm.state import load_state

    state = load_state(tmp_path / "cpm")
    students = sum(len(b.distilled) for b in (n.backend for n in nodes))
    assert state["stats"]["rounds_closed"] >= 2
    assert students >= 2 and state["stats"]["updates"] == students
    assert state["stats"]["rejected"], "garbage must be counted as rejected"
    assert state["stats"]["rejected"].get("not_member"), "the outsider's connection is counted"


async def test_replayed_and_misaddressed_packages_are_rejected(tmp_path):
    ids = [load_or_create_identity(tmp_path / f"node-{i}" / "identity.key") for i in range(2)]
    roster = [str(i.peer_id) for i in ids]
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(serve, _cpm_cfg(tmp_path, roster))
        student = _node(tmp_path, 1, addrs[0], roster, rounds=0)
        teacher_id = ids[0]
        student_addrs = await nursery.start(student.run)
        # a directive the CPM issued: pretend round 0 paired teacher -> student
        cpm_id = load_or_create_identity(tmp_path / "cpm" / "identity.key")
        did = os.urandom(16)
        directive = P.MatchDirective("t", 0, cpm_id.peer_bytes, 1.0, (P.Match(did, teacher_id.peer_bytes, student.me),),
                                     (teacher_id.peer_bytes, student.me))
        student._accept_directive(P.sign(directive, cpm_id.signing_key), "test")
        # a directive signed by a non-CPM key is refused
        forged = P.MatchDirective("t", 1, cpm_id.peer_bytes, 1.0, (), ())
        try:
            student._accept_directive(P.sign(forged, teacher_id.signing_key), "test")
            raise AssertionError("forged directive accepted")
        except P.SignatureError:
            pass

        async def send(identity: Identity, directive_id: bytes, round_: int) -> P.Reply | None:
            """The student's reply, or None when it refused the connection itself."""
            async with open_host(identity) as h:
                try:
                    await h.connect(student_addrs[0])
                except DialError:
                    return None
                s = await h.open_stream(student.me, P.KD_PROTOCOL)
                first = P.decode(await s.receive(max_size=4096, timeout=10), (P.Signed, P.Reply))
                if isinstance(first, P.Reply):  # refused before the handshake (e.g. not on the roster)
                    return first
                hello = P.open_signed(first, P.Hello, authenticated=student.me)
                body = P.PackageBody((P.PackageItem("T/0", "return 1"),), 0)
                sealed = P.seal_package(body, federation="t", round=round_, directive_id=directive_id,
                                        sender=identity.peer_bytes, recipient=student.me,
                                        recipient_kem_public=hello.kem_public)
                await s.send(P.encode(P.sign(sealed, identity.signing_key)))
                return P.decode(await s.receive(max_size=4096, timeout=40), P.Reply)

        # a directive signed by a member's key and *published on the topic* is ignored (the topic
        # validator drops it before delivery; an outsider could not even connect)
        from knexa_p2p.host import DialError, GossipSettings

        async with open_host(teacher_id, gossip=GossipSettings.for_size(3)) as evil:
            await evil.connect(student_addrs[0])
            await evil.subscribe(P.directive_topic("t"))
            await trio.sleep(2.0)
            fake = P.MatchDirective("t", 7, cpm_id.peer_bytes, 1.0, (), ())
            for _ in range(3):
                await evil.publish(P.directive_topic("t"), P.encode(P.sign(fake, evil.identity.signing_key)))
                await trio.sleep(0.5)
            with trio.move_on_after(10):
                while not student.counters.get("rejected_directive_unauthorized"):
                    await trio.sleep(0.2)
        assert student.counters.get("rejected_directive_unauthorized")
        assert 7 not in student.book.rounds_seen

        assert (await send(teacher_id, did, 0)).ok
        replay = await send(teacher_id, did, 0)
        assert not replay.ok and replay.code == P.ReplyCode.REPLAY
        stranger = Identity.from_seed(os.urandom(32))
        assert await send(stranger, did, 0) is None
        assert student.counters.get("rejected_connection_not_member")
        nursery.cancel_scope.cancel()

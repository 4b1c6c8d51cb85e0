"""Members only, on real libp2p over loopback: the roster decides who may hold a connection.

- a non-member is disconnected right after the Noise handshake: no stream, no pubsub subscription;
- the gate reads the roster live: adding a member needs no restart, removing one drops it;
- the CPM refuses a non-member's DirectiveRequest even if a connection got through;
- the directive topic validator stops a member's forged directive from being delivered or relayed.
"""

from __future__ import annotations

from pathlib import Path

import trio

import protocol as P
from knexa_cpm.config import CpmSection
from knexa_cpm.service import CpmService, serve
from knexa_node.config import NodeSection
from knexa_node.service import NodeService
from knexa_p2p.host import DialError, GossipSettings, MemberGate, open_host
from knexa_p2p.identity import Identity, load_or_create_kem_key
from tests.support.fake_backend import FakeBackend
from tests.support.identities import ident


async def _wait(pred, timeout: float = 10.0) -> bool:
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.05)
        return True
    return False


async def test_non_member_is_cut_after_handshake_and_roster_changes_apply_live():
    members: set[bytes] = set()
    refused: list[tuple[str, bytes]] = []
    gate = MemberGate(lambda p: p in members, on_refused=lambda r, p: refused.append((r, p)))
    g = GossipSettings.for_size(2)
    handled: list[bytes] = []
    outsider_id = ident()
    async with open_host(ident(), gossip=g, gate=gate) as server, open_host(outsider_id, gossip=g) as outsider:

        async def handler(stream):
            handled.append(await stream.receive(max_size=64, timeout=5))
            await stream.send(b"ok")

        server.set_handler("/t/members", handler)
        await server.subscribe("topic")
        await outsider.subscribe("topic")

        try:
            await outsider.connect(server.addrs()[0], timeout=5)
            raise AssertionError("a non-member connected")
        except DialError:
            pass
        await trio.sleep(0.5)
        assert refused and {r for r, _ in refused} == {"not_member"}
        assert {p for _, p in refused} == {outsider_id.peer_bytes}
        assert gate.refused["not_member"] == len(refused)
        assert not server.is_connected(outsider_id.peer_bytes) and not handled
        assert server.topic_peers("topic") == 0, "a non-member never got to subscribe"

        # the operator adds it to the roster: the next connection is admitted, no restart
        members.add(outsider_id.peer_bytes)
        await outsider.connect(server.addrs()[0], timeout=5)
        s = await outsider.open_stream(server.peer_id, "/t/members")
        await s.send(b"hi")
        assert await s.receive(max_size=64, timeout=5) == b"ok" and handled == [b"hi"]
        assert await _wait(lambda: server.topic_peers("topic") == 1)

        # ... and removes it again: the live connection is dropped on the next enforcement pass
        members.clear()
        assert await server.enforce_membership() == [outsider_id.peer_bytes]
        assert await _wait(lambda: not server.is_connected(outsider_id.peer_bytes))
        assert await server.enforce_membership() == []


async def test_cpm_refuses_non_member_directive_requests(tmp_path: Path):
    member = ident()
    cfg = CpmSection(federation="m", state_dir=tmp_path / "cpm", roster=(str(member.peer_id),), round_timeout_s=30.0)
    cpm = CpmService(cfg)
    # open the connection gate so the request reaches the application check behind it
    cpm.gate = lambda: MemberGate(lambda _p: True)  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(lambda task_status: serve(cfg, service=cpm, task_status=task_status))

        async def ask(who: Identity) -> P.Reply:
            async with open_host(who) as h:
                await h.connect(addrs[0])
                s = await h.open_stream(cpm.identity.peer_bytes, P.CPM_PROTOCOL)
                await s.send(P.encode(P.sign(P.DirectiveRequest("m", 0, who.peer_bytes), who.signing_key)))
                return P.decode(await s.receive(max_size=4096, timeout=10), P.Reply)

        stranger = await ask(ident())
        assert not stranger.ok and stranger.code == P.ReplyCode.UNAUTHORIZED
        assert cpm.stats["rejected"].get(P.ReplyCode.UNAUTHORIZED) == 1
        control = await ask(member)  # the same request from a member: merely too early
        assert not control.ok and control.code == P.ReplyCode.NOT_READY
        nursery.cancel_scope.cancel()


def _node_service(tmp: Path, identity: Identity, cpm: Identity, roster: list[str]) -> NodeService:
    cfg = NodeSection(federation="m", state_dir=tmp, cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{cpm.peer_id}",
                      roster=tuple(roster), rounds=1, final_eval=False)
    return NodeService(cfg, FakeBackend("fake", seed=0), identity, load_or_create_kem_key(tmp / "kem.key"))


async def test_directive_validator_stops_delivery_and_relay(tmp_path: Path):
    """Chain attacker -> relay -> watcher: the relay runs the node's validator; the watcher (no
    validator of its own) sees only what the relay forwarded."""
    cpm, attacker, relay_id, watcher_id, newcomer = ident(), ident(), ident(), ident(), ident()
    roster = [str(i.peer_id) for i in (attacker, relay_id, watcher_id)]
    node = _node_service(tmp_path, relay_id, cpm, roster)
    topic = P.directive_topic("m")
    g = GossipSettings.for_size(4)
    async with open_host(cpm, gossip=g) as c, open_host(attacker, gossip=g) as a, \
            open_host(relay_id, gossip=g, gate=node.gate()) as relay, open_host(watcher_id, gossip=g) as w:
        relay.set_topic_validator(topic, node.valid_directive_message)
        relay_sub = await relay.subscribe(topic)
        watch_sub = await w.subscribe(topic)
        await c.subscribe(topic)
        await a.subscribe(topic)
        for h in (c, a, w):
            await h.connect(relay.addrs()[0])
        assert await _wait(lambda: relay.topic_peers(topic) == 3)
        await trio.sleep(2.0)  # a few heartbeats: the relay grafts everyone into its mesh

        forged = P.MatchDirective("m", 5, cpm.peer_bytes, 1.0, (), ())
        await a.publish(topic, P.encode(P.sign(forged, attacker.signing_key)))  # a member's forgery
        genuine = P.MatchDirective("m", 6, cpm.peer_bytes, 2.0, (), (newcomer.peer_bytes,))
        await trio.sleep(0.5)
        await c.publish(topic, P.encode(P.sign(genuine, cpm.signing_key)))

        for sub in (relay_sub, watch_sub):
            with trio.fail_after(10):
                msg = await sub.get()
            assert msg.from_id == cpm.peer_bytes, "the forged directive was delivered or relayed"
            signed = P.decode(msg.data, P.Signed)
            assert P.open_signed(signed, P.MatchDirective, authenticated=cpm.peer_bytes).round == 6
        assert node.counters.get("rejected_directive_unauthorized", 0) >= 1
        # a CPM-signed directive makes its participants members for this node's gate (a member
        # added at the CPM is reachable before every node's roster file lists it)
        assert not node.is_member(newcomer.peer_bytes)
        node._accept_directive(P.decode(msg.data, P.Signed), "test")
        assert node.is_member(newcomer.peer_bytes) and not node.is_member(ident().peer_bytes)

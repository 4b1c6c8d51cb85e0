"""Circuit relay v2 (members only), dial-back reachability and connection kinds, over real libp2p on
loopback. The two-NAT topology with hole punching is tests/integration/test_netns_nat.py.

A node marked private publishes only `/p2p-circuit` addresses through the CPM's peer directory;
another member that knows only the CPM dials it through the CPM's relay, and the stream runs
end to end over Noise inside the circuit (the relay counts the bytes it forwarded).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket

import pytest
import trio
from prometheus_client import generate_latest

from knexa_p2p.directory import PEERS_PROTOCOL, PeerDirectory, exchange_records
from knexa_p2p.host import MemberGate, open_host
from knexa_p2p.nat import (
    RelayError,
    RelayPolicy,
    circuit_addr,
    dial_back,
    is_circuit,
    new_dialer_key,
    pack,
    unpack,
)
from knexa_p2p.reach import DIALBACK_PROTOCOL, DialBackService, check_reachability, keep_reservation
from knexa_p2p.streams import StreamBroken
from knexa_runtime.metrics import DaemonMetrics
from tests.support.identities import ident


async def _echo(stream) -> None:
    await stream.send(await stream.receive(max_size=1 << 20, timeout=10))


async def test_private_member_is_reached_through_the_cpm_relay():
    cpm_id, a_id, b_id = ident(), ident(), ident()
    members = {p.peer_bytes for p in (a_id, b_id)}
    is_member = members.__contains__
    directory = PeerDirectory(is_member)
    policy = RelayPolicy(reservation_ttl_s=60, circuit_duration_s=30, circuit_bytes=1 << 20)
    async with open_host(cpm_id, gate=MemberGate(is_member), relay=policy) as cpm, \
            open_host(a_id, gate=MemberGate(lambda p: p in members or p == cpm.peer_id), relay_client=True) as a, \
            open_host(b_id, gate=MemberGate(lambda p: p in members or p == cpm.peer_id), relay_client=True) as b, \
            trio.open_nursery() as nursery:
        cpm.set_handler(PEERS_PROTOCOL, directory.handle)
        b.set_handler("/t/echo", _echo)
        cpm_addr = cpm.addrs()[0]
        b.reachability = "private"
        nursery.start_soon(keep_reservation, b, cpm_addr)
        with trio.fail_after(10):
            while not b.relay_client.circuit_addrs():
                await trio.sleep(0.05)
        await exchange_records(b, cpm.peer_id)  # b publishes its circuit address only
        await a.connect(cpm_addr)
        [record] = await exchange_records(a, cpm.peer_id)
        assert record.peer == b.peer_id and record.addrs and all(is_circuit(x) for x in record.addrs)

        assert await a.dial_peer(b.peer_id, timeout=15)
        stream = await a.open_stream(b.peer_id, "/t/echo")
        payload = os.urandom(200_000)
        await stream.send(payload)
        assert await stream.receive(max_size=1 << 20, timeout=10) == payload
        assert a.stream_kind(stream) == "relayed"
        await stream.close()
        assert a.connection_kinds()["open"]["relayed"] == 1 and b.connection_kinds()["opened"]["relayed"] == 1
        # the relay forwarded the whole payload, inside Noise: the plaintext never appears
        summary = cpm.relay.summary()
        assert summary["bytes_relayed"] > 2 * len(payload)
        assert summary["reservations"] >= 1 and summary["circuits"] == 1
        # the same numbers on the daemons' Prometheus endpoints
        node_metrics, relay_metrics = DaemonMetrics("node"), DaemonMetrics("cpm")
        node_metrics.observe_connections(a.connection_kinds(), reservations=0, reachability="public")
        relay_metrics.observe_connections(cpm.connection_kinds(), summary)
        text = generate_latest(node_metrics.registry).decode()
        assert 'knexa_connections{kind="relayed"} 1.0' in text
        assert 'knexa_connections_opened_total{kind="relayed"} 1.0' in text and "knexa_reachable 1.0" in text
        relay_text = generate_latest(relay_metrics.registry).decode()
        assert f"knexa_relay_bytes_total {float(summary['bytes_relayed'])}" in relay_text
        nursery.cancel_scope.cancel()


async def test_relay_refuses_a_non_member():
    cpm_id, member_id, outsider_id = ident(), ident(), ident()
    members = {member_id.peer_bytes}
    gate = MemberGate(members.__contains__)
    async with open_host(cpm_id, gate=gate, relay=RelayPolicy()) as cpm, \
            open_host(outsider_id, relay_client=True) as outsider:
        relay = cpm.peer_id
        # the outsider cannot hold a connection to the relay, so it cannot reserve or open a circuit
        try:
            await outsider.connect(cpm.addrs()[0], timeout=5)
            with trio.fail_after(10):
                await outsider.relay_client.reserve(cpm.addrs()[0], relay)
            raise AssertionError("a non-member got a reservation")
        except Exception as exc:  # DialError, stream reset or RelayError: refused in every case
            assert "non-member got" not in str(exc)
        assert gate.refused["not_member"] >= 1
        assert cpm.relay.summary().get("reservations", 0) == 0


async def test_relay_cuts_a_circuit_at_its_byte_limit():
    cpm_id, a_id, b_id = ident(), ident(), ident()
    members = {a_id.peer_bytes, b_id.peer_bytes}
    policy = RelayPolicy(circuit_bytes=256 * 1024)
    async with open_host(cpm_id, gate=MemberGate(members.__contains__), relay=policy) as cpm, \
            open_host(a_id, relay_client=True) as a, open_host(b_id, relay_client=True) as b:
        b.set_handler("/t/echo", _echo)
        addr = cpm.addrs()[0]
        await b.connect(addr)
        await b.relay_client.reserve(addr, cpm.peer_id)
        assert await a.dial_relayed(b.peer_id, circuit_addr(addr, cpm.peer_id))
        small = await a.open_stream(b.peer_id, "/t/echo")
        await small.send(b"x" * 1000)
        assert await small.receive(max_size=1 << 20, timeout=10) == b"x" * 1000
        big = await a.open_stream(b.peer_id, "/t/echo")
        with pytest.raises(StreamBroken):  # 2 x 200 kB crosses the 256 KiB circuit budget
            await big.send(os.urandom(200_000))
            await big.receive(max_size=1 << 20, timeout=10)
        with trio.fail_after(10):  # the relay reset the circuit: the relayed connection is gone
            while a.is_connected(b.peer_id):
                await trio.sleep(0.05)
        assert cpm.relay.summary()["bytes_relayed"] <= 256 * 1024


async def _echoes(src, dst) -> bool:
    stream = await src.open_stream(dst.peer_id, "/t/echo", timeout=5)
    try:
        await stream.send(b"ping")
        return await stream.receive(max_size=64, timeout=5) == b"ping"
    finally:
        await stream.close()


def _open_circuits(relay) -> int:
    summary = relay.summary()
    return summary.get("circuits", 0) - summary.get("circuits_closed", 0)


def test_relay_allows_each_member_8_circuits_by_default():
    assert RelayPolicy().max_circuits_per_peer == 8
    assert RelayPolicy().limits().max_circuit_conns == 8


async def test_relay_caps_the_circuits_to_a_member_and_keeps_serving():
    """The per-member circuit limit (8 by default; 2 here) counts the circuits open to a member that
    holds a reservation. Up to the limit they all carry streams; the next is refused at once with
    RESOURCE_LIMIT_EXCEEDED; closing one frees a slot without disturbing its siblings; another
    member is reached meanwhile."""
    cpm_id, b_id, c_id, a1_id, a2_id, a3_id = (ident() for _ in range(6))
    members = {i.peer_bytes for i in (b_id, c_id, a1_id, a2_id, a3_id)}
    policy = RelayPolicy(max_circuits_per_peer=2)
    async with open_host(cpm_id, gate=MemberGate(members.__contains__), relay=policy) as cpm, \
            open_host(b_id, relay_client=True) as b, open_host(c_id, relay_client=True) as c, \
            open_host(a1_id, relay_client=True) as a1, open_host(a2_id, relay_client=True) as a2, \
            open_host(a3_id, relay_client=True) as a3:
        addr, relay = cpm.addrs()[0], cpm.peer_id
        for target in (b, c):
            target.set_handler("/t/echo", _echo)
            await target.connect(addr)
            await target.relay_client.reserve(addr, relay)
        for source in (a1, a2, a3):
            await source.connect(addr)
        circuits = {}
        for source in (a1, a2):  # up to the limit: each circuit carries streams
            circuits[source] = await source.relay_client.dial(relay, b.peer_id, timeout=10)
            assert await _echoes(source, b)
        assert _open_circuits(cpm.relay) == 2

        with trio.fail_after(5), pytest.raises(RelayError, match="RESOURCE_LIMIT_EXCEEDED"):
            await a3.relay_client.dial(relay, b.peer_id, timeout=10)
        assert cpm.relay.summary()["refused_circuit_limit"] == 1 and not a3.is_connected(b.peer_id)
        # the relay keeps serving: a3 reaches another member, and b's two circuits still work
        await a3.relay_client.dial(relay, c.peer_id, timeout=10)
        assert await _echoes(a3, c)
        assert await _echoes(a1, b) and await _echoes(a2, b)

        await circuits[a1].close()
        with trio.fail_after(10):
            while _open_circuits(cpm.relay) > 2:  # a2 -> b and a3 -> c remain
                await trio.sleep(0.05)
        # closing a1's circuit left a2's alone (py-libp2p 0.8.1 closed whichever circuit to b was
        # filed last, see nat._PerPeerCircuits; a2's went within ~0.4 s)
        await trio.sleep(1.0)
        assert a2.is_connected(b.peer_id) and _open_circuits(cpm.relay) == 2
        # the slot is free again
        await a3.relay_client.dial(relay, b.peer_id, timeout=10)
        assert await _echoes(a3, b) and await _echoes(a2, b) and await _echoes(a3, c)
        assert _open_circuits(cpm.relay) == 3 and cpm.relay.summary()["refused_circuit_limit"] == 1


async def test_relay_circuit_limit_holds_for_simultaneous_requests():
    # py-libp2p counts a circuit only once the member answered; requests that arrive together
    # all passed its check. The relay counts each one from its request on.
    cpm_id, b_id, *source_ids = (ident() for _ in range(6))
    members = {i.peer_bytes for i in (b_id, *source_ids)}
    async with open_host(cpm_id, gate=MemberGate(members.__contains__),
                         relay=RelayPolicy(max_circuits_per_peer=2)) as cpm, \
            open_host(b_id, relay_client=True) as b, contextlib.AsyncExitStack() as stack:
        sources = [await stack.enter_async_context(open_host(i, relay_client=True)) for i in source_ids]
        addr, relay = cpm.addrs()[0], cpm.peer_id
        b.set_handler("/t/echo", _echo)
        await b.connect(addr)
        await b.relay_client.reserve(addr, relay)
        for source in sources:
            await source.connect(addr)
        outcomes: dict[str, list] = {"ok": [], "refused": []}

        async def dial(source) -> None:
            try:
                await source.relay_client.dial(relay, b.peer_id, timeout=10)
                outcomes["ok"].append(source)
            except RelayError as exc:
                assert "RESOURCE_LIMIT_EXCEEDED" in str(exc)
                outcomes["refused"].append(source)

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                for source in sources:
                    nursery.start_soon(dial, source)
        assert len(outcomes["ok"]) == 2 and len(outcomes["refused"]) == 2
        for source in outcomes["ok"]:
            assert await _echoes(source, b)
        assert cpm.relay.summary()["refused_circuit_limit"] == 2


async def test_relay_checks_membership_again_on_every_hop_stream():
    # a relay whose connection gate is open (e.g. a member's node with an empty roster): the hop
    # handler still refuses anyone its relay predicate does not name
    relay_id, member_id, outsider_id = ident(), ident(), ident()
    members = {member_id.peer_bytes}
    async with open_host(relay_id, relay=RelayPolicy(), relay_members=members.__contains__) as relay, \
            open_host(outsider_id, relay_client=True) as outsider, \
            open_host(member_id, relay_client=True) as member:
        addr = relay.addrs()[0]
        await outsider.connect(addr)
        with pytest.raises(RelayError, match="PERMISSION_DENIED"):
            await outsider.relay_client.reserve(addr, relay.peer_id)
        assert not await outsider.dial_relayed(member.peer_id, circuit_addr(addr, relay.peer_id))
        await member.connect(addr)
        assert await member.relay_client.reserve(addr, relay.peer_id) > 0
        assert relay.relay.summary()["refused_not_member"] == 2 and relay.relay.summary()["reservations"] == 1


async def test_dial_back_uses_a_fresh_connection_and_proves_the_peer_id():
    cpm_id, node_id, other_id = ident(), ident(), ident()
    members = {node_id.peer_bytes}
    async with open_host(cpm_id, gate=MemberGate(members.__contains__)) as cpm, \
            open_host(node_id, gate=MemberGate(lambda p: p == cpm.peer_id)) as node, \
            open_host(other_id) as other:
        service = DialBackService(cpm, members.__contains__, timeout=3)
        cpm.set_handler(DIALBACK_PROTOCOL, service.handle)
        await node.connect(cpm.addrs()[0])
        assert await check_reachability(node, cpm.peer_id) == "public"
        # the node refused the announced throwaway dialer after Noise without counting an intrusion
        assert node.gate.refused["not_member"] == 0 and not node.gate.dialback
        assert service.counts["public"] == 1
        port = int(node.addrs()[0].split("/tcp/")[1].split("/")[0])
        key = new_dialer_key()
        assert await dial_back("127.0.0.1", port, node.peer_id, key, timeout=3)
        # a closed port is not reachable, although the node is connected to the CPM
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        assert not await dial_back("127.0.0.1", closed, node.peer_id, key, timeout=3)
        # another peer listening there is not the node either
        other_port = int(other.addrs()[0].split("/tcp/")[1].split("/")[0])
        assert not await dial_back("127.0.0.1", other_port, node.peer_id, key, timeout=3)


async def test_dial_back_says_private_when_the_observed_address_does_not_answer():
    # the node listens on 127.0.0.2 but reaches the CPM from 127.0.0.1: the CPM dials the IP it
    # observes (never one the node names), finds nothing there, and says private, although the
    # node's connection to the CPM is up the whole time
    cpm_id, node_id = ident(), ident()
    members = {node_id.peer_bytes}
    async with open_host(cpm_id, gate=MemberGate(members.__contains__)) as cpm, \
            open_host(node_id, ("/ip4/127.0.0.2/tcp/0",), gate=MemberGate(lambda p: p == cpm.peer_id)) as node:
        service = DialBackService(cpm, members.__contains__, timeout=3)
        cpm.set_handler(DIALBACK_PROTOCOL, service.handle)
        await node.connect(cpm.addrs()[0])
        assert await check_reachability(node, cpm.peer_id) == "private"
        assert node.is_connected(cpm.peer_id) and service.counts["private"] == 1


async def test_dial_back_answers_bad_requests_with_an_error_and_keeps_serving():
    """Malformed ports, ports out of range and a peer the CPM does not count as a member get one
    error reply each; nothing is dialled, and the next proper request still works."""
    cpm_id, node_id, stranger_id = ident(), ident(), ident()
    members = {node_id.peer_bytes}
    admitted = {node_id.peer_bytes, stranger_id.peer_bytes}  # the gate lets both in; the service does not
    async with open_host(cpm_id, gate=MemberGate(admitted.__contains__)) as cpm, \
            open_host(node_id, gate=MemberGate(lambda p: p == cpm.peer_id)) as node, \
            open_host(stranger_id, gate=MemberGate(lambda p: p == cpm.peer_id)) as stranger:
        service = DialBackService(cpm, members.__contains__, timeout=3)
        cpm.set_handler(DIALBACK_PROTOCOL, service.handle)
        await node.connect(cpm.addrs()[0])
        await stranger.connect(cpm.addrs()[0])

        async def ask(host, request) -> dict:
            stream = await host.open_stream(cpm.peer_id, DIALBACK_PROTOCOL, timeout=5)
            try:
                if request is not None:
                    await stream.send(request)
                return unpack(await stream.receive(max_size=4096, timeout=5))
            finally:
                await stream.close()

        assert "bad request" in (await ask(node, pack({"ports": ["http"]})))["error"]
        assert "bad request" in (await ask(node, pack({"port": 1})))["error"]
        assert "bad request" in (await ask(node, b"\xc1 not msgpack"))["error"]
        assert (await ask(node, pack({"ports": [0, 70000]})))["error"] == "no address to dial"
        assert (await ask(stranger, None))["error"] == "not a member"
        assert service.counts["refused"] == 1 and service.counts["public"] == service.counts["private"] == 0
        assert await check_reachability(node, cpm.peer_id) == "public"


async def test_reservation_is_renewed_before_it_expires():
    cpm_id, b_id = ident(), ident()
    members = {b_id.peer_bytes}
    async with open_host(cpm_id, gate=MemberGate(members.__contains__),
                         relay=RelayPolicy(reservation_ttl_s=2)) as cpm, \
            open_host(b_id, relay_client=True) as b, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(keep_reservation, b, cpm.addrs()[0], min_renew_s=0.5))
        await trio.sleep(5.0)  # 2.5 lifetimes
        assert b.relay_client.circuit_addrs()  # still valid
        assert cpm.relay.summary()["reservations"] >= 4 and cpm.relay.summary()["active_reservations"] == 1
        nursery.cancel_scope.cancel()

"""Discovery through the CPM over real libp2p: signed peer records published and fetched.

Nodes here know only the CPM's address. A member that restarts on another port publishes a newer
record and is reached there; records that do not verify, or that a member publishes for someone
else, are refused; a member removed from the roster disappears from the directory.
"""

from __future__ import annotations

import os

import msgpack
import trio

from knexa_p2p.directory import (
    PEERS_PROTOCOL,
    DirectoryError,
    PeerDirectory,
    exchange_records,
    open_record,
)
from knexa_p2p.host import MemberGate, open_host
from tests.support.identities import ident


async def _echo(stream) -> None:
    await stream.send(await stream.receive(max_size=64, timeout=5))


async def _ask(host, peer: bytes) -> bytes:
    s = await host.open_stream(peer, "/t/echo", timeout=10)
    await s.send(b"ping")
    try:
        return await s.receive(max_size=64, timeout=5)
    finally:
        await s.close()


async def test_member_found_through_cpm_and_again_after_moving():
    cpm_id, a_id, b_id, m_id = ident(), ident(), ident(), ident()
    members = {p.peer_bytes for p in (a_id, b_id, m_id)}
    directory = PeerDirectory(lambda p: p in members)
    async with open_host(cpm_id, gate=MemberGate(lambda p: p in members)) as cpm, \
            open_host(b_id) as b:
        cpm.set_handler(PEERS_PROTOCOL, directory.handle)
        cpm_addr = cpm.addrs()[0]
        await b.connect(cpm_addr)
        assert await exchange_records(b, cpm.peer_id) == []  # nobody else yet

        async with open_host(a_id) as a:
            a.set_handler("/t/echo", _echo)
            await a.connect(cpm_addr)
            first = await exchange_records(a, cpm.peer_id)
            assert [r.peer for r in first] == [b.peer_id]
            got = await exchange_records(b, cpm.peer_id)
            assert [r.peer for r in got] == [a.peer_id] and set(got[0].addrs) == {a.addrs()[0].split("/p2p/")[0]}
            assert not b.is_connected(a.peer_id)
            assert await _ask(b, a.peer_id) == b"ping"  # dialled from the record alone
            old_addr, old_seq = a.addrs()[0], got[0].seq

        # A restarts on another port with the same identity and republishes
        async with open_host(a_id) as a2:
            a2.set_handler("/t/echo", _echo)
            assert a2.addrs()[0] != old_addr
            await a2.connect(cpm_addr)
            await exchange_records(a2, cpm.peer_id)
            got = await exchange_records(b, cpm.peer_id)
            assert got[0].seq > old_seq and got[0].addrs == (a2.addrs()[0].split("/p2p/")[0],)
            with trio.fail_after(20):
                assert await _ask(b, a2.peer_id) == b"ping"

            # a member cannot publish a record for someone else, nor garbage
            async with open_host(m_id) as m:
                await m.connect(cpm_addr)
                for payload in (got[0].envelope, os.urandom(200)):
                    s = await m.open_stream(cpm.peer_id, PEERS_PROTOCOL)
                    await s.send(payload)
                    reply = msgpack.unpackb(await s.receive(max_size=1 << 20, timeout=5))
                    assert reply["ok"] is False and reply["records"] == []
                assert directory.rejected["bad_record"] == 2
            assert directory.records[a_id.peer_bytes].seq == got[0].seq  # unchanged

            # removed from the roster: no longer handed out
            members.discard(a_id.peer_bytes)
            assert [r.peer for r in await exchange_records(b, cpm.peer_id)] == []


def test_open_record_rejects_tampering():
    async def main() -> None:
        async with open_host(ident()) as h:
            env = h.signed_record()
            rec = open_record(env, signer=h.peer_id)
            assert rec.peer == h.peer_id and rec.addrs
            flipped = bytearray(env)
            flipped[-5] ^= 1
            for bad, signer in ((bytes(flipped), None), (env, ident().peer_bytes)):
                try:
                    open_record(bad, signer=signer)
                except DirectoryError:
                    continue
                raise AssertionError("a tampered or misattributed record verified")

    trio.run(main)


async def test_wildcard_listen_address_is_expanded_in_the_record():
    """`knexa-node init` listens on 0.0.0.0 by default; a record saying 0.0.0.0 is useless."""
    import multiaddr
    import pytest
    from libp2p.utils.address_validation import expand_wildcard_address

    if str(expand_wildcard_address(multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/1"))[0]).startswith("/ip4/0.0.0.0"):
        pytest.skip("this machine has no non-loopback IPv4 interface to advertise")
    async with open_host(ident(), ["/ip4/0.0.0.0/tcp/0"]) as h:
        rec = open_record(h.signed_record(), signer=h.peer_id)
        assert rec.addrs and not any(a.startswith("/ip4/0.0.0.0/") for a in rec.addrs)
        port = h.addrs()[0].split("/tcp/")[1].split("/")[0]
        assert all(a.endswith(f"/tcp/{port}") for a in rec.addrs)

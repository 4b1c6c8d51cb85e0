"""A peer that was down is reachable again as soon as it is back (in-process, real libp2p).

This is what "reconnect with exponential backoff when the CPM or a peer restarts" rests on: the
daemons pace their own redials (keep_connected: 0.5 s doubling to 30 s; submit: 1 s doubling to
30 s), so the transport must not refuse a dial on its own for longer than that. py-libp2p 0.8.1
does: its Swarm keeps a peer whose dial failed in a 60 s negative cache, and nodes stayed cut off
from a restarted CPM for a minute until P2PHost cleared that cache before each dial.
"""

from __future__ import annotations

import os

import pytest
import trio

from knexa_lab.launcher import _free_ports
from knexa_p2p.host import DialError, open_host
from knexa_p2p.identity import Identity
from knexa_p2p.streams import StreamBroken
from protocol import CPM_PROTOCOL

pytestmark = [pytest.mark.faults]

async def _echo(stream) -> None:
    await stream.send(await stream.receive(max_size=64, timeout=5))


@pytest.mark.timeout(60)
async def test_peer_back_after_downtime_is_dialled_at_once():
    dialer, peer = Identity.from_seed(os.urandom(32)), Identity.from_seed(os.urandom(32))
    [port] = _free_ports(1)
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer.peer_id}"
    refused: Exception | None = None
    async with open_host(dialer) as a:
        with pytest.raises(DialError):  # the peer is down (a CPM being restarted)
            await a.connect(addr, timeout=5)
        async with open_host(peer, [f"/ip4/127.0.0.1/tcp/{port}"]) as b:
            b.set_handler(CPM_PROTOCOL, _echo)
            await trio.sleep(1.0)  # one backoff step later, as keep_connected and submit wait
            try:
                with trio.fail_after(20):
                    await a.connect(addr, timeout=5)
                    stream = await a.open_stream(peer.peer_bytes, CPM_PROTOCOL, timeout=5)
                    await stream.send(b"ping")
                    assert await stream.receive(max_size=64, timeout=5) == b"ping"
                    await stream.close()
            except (DialError, StreamBroken) as exc:
                refused = exc
    assert refused is None, f"the peer is back but the dial was refused: {refused}"

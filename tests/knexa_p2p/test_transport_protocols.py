"""Exactly Noise for security and exactly Yamux for muxing, checked on the wire.

py-libp2p's `create_yamux_muxer_option()` also offers Mplex (which deadlocked under concurrent
streams) and its default host also offers plaintext; a client that speaks only those must be refused.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from knexa_p2p.host import MUXER_PROTOCOLS, SECURITY_PROTOCOLS, open_host
from knexa_p2p.identity import Identity
from tests.support.identities import ident

MULTISTREAM = "/multistream/1.0.0"


def _frame(text: str) -> bytes:
    body = (text + "\n").encode()
    assert len(body) < 128  # one-byte uvarint is enough for these short lines
    return bytes([len(body)]) + body


async def _read_line(sock: trio.SocketStream) -> str:
    buf = b""
    while True:
        chunk = await sock.receive_some(1)
        if not chunk:
            raise EOFError("listener closed the connection")
        buf += chunk
        if len(buf) > 1 and len(buf) - 1 == buf[0]:
            return buf[1:].decode().rstrip("\n")


async def _security_answers(host_addr: str, candidates: list[str]) -> dict[str, bool]:
    """Speak multistream-select by hand on a raw TCP connection: which proposals are accepted?"""
    ma = multiaddr.Multiaddr(host_addr)
    out: dict[str, bool] = {}
    for proto in candidates:  # one connection per proposal: an accepted one starts its handshake
        sock = await trio.open_tcp_stream(ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp")))
        try:
            await sock.send_all(_frame(MULTISTREAM))
            assert await _read_line(sock) == MULTISTREAM
            await sock.send_all(_frame(proto))
            answer = await _read_line(sock)
            assert answer in (proto, "na"), answer
            out[proto] = answer == proto
        finally:
            await sock.aclose()
    return out


async def test_host_offers_exactly_noise_and_yamux():
    async with open_host(ident()) as h:
        assert h.offered_protocols() == {"security": ["/noise"], "muxer": ["/yamux/1.0.0"]}
        assert list(SECURITY_PROTOCOLS) == ["/noise"] and list(MUXER_PROTOCOLS) == ["/yamux/1.0.0"]
        with trio.fail_after(10):
            answers = await _security_answers(h.addrs()[0], [
                "/noise", "/plaintext/2.0.0", "/plaintext/1.0.0", "/tls/1.0.0", "/secio/1.0.0"])
        assert answers == {"/noise": True, "/plaintext/2.0.0": False, "/plaintext/1.0.0": False,
                           "/tls/1.0.0": False, "/secio/1.0.0": False}


def _client(muxer: dict) -> tuple[Identity, object]:
    me = ident()
    noise = NoiseTransport(me.key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return me, new_host(key_pair=me.key_pair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise}, muxer_opt=muxer)


@pytest.mark.parametrize(("muxer", "accepted"), [
    ({TProtocol(MPLEX_PROTOCOL_ID): Mplex}, False),
    ({TProtocol(YAMUX_PROTOCOL_ID): Yamux}, True),  # the control: same client, Yamux, gets through
])
async def test_mplex_only_client_is_refused(muxer, accepted):
    received: list[bytes] = []
    async with open_host(ident()) as honest:

        async def handler(stream):
            received.append(await stream.receive(max_size=1024, timeout=5))

        honest.set_handler("/t/x", handler)
        _me, client = _client(muxer)
        async with client.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(honest.addrs()[0]))
            try:
                with trio.fail_after(10):
                    await client.connect(info)
                    s = await client.new_stream(info.peer_id, [TProtocol("/t/x")])
                    await s.write(b"\x00\x00\x00\x01x")
                    while not received:
                        await trio.sleep(0.05)
                outcome = True
            except Exception:  # noqa: BLE001 - any failure to connect or deliver is a refusal
                outcome = False
            await client.close()
    assert outcome is accepted
    assert (received == [b"x"]) is accepted

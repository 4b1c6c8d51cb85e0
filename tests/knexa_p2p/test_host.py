"""Real libp2p hosts on loopback: framing, timeouts, pubsub, and Noise-only security."""

import os

import pytest
import trio

from knexa_p2p.host import DialError, GossipSettings, open_host
from knexa_p2p.identity import IdentityError, load_or_create_identity
from knexa_p2p.streams import StreamBroken
from tests.support.identities import ident


async def test_framed_echo_large_payload_and_pubsub():
    g = GossipSettings.for_size(2)
    async with open_host(ident(), gossip=g) as a, open_host(ident(), gossip=g) as b:

        async def echo(stream):
            data = await stream.receive(max_size=4 << 20, timeout=10)
            await stream.send(data[::-1])

        a.set_handler("/t/echo", echo)
        assert await b.connect(a.addrs()[0]) == a.peer_id
        payload = os.urandom(3 << 20)
        s = await b.open_stream(a.peer_id, "/t/echo")
        await s.send(payload)
        assert await s.receive(max_size=4 << 20, timeout=10) == payload[::-1]
        await s.close()

        sub = await b.subscribe("topic")
        await a.subscribe("topic")
        await trio.sleep(1.5)
        await a.publish("topic", b"directive")
        with trio.fail_after(10):
            msg = await sub.get()
        assert msg.data == b"directive" and msg.from_id == a.peer_id


async def test_frozen_peer_times_out_and_oversize_prefix_rejected():
    async with open_host(ident()) as a, open_host(ident()) as b:
        got: list[str] = []

        async def reader(stream):
            try:
                await stream.receive(max_size=1024, timeout=0.5)
            except StreamBroken as exc:
                got.append(str(exc))

        a.set_handler("/t/slow", reader)
        await b.connect(a.addrs()[0])
        s = await b.open_stream(a.peer_id, "/t/slow")
        await s._stream.write(b"\x00\x00")  # half a header, then silence (slow loris)
        await trio.sleep(1.0)
        assert got and "no complete frame" in got[0]

        from protocol import OversizeError

        errors: list[BaseException] = []

        async def capped(stream):
            try:
                await stream.receive(max_size=1024, timeout=5)
            except OversizeError as exc:
                errors.append(exc)

        a.set_handler("/t/cap", capped)
        s2 = await b.open_stream(a.peer_id, "/t/cap")
        await s2._stream.write((1 << 30).to_bytes(4, "big"))
        await trio.sleep(0.5)
        assert errors


async def test_dial_errors_are_clear():
    async with open_host(ident()) as a:
        with pytest.raises(DialError, match="invalid multiaddr"):
            await a.connect("not-a-multiaddr")
        missing = f"/ip4/127.0.0.1/tcp/1/p2p/{ident().peer_id}"
        with pytest.raises(DialError, match="cannot reach"):
            await a.connect(missing, timeout=3)


def test_identity_file_is_private_and_stable(tmp_path):
    path = tmp_path / "id.key"
    first = load_or_create_identity(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_identity(path).peer_id == first.peer_id
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_or_create_identity(path)


async def test_plaintext_client_claiming_another_peer_is_refused():
    """py-libp2p's default host speaks /plaintext/2.0.0; ours must refuse it at negotiation.

    The dial must fail *because security negotiation failed* (not, say, a wrong address), and the
    same client offering Noise must get through: only the plaintext offer is refused.
    """
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.exceptions import SwarmDialAllFailedError
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    def causes(exc: BaseException) -> list[BaseException]:
        seen: list[BaseException] = []
        todo = [exc]
        while todo:
            e = todo.pop()
            if e is None or any(e is s for s in seen):
                continue
            seen.append(e)
            todo += [e.__cause__, e.__context__, *getattr(e, "errors", ())]
        return seen

    victim = ident()
    attacker = ident()
    forged = KeyPair(attacker.key_pair.private_key, victim.key_pair.public_key)
    evil = new_host(key_pair=attacker.key_pair, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(forged)})
    honest_client = new_host(key_pair=attacker.key_pair, muxer_opt={TProtocol(YAMUX_ID): Yamux}, sec_opt={
        TProtocol(NOISE_ID): NoiseTransport(attacker.key_pair, noise_privkey=create_x25519_key_pair().private_key)})
    async with open_host(ident()) as honest:
        info = info_from_p2p_addr(multiaddr.Multiaddr(honest.addrs()[0]))
        async with evil.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(10), pytest.raises(SwarmDialAllFailedError) as refused:
                await evil.connect(info)
            await evil.close()
        assert any("failed to negotiate the secure protocol" in str(e) for e in causes(refused.value)), \
            [repr(e) for e in causes(refused.value)]
        assert not honest.is_connected(attacker.peer_bytes) and not honest.is_connected(victim.peer_bytes)
        async with honest_client.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(10):
                await honest_client.connect(info)  # the control: same client, Noise, same address
            await honest_client.close()

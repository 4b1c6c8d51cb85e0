"""Real libp2p hosts on loopback: framing, timeouts, pubsub, and Noise-only security."""

import os

import pytest
import trio

from knexa_p2p.host import DialError, GossipSettings, open_host
from knexa_p2p.identity import Identity, IdentityError, load_or_create_identity
from knexa_p2p.streams import StreamBroken


def ident() -> Identity:
    return Identity.from_seed(os.urandom(32))


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
    """py-libp2p's default host speaks /plaintext/2.0.0; ours must refuse it at negotiation."""
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.keys import KeyPair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    victim = ident()
    attacker = ident()
    forged = KeyPair(attacker.key_pair.private_key, victim.key_pair.public_key)
    evil = new_host(key_pair=attacker.key_pair, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(forged)})
    received: list[bytes] = []
    async with open_host(ident()) as honest:

        async def handler(stream):
            received.append(await stream.receive(max_size=1024, timeout=5))

        honest.set_handler("/t/x", handler)
        async with evil.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(honest.addrs()[0]))
            with pytest.raises(Exception):  # noqa: B017 - any failure is fine; success is not
                with trio.fail_after(10):
                    await evil.connect(info)
                    s = await evil.new_stream(info.peer_id, [TProtocol("/t/x")])
                    await s.write(b"\x00\x00\x00\x01x")
                    await trio.sleep(0.5)
                    if not received:
                        raise ConnectionError("nothing delivered")
            await evil.close()
    assert not received

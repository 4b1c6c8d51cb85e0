"""Reachability by dial-back, relay reservations, and what a node behind a NAT keeps up.

The dial-back exchange on `DIALBACK_PROTOCOL` (one stream, msgpack frames):

    node -> CPM   {"ports": [4002]}                       the TCP ports it listens on
    CPM  -> node  {"dialer": <peer id>, "addrs": [...]}   who will dial, and where: the IP the
                                                          CPM observed on this very connection
    node -> CPM   {"go": true}                            (its gate now knows the dialer)
    CPM  -> node  {"reachable": [...]}                    addresses whose Noise handshake completed

The CPM dials from a fresh socket with a throwaway identity (`nat.dial_back`), so the answer never
rides the existing connection (the flaw of py-libp2p 0.8.1's AutoNAT). It only dials the IP it
observed, and at most `MAX_PORTS` ports: a member cannot aim it at anybody else.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from .host import DialError, P2PHost
from .nat import DIALBACK_PROTOCOL, RelayError, dial_back, new_dialer_key, pack, unpack
from .streams import FramedStream, StreamBroken

__all__ = ["DIALBACK_PROTOCOL", "DialBackService", "ReachabilityError", "check_reachability", "keep_reservation"]

logger = logging.getLogger(__name__)
MAX_PORTS = 4
FRAME_CAP = 4096


class ReachabilityError(Exception):
    """The dial-back exchange failed (the CPM did not answer properly)."""


class DialBackService:
    """The CPM's side: dial members back on a fresh connection and say what worked."""

    def __init__(self, host: P2PHost, is_member: Callable[[bytes], bool], *, timeout: float = 5.0) -> None:
        self.host = host
        self.is_member = is_member
        self.timeout = timeout
        self.counts: Counter[str] = Counter()

    async def handle(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        if not self.is_member(peer):
            self.counts["refused"] += 1
            await stream.send(pack({"error": "not a member"}))
            return
        try:
            ports = [int(p) for p in unpack(await stream.receive(max_size=FRAME_CAP, timeout=self.timeout))["ports"]]
        except (KeyError, TypeError, ValueError) as exc:
            await stream.send(pack({"error": f"bad request: {exc}"[:200]}))
            return
        ip = self.host.observed_ip(stream)
        ports = [p for p in dict.fromkeys(ports) if 0 < p < 65536][:MAX_PORTS]
        if ip is None or not ports:
            await stream.send(pack({"error": "no address to dial"}))
            return
        key = new_dialer_key()
        dialer = ID.from_pubkey(key.public_key).to_bytes()
        family = "ip6" if ":" in ip else "ip4"
        await stream.send(pack({"dialer": dialer, "addrs": [f"/{family}/{ip}/tcp/{p}" for p in ports]}))
        unpack(await stream.receive(max_size=FRAME_CAP, timeout=self.timeout))  # "go"
        reachable = []
        for port in ports:
            if await dial_back(ip, port, peer, key, timeout=self.timeout):
                reachable.append(f"/{family}/{ip}/tcp/{port}")
        self.counts["public" if reachable else "private"] += 1
        logger.info("dial-back peer=%s ip=%s ports=%s reachable=%s", str(ID(peer))[-8:], ip, ports,
                    bool(reachable), extra={"event": "dialback", "reachable": bool(reachable)})
        await stream.send(pack({"reachable": reachable}))


def _listen_ports(host: P2PHost) -> list[int]:
    ports = []
    for a in host.addrs():
        parts = a.split("/")
        if "tcp" in parts and "p2p-circuit" not in parts:
            ports.append(int(parts[parts.index("tcp") + 1]))
    return list(dict.fromkeys(ports))


async def check_reachability(host: P2PHost, cpm: bytes, *, timeout: float = 20.0) -> str:
    """Ask the CPM to dial us back; sets and returns `host.reachability` ("public"/"private")."""
    stream = await host.open_stream(cpm, DIALBACK_PROTOCOL, timeout=timeout)
    dialer = b""
    try:
        await stream.send(pack({"ports": _listen_ports(host)}))
        offer = unpack(await stream.receive(max_size=FRAME_CAP, timeout=timeout))
        if "error" in offer:
            raise ReachabilityError(f"the CPM refused a dial-back: {offer['error']}")
        dialer = bytes(offer["dialer"])
        if host.gate is not None:
            host.gate.dialback.add(dialer)
        await stream.send(pack({"go": True}))
        result = unpack(await stream.receive(max_size=FRAME_CAP, timeout=timeout))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReachabilityError(f"bad dial-back reply: {exc}") from exc
    finally:
        if host.gate is not None:
            host.gate.dialback.discard(dialer)
        await stream.close()
    host.reachability = "public" if result.get("reachable") else "private"
    logger.info("reachability=%s (dial-back by the CPM to %s)", host.reachability, ",".join(offer["addrs"]),
                extra={"event": "reachability", "reachability": host.reachability})
    return host.reachability


async def keep_reservation(host: P2PHost, relay_addr: str, *, on_change: Callable[[], object] | None = None,
                           retry_s: float = 5.0, min_renew_s: float = 30.0) -> None:
    """Hold a reservation at the relay `relay_addr` (full multiaddr) for as long as this runs:
    renew it at half its lifetime, re-dial and re-reserve after a failure. `on_change` runs
    whenever the circuit addresses change (the daemon republishes its peer record). The expiry is
    the relay's clock; `min_renew_s` keeps a skewed clock from turning renewals into a loop."""
    assert host.relay_client is not None
    delay = retry_s
    while True:
        try:
            relay = await host.connect(relay_addr, timeout=10.0)
            had = host.relay_client.circuit_addrs()
            expire = await host.relay_client.reserve(relay_addr, relay)
            delay = retry_s
            if host.relay_client.circuit_addrs() != had:
                logger.info("relay reservation via=%s addrs=%s", relay_addr.rsplit("/", 1)[-1][-8:],
                            ",".join(host.relay_client.circuit_addrs()), extra={"event": "reservation"})
                if on_change is not None:
                    on_change()
            await trio.sleep(max(min_renew_s, (expire - time.time()) / 2))
        except (DialError, RelayError, StreamBroken, BaseLibp2pError, trio.TooSlowError, OSError) as exc:
            logger.info("relay reservation at %s failed (next try in %.0fs): %s: %s", relay_addr, delay,
                        type(exc).__name__, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 120.0)

"""A py-libp2p host configured for KNEXA: Noise + Yamux only, members only, GossipSub for small meshes.

Why explicit options: py-libp2p's default host also offers `/plaintext/2.0.0`, which lets a
client claim any peer id without its key; `create_yamux_muxer_option()` also offers Mplex, which
deadlocked under concurrent streams (and a Mplex-only client connected); the default GossipSub
heartbeat is 120 s and adaptive gossip stretched it to 30-60 s in small meshes; mesh degree bounds
larger than the peer count collapsed the mesh in GRAFT/PRUNE storms.

Members only: a `MemberGate` is checked inside the security transport, right after the Noise
handshake has authenticated the remote peer id and before the muxer is negotiated, so a
non-member never gets a stream, an identify exchange or a pubsub subscription.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream, IRawConnection, ISecureConn, ISubscriptionAPI
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.peer.envelope import consume_envelope, seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service.context import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from .identity import Identity
from .nat import (
    ConnectionKinds,
    DialerDCUtR,
    MemberRelay,
    RelayClient,
    RelayError,
    RelayPolicy,
    connection_kind,
    is_circuit,
)
from .streams import FramedStream, StreamBroken

__all__ = ["MUXER_PROTOCOLS", "SECURITY_PROTOCOLS", "DialError", "GossipSettings", "MemberGate", "P2PHost", "open_host"]

logger = logging.getLogger(__name__)
GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
#: the only protocols a KNEXA host offers at each upgrade step (tests/knexa_p2p/test_transport_protocols.py)
SECURITY_PROTOCOLS = (str(NOISE_PROTOCOL_ID),)
MUXER_PROTOCOLS = (str(YAMUX_PROTOCOL_ID),)


def _route_library_logs() -> None:
    """`import libp2p` sets its logger to propagate=False with no handler, so its warnings went to
    Python's last-resort handler: bare, multi-line, without a timestamp. Send them to the daemon's
    handlers (which fold them to one line) unless LIBP2P_DEBUG gave libp2p handlers of its own."""
    lib = logging.getLogger("libp2p")
    if not lib.handlers:
        lib.propagate = True


_route_library_logs()


class DialError(Exception):
    """A peer could not be reached (bad address, nobody listening, handshake failed)."""


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """GossipSub knobs; `for_size` fits mesh degrees to the expected number of peers."""

    degree: int = 3
    degree_low: int = 2
    degree_high: int = 4
    heartbeat_interval: int = 1

    @classmethod
    def for_size(cls, n_peers: int, heartbeat_interval: int = 1) -> GossipSettings:
        others = max(1, n_peers - 1)
        degree = min(6, others)
        return cls(
            degree=degree,
            degree_low=max(1, degree // 2),
            degree_high=max(degree, min(12, others)),
            heartbeat_interval=heartbeat_interval,
        )


class MemberGate:
    """Decides who may hold a connection to this host; counts refusals by reason.

    `is_member` is called with the authenticated peer id (bytes) of every new connection, in both
    directions, so a daemon that reloads its roster changes the answer at once (no restart).
    `on_refused(reason, peer)` lets the daemon feed its own metrics.
    """

    def __init__(self, is_member: Callable[[bytes], bool],
                 on_refused: Callable[[str, bytes], None] | None = None) -> None:
        self.is_member = is_member
        self.on_refused = on_refused
        self.refused: Counter[str] = Counter()
        #: throwaway peer ids a dial-back check announced: refused like any non-member (the check
        #: only needs the Noise handshake), but logged at INFO and not counted as an intrusion
        self.dialback: set[bytes] = set()

    def check(self, peer: bytes, *, direction: str, remote: str) -> str | None:
        """None if `peer` may stay connected, else the reason (after one log line)."""
        if peer in self.dialback:
            logger.info("dial-back check arrived peer=%s remote=%s; closing it after Noise", ID(peer), remote,
                        extra={"event": "dialback_arrived"})
            return "dialback"
        try:
            ok = self.is_member(peer)
        except Exception:  # a broken predicate must fail closed, not kill the listener
            logger.exception("membership check failed for peer=%s; refusing", ID(peer))
            ok = False
        if ok:
            return None
        reason = "not_member"
        self.refused[reason] += 1
        logger.warning("refused connection peer=%s direction=%s remote=%s reason=%s", ID(peer), direction,
                       remote, reason, extra={"event": "connection_refused", "peer": str(ID(peer)), "reason": reason})
        if self.on_refused is not None:
            self.on_refused(reason, peer)
        return reason


def _remote_text(conn: IRawConnection) -> str:
    try:
        addr = conn.get_remote_address()
    except Exception:
        return "?"
    return f"{addr[0]}:{addr[1]}" if addr else "?"


class _GatedNoise(NoiseTransport):
    """Noise, plus the membership check the moment the remote peer id is authenticated."""

    def __init__(self, *args: object, gate: MemberGate | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._gate = gate

    async def _admit(self, conn: IRawConnection, secure: ISecureConn, direction: str) -> ISecureConn:
        if self._gate is None:
            return secure
        peer = secure.get_remote_peer()
        reason = self._gate.check(peer.to_bytes(), direction=direction, remote=_remote_text(conn))
        if reason is None:
            return secure
        try:
            await secure.close()
        except Exception:  # already gone is fine: we are refusing it anyway
            logger.debug("closing a refused connection failed", exc_info=True)
        raise HandshakeFailure(f"peer {peer} refused: {reason}")

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._admit(conn, await super().secure_inbound(conn), "inbound")

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._admit(conn, await super().secure_outbound(conn, peer_id), "outbound")


class P2PHost:
    """What a KNEXA daemon needs from libp2p, and nothing it should not touch."""

    def __init__(self, host: IHost, identity: Identity, pubsub: Pubsub | None,
                 gate: MemberGate | None = None, *, relay: MemberRelay | None = None,
                 relay_client: RelayClient | None = None, kinds: ConnectionKinds | None = None,
                 dcutr: Any = None) -> None:
        self._host = host
        self.identity = identity
        self._pubsub = pubsub
        self.gate = gate
        #: the circuit relay v2 hop service this host offers (the CPM), if any
        self.relay = relay
        #: reservations and relayed dials (nodes), if enabled
        self.relay_client = relay_client
        self.kinds = kinds or ConnectionKinds()
        #: py-libp2p's DCUtR service (hole punching), if enabled
        self.dcutr = dcutr
        #: seconds a relayed dial waits for DCUtR to punch a direct connection beside it
        self.hole_punch_wait_s = 6.0
        #: "public", "private" (a dial-back from a fresh connection failed) or "unknown"
        self.reachability = "unknown"
        #: members' signed records we learned: peer -> (seq, circuit addresses)
        self._records: dict[bytes, tuple[int, tuple[str, ...]]] = {}
        self._private: dict[bytes, bool] = {}  # its record lists circuit addresses only

    def offered_protocols(self) -> dict[str, list[str]]:
        """What this host offers at the security and muxer negotiation steps, in order."""
        upgrader = self._host.get_network().upgrader  # type: ignore[attr-defined]
        return {"security": [str(p) for p in upgrader.security_multistream.transports],
                "muxer": [str(p) for p in upgrader.muxer_multistream.transports]}

    async def enforce_membership(self) -> list[bytes]:
        """Close connections to peers the gate no longer admits (after a roster reload)."""
        if self.gate is None:
            return []
        dropped = []
        for peer in self._host.get_connected_peers():
            if self.gate.check(peer.to_bytes(), direction="existing", remote="-") is not None:
                await self._host.get_network().close_peer(peer)
                dropped.append(peer.to_bytes())
        return dropped

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_bytes

    def addrs(self) -> list[str]:
        """Full listen multiaddrs including `/p2p/<peer-id>`."""
        pid = self._host.get_id().to_string()
        out = []
        for a in self._host.get_addrs():
            s = str(a)
            out.append(s if "/p2p/" in s else f"{s}/p2p/{pid}")
        return out

    async def connect(self, maddr: str, *, timeout: float = 10.0) -> bytes:
        """Dial a full multiaddr; returns the authenticated peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:  # multiaddr raises a zoo of types for bad text
            raise DialError(f"invalid multiaddr {maddr!r}: {exc}") from exc
        self._forget_failures(info.peer_id)
        with trio.move_on_after(timeout) as scope:
            try:
                await self._host.connect(info)
            except (BaseLibp2pError, OSError) as exc:
                raise DialError(f"cannot reach {maddr}: {type(exc).__name__}: {exc}") from exc
        if scope.cancelled_caught:
            raise DialError(f"cannot reach {maddr}: timed out after {timeout:.0f}s")
        return info.peer_id.to_bytes()

    async def dial_peer(self, peer: bytes, *, timeout: float = 10.0, relay: bool = True) -> bool:
        """Connect to `peer` at the addresses the peerstore holds (e.g. from its signed record):
        its direct addresses first, then through the relays its `/p2p-circuit` addresses name.

        Also used for connection reversal: a node behind a NAT cannot be dialled, but it can dial
        its partner, whose streams then ride that connection. False if nothing worked in time.
        `relay=False`: direct addresses only.
        """
        if self.is_connected(peer):
            return True
        direct, circuits = self.known_addrs(peer)
        relayed = False
        with trio.move_on_after(timeout):
            if direct:
                self._forget_failures(ID(peer))
                try:
                    await self._host.get_network().dial_peer(ID(peer))
                    return True
                except (BaseLibp2pError, OSError) as exc:
                    logger.info("dial peer=%s failed: %s", ID(peer), type(exc).__name__)
            if self.relay_client is not None and relay:
                for addr in circuits:
                    if await self.dial_relayed(peer, addr):
                        relayed = True
                        break
        if relayed:
            await self.punch(peer)
        return self.is_connected(peer)

    async def dial_relayed(self, peer: bytes, circuit: str, *, timeout: float = 15.0) -> bool:
        """Connect to `peer` through the relay that `circuit` (`.../p2p/<relay>/p2p-circuit`) names."""
        if self.relay_client is None:
            return False
        head = circuit.split("/p2p-circuit")[0]
        try:
            relay = await self.connect(head, timeout=timeout)
            await self.relay_client.dial(relay, peer, timeout=timeout)
        except (DialError, RelayError, BaseLibp2pError, OSError, trio.TooSlowError) as exc:
            logger.info("relayed dial peer=%s via=%s failed: %s: %s", ID(peer), head, type(exc).__name__, exc)
            return False
        logger.info("relayed connection peer=%s via=%s", str(ID(peer))[-8:], head.rsplit("/", 1)[-1][-8:],
                    extra={"event": "relayed_connection"})
        return True

    async def punch(self, peer: bytes) -> bool:
        """Try DCUtR on our relayed connection to `peer` for up to `hole_punch_wait_s`, so that the
        caller's next stream rides a direct connection (a stream opened on the relayed connection
        stays there; new streams prefer a direct one once it exists). True if one exists now."""
        if self.dcutr is None:
            return False
        t0 = trio.current_time()
        punched = False
        try:
            with trio.move_on_after(self.hole_punch_wait_s):
                punched = bool(await self.dcutr.initiate_hole_punch(ID(peer)))
        except (BaseLibp2pError, OSError) as exc:
            logger.info("hole punch peer=%s failed: %s", ID(peer), exc)
        finally:  # also when the caller's deadline cut it short
            logger.info("hole punch peer=%s direct=%s seconds=%.2f", str(ID(peer))[-8:], punched,
                        trio.current_time() - t0, extra={"event": "hole_punch", "direct": punched})
        return punched

    def known_addrs(self, peer: bytes) -> tuple[list[str], list[str]]:
        """(direct, circuit) addresses the peerstore holds for `peer`."""
        try:
            addrs = [str(a) for a in self._host.get_peerstore().addrs(ID(peer))]
        except Exception:  # PeerStoreError: nothing known
            addrs = []
        seq, circuits = self._records.get(peer, (0, ()))
        if seq and circuits and self._private.get(peer):
            # its record lists circuits only: it is behind a NAT, and whatever libp2p's own
            # record says (its LAN addresses) cannot be dialled; DCUtR finds the direct path
            return [], list(circuits)
        return [a for a in addrs if not is_circuit(a)], list(circuits)

    def stream_kind(self, stream: FramedStream) -> str:
        """"direct", "relayed" or "hole_punched": the connection `stream` rides on."""
        return connection_kind(self._host, self.kinds, stream.raw)

    def connection_kinds(self) -> dict[str, Any]:
        """Open connections by kind now, and connections opened by kind since start."""
        now: Counter[str] = Counter()
        for conns in self._host.get_network().get_connections_map().values():
            for conn in conns:
                now[self.kinds.kind_of(conn)] += 1
        return {"open": {k: now.get(k, 0) for k in ("direct", "relayed", "hole_punched")},
                "opened": {k: self.kinds.opened.get(k, 0) for k in ("direct", "relayed", "hole_punched")}}

    def observed_ip(self, stream: FramedStream) -> str | None:
        """The remote IP address of the TCP connection under `stream` (what a NAT shows us)."""
        try:
            addr = stream.raw.get_remote_address()
        except Exception:
            return None
        return addr[0] if addr else None

    def _forget_failures(self, peer: ID) -> None:
        """Drop py-libp2p's 60 s negative dial cache for `peer`: our callers run their own
        backoff, and a restarted CPM or peer must be reachable on the next try, not a minute
        later (seen in tests/faults: nodes cut off for ~60 s after a CPM restart)."""
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer)

    def signed_record(self) -> bytes:
        """Our libp2p signed peer record (listen addresses, timestamp seq) as envelope bytes.

        A wildcard listen address (0.0.0.0, the `init` default) is expanded to this machine's
        interface addresses: a record saying 0.0.0.0 would make every peer dial itself.
        """
        circuits = [multiaddr.Multiaddr(a) for a in self.relay_client.circuit_addrs()] if self.relay_client else []
        addrs: list[multiaddr.Multiaddr] = []
        if not (circuits and self.reachability == "private"):
            # a private node's own addresses are unreachable for others (and reveal its LAN):
            # it is reached through its relays only, and DCUtR learns its NAT's address itself
            for a in self._host.get_addrs():
                bare = multiaddr.Multiaddr(str(a).split("/p2p/")[0])
                wildcard = str(bare).startswith(("/ip4/0.0.0.0/", "/ip6/::/"))
                addrs.extend(expand_wildcard_address(bare) if wildcard else [bare])
        addrs.extend(circuits)
        record = PeerRecord(self._host.get_id(), addrs)
        return seal_record(record, self._host.get_private_key()).marshal_envelope()

    def learn_record(self, envelope: bytes) -> bool:
        """Learn a member's addresses from its signed peer record (checked: the signer is the peer
        it names). The newest seq wins and replaces that peer's old addresses, so a member that
        moved is dialled at its new address. False if it was not newer or did not verify.

        Kept apart from libp2p's own certified-address book on purpose: py-libp2p 0.8.1 attaches
        each host's own libp2p record to pubsub RPCs and *drops the whole RPC* when that record's
        seq is lower than the one in the peerstore (measured: directives and grafts lost once our
        later-sealed records sat there), and its record lists listen addresses, never circuits.
        Direct addresses go into the peerstore for the swarm's dialler; circuit addresses stay
        here for `dial_relayed`.
        """
        try:
            env, record = consume_envelope(envelope, PeerRecord().domain())
            if ID.from_pubkey(env.public_key) != record.peer_id:
                return False
        except Exception:  # protobuf/key/signature errors: not a record
            return False
        peer = record.peer_id
        old = self._records.get(peer.to_bytes())
        if old is not None and old[0] >= record.seq:
            return False
        addrs = [str(a) for a in record.addrs]
        self._records[peer.to_bytes()] = (int(record.seq), tuple(a for a in addrs if is_circuit(a)))
        self._private[peer.to_bytes()] = all(is_circuit(a) for a in addrs)
        store = self._host.get_peerstore()
        store.clear_addrs(peer)
        store.add_addrs(peer, [multiaddr.Multiaddr(a) for a in addrs if not is_circuit(a)], 0)
        return True

    def is_connected(self, peer: bytes) -> bool:
        return bool(self._host.get_network().get_connections(ID(peer)))

    def connected_peers(self) -> list[bytes]:
        return [p.to_bytes() for p in self._host.get_connected_peers()]

    def set_handler(self, protocol: str, handler: Callable[[FramedStream], Awaitable[None]]) -> None:
        """Serve `protocol`; the handler gets a framed stream and must not raise.

        A handler that raises anyway costs only that stream: we log and reset it.
        """

        async def _handle(stream: INetStream) -> None:
            framed = FramedStream(stream)
            try:
                await handler(framed)
            except (StreamBroken, BaseLibp2pError) as exc:
                logger.info("stream %s from %s ended: %s", protocol, ID(framed.remote_peer), exc)
                await framed.reset()
            except Exception:
                logger.exception("handler for %s failed", protocol)
                await framed.reset()
            else:
                await framed.close()

        self._host.set_stream_handler(TProtocol(protocol), _handle)

    async def open_stream(self, peer: bytes, protocol: str, *, timeout: float = 10.0) -> FramedStream:
        self._forget_failures(ID(peer))
        with trio.move_on_after(timeout):
            try:
                stream = await self._host.new_stream(ID(peer), [TProtocol(protocol)])
            except (BaseLibp2pError, OSError) as exc:
                raise StreamBroken(f"cannot open {protocol} to {ID(peer)}: {exc}") from exc
            return FramedStream(stream)
        raise StreamBroken(f"cannot open {protocol} to {ID(peer)}: timed out")

    async def subscribe(self, topic: str) -> ISubscriptionAPI:
        if self._pubsub is None:
            raise RuntimeError("pubsub disabled on this host")
        return await self._pubsub.subscribe(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        if self._pubsub is None:
            raise RuntimeError("pubsub disabled on this host")
        await self._pubsub.publish(topic, data)

    def set_topic_validator(self, topic: str, valid: Callable[[bytes, bytes], bool]) -> None:
        """Only messages for which `valid(origin_peer, data)` is True are delivered or relayed.

        py-libp2p runs it on every received and every own message before marking it seen, so a
        message that fails is neither handed to subscribers nor forwarded to mesh peers.
        A validator that raises counts as a rejection.
        """
        if self._pubsub is None:
            raise RuntimeError("pubsub disabled on this host")

        def _validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            try:
                return bool(valid(bytes(msg.from_id), bytes(msg.data)))
            except Exception:
                logger.exception("topic validator for %s failed; rejecting", topic)
                return False

        self._pubsub.set_topic_validator(topic, _validator, False)

    def topic_peers(self, topic: str) -> int:
        if self._pubsub is None:
            return 0
        return len(self._pubsub.peer_topics.get(topic, ()))


@asynccontextmanager
async def open_host(
    identity: Identity,
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    gossip: GossipSettings | None = None,
    gate: MemberGate | None = None,
    relay: RelayPolicy | None = None,
    relay_members: Callable[[bytes], bool] | None = None,
    relay_client: bool = False,
    hole_punch: bool = False,
) -> AsyncIterator[P2PHost]:
    """Run a libp2p host until the context exits, then close it (shielded) so no task leaks.

    With a `gate`, only peers it admits keep a connection (checked after the Noise handshake).
    `relay`: offer circuit relay v2 with these limits (the CPM) to peers `relay_members` admits
    (default: the gate's predicate; checked again on every hop stream).
    `relay_client`: accept relayed connections, hold reservations, dial through relays (nodes).
    `hole_punch`: run DCUtR, which upgrades relayed connections to direct ones where NATs allow.
    """
    try:
        listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:
        raise DialError(f"invalid listen multiaddr {list(listen)}: {exc}") from exc
    noise = _GatedNoise(identity.key_pair, noise_privkey=create_x25519_key_pair().private_key, gate=gate)
    host = new_host(
        key_pair=identity.key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen_addrs,
        # one connection per peer (the default cost ~250 ms per connect); no auto-dial storm to
        # reach 50 connections: daemons dial exactly the peers they need (keep_connected). A
        # relay client needs two: the relayed one and the direct one DCUtR punches beside it.
        connection_config=ConnectionConfig(max_connections_per_peer=2 if relay_client else 1, min_connections=0,
                                           low_watermark=0),
    )
    kinds = ConnectionKinds()
    host.get_network().register_notifee(kinds)
    services: list[Any] = []
    member_relay = None
    if relay is not None:
        if relay_members is None:
            relay_members = gate.is_member if gate is not None else (lambda _peer: True)
        member_relay = MemberRelay(host, relay, relay_members)
        services.append(member_relay)
    client = RelayClient(host) if relay_client else None
    if client is not None:
        services.append(client)
    dcutr = None
    if hole_punch:
        dcutr = DialerDCUtR(host)
        services.append(dcutr)
    pubsub: Pubsub | None = None
    gossipsub: GossipSub | None = None
    if gossip is not None:
        gossipsub = GossipSub(
            protocols=GOSSIPSUB_PROTOCOLS,
            degree=gossip.degree,
            degree_low=gossip.degree_low,
            degree_high=gossip.degree_high,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=gossip.heartbeat_interval,
            adaptive_gossip_enabled=False,
        )
        pubsub = Pubsub(host, gossipsub, strict_signing=True)

    def wrap(ps: Pubsub | None) -> P2PHost:
        return P2PHost(host, identity, ps, gate, relay=member_relay, relay_client=client, kinds=kinds, dcutr=dcutr)

    try:
        async with host.run(listen_addrs=listen_addrs), contextlib.AsyncExitStack() as stack:
            for service in services:
                await stack.enter_async_context(background_trio_service(service))
            if pubsub is None or gossipsub is None:
                yield wrap(None)
            else:
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    try:
                        yield wrap(pubsub)
                    finally:
                        seen = getattr(pubsub, "seen_messages", None)
                        stop = getattr(seen, "stop", None)
                        if callable(stop):
                            stop()
    finally:
        with trio.move_on_after(3) as scope:
            scope.shield = True
            try:
                await host.close()
            except Exception:  # closing a half-dead host must not mask the real error
                logger.debug("host close failed", exc_info=True)

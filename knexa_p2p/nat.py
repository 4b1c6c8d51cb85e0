"""NAT traversal for KNEXA hosts: a members-only circuit relay, dial-back reachability, hole
punching, and which kind of connection (direct, relayed, hole-punched) carries a stream.

- `MemberRelay`: py-libp2p's circuit relay v2 hop service (`/libp2p/circuit/relay/0.2.0/hop`)
  with KNEXA's limits (`RelayPolicy`), a membership check on every hop stream (the second lock
  after the connection gate) and counters: reservations, circuits, refusals, bytes relayed. The
  relay forwards the bytes of a Noise session between the two members: it sees ciphertext only.
- `RelayClient`: the node's side. It answers the relay's stop streams (inbound relayed
  connections, upgraded through the same gated Noise as any other connection), holds
  reservations, builds `/p2p-circuit` addresses for the node's signed peer record, and dials a
  member through a relay (`dial`), which py-libp2p's swarm does not do by itself (it drops
  `/p2p-circuit` addresses).
- Dial-back (`DIALBACK_PROTOCOL`): a node asks the CPM whether it is publicly reachable. The CPM
  tells it which throwaway peer id it will dial from, then opens a *fresh* TCP connection from
  a fresh socket to the address it observed (the requester's IP, never an address the requester
  chose: no one can aim the CPM at a third party) and runs the Noise handshake to the node's
  peer id. Reachable means that handshake completed. py-libp2p 0.8.1's AutoNAT cannot be used:
  its dial-back reused the requester's existing connection and answered "reachable" for a closed
  port. The node's gate refuses the throwaway id right after Noise, as it refuses every
  non-member, so the check never gets a stream.
- `ConnectionKinds`: a swarm notifee that labels connections. A direct connection that appears
  while the same peer is connected through a relay is a hole-punched one (DCUtR upgrades a
  relayed connection; py-libp2p's swarm then prefers the direct connection for new streams).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.security_multistream import SecurityMultistream

__all__ = [
    "DIALBACK_PROTOCOL", "HOP_PROTOCOL", "STOP_PROTOCOL", "ConnectionKinds", "DialerDCUtR", "MemberRelay", "RelayClient",
    "RelayPolicy", "circuit_addr", "connection_kind", "dial_back", "is_circuit",
]

logger = logging.getLogger(__name__)
HOP_PROTOCOL = str(HOP_PROTOCOL_ID)
STOP_PROTOCOL = str(STOP_PROTOCOL_ID)
DIALBACK_PROTOCOL = "/knexa/dialback/1.0.0"
KINDS = ("direct", "relayed", "hole_punched")


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """What a KNEXA relay grants each member (py-libp2p's defaults are 1 h and 1 GiB per circuit,
    4 reservations in all). A knowledge package is a few hundred KiB to a few MiB; a circuit
    lives until DCUtR replaces it or the round ends, and a fresh one is opened next round."""

    reservation_ttl_s: int = 900
    circuit_duration_s: int = 600
    circuit_bytes: int = 64 << 20
    max_reservations: int = 512
    max_circuits_per_peer: int = 8

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_duration_s, data=self.circuit_bytes,
                           max_circuit_conns=self.max_circuits_per_peer, max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl_s)


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def circuit_addr(relay_addr: str, relay: bytes) -> str:
    """`<relay's address>/p2p/<relay>/p2p-circuit`: how a node behind a relay is reached."""
    bare = relay_addr.split("/p2p/")[0]
    return f"{bare}/p2p/{ID(relay)}/p2p-circuit"


def _relay_of(addr: str) -> tuple[str, bytes] | None:
    """(relay's dialable address with /p2p/<relay>, relay peer id) of a circuit address."""
    head = addr.split("/p2p-circuit")[0]
    _, sep, pid = head.rpartition("/p2p/")
    if not sep:
        return None
    try:
        return head, ID.from_base58(pid).to_bytes()
    except Exception:  # base58/multihash errors: not an address we can use
        return None


def _raw_is_relayed(conn: Any) -> bool:
    """Walk SwarmConn -> muxed conn -> secured conn -> raw conn looking for a relayed leg."""
    seen = 0
    node = conn
    while node is not None and seen < 6:
        seen += 1
        try:
            ctype = node.get_connection_type() if hasattr(node, "get_connection_type") else None
        except Exception:
            ctype = None
        if ctype == ConnectionType.RELAYED:
            return True
        try:
            addrs = node.get_transport_addresses() if hasattr(node, "get_transport_addresses") else []
        except Exception:
            addrs = []
        if any(is_circuit(str(a)) for a in addrs or ()):
            return True
        node = (getattr(node, "muxed_conn", None) or getattr(node, "secured_conn", None)
                or getattr(node, "conn", None) or getattr(node, "_wrapped", None) or getattr(node, "stream", None))
        if isinstance(node, TrioTCPStream):
            return False
    return False


class ConnectionKinds(INotifee):
    """Counts connections by kind as they open; `kind_of` answers for a live connection."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self._punched: set[int] = set()  # id(muxed_conn) of hole-punched connections

    def kind_of(self, conn: INetConn) -> str:
        if _raw_is_relayed(conn):
            return "relayed"
        return "hole_punched" if id(getattr(conn, "muxed_conn", conn)) in self._punched else "direct"

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        others = [c for c in network.get_connections(peer) if c is not conn]
        if _raw_is_relayed(conn):
            kind = "relayed"
        elif any(_raw_is_relayed(c) for c in others):
            kind = "hole_punched"
            self._punched.add(id(conn.muxed_conn))
        else:
            kind = "direct"
        self.opened[kind] += 1
        logger.info("connection opened peer=%s kind=%s", str(peer)[-8:], kind,
                    extra={"event": "connection_opened", "kind": kind})

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._punched.discard(id(conn.muxed_conn))

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


def connection_kind(host: IHost, kinds: ConnectionKinds, stream: INetStream) -> str:
    """The kind of the connection `stream` rides on."""
    muxed = stream.muxed_conn
    for conn in host.get_network().get_connections(muxed.peer_id):
        if conn.muxed_conn is muxed:
            return kinds.kind_of(conn)
    return "relayed" if _raw_is_relayed(muxed) else "direct"


class _CountingWriter:
    """A stream proxy that adds every written byte to `relay.bytes_relayed`."""

    def __init__(self, stream: INetStream, relay: MemberRelay) -> None:
        self._stream = stream
        self._relay = relay

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        self._relay.bytes_relayed += len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _PerPeerCircuits(dict):
    """py-libp2p 0.8.1 files each circuit under its two peers' ids (`_active_relays[peer]`, the
    last circuit wins) and, when a circuit ends, closes whatever is filed under those ids then: with
    two circuits to one member (or from one), the end of the first closed the second. The table
    still serves the library's shutdown clean-up, but its per-peer look-up finds nothing:
    `MemberRelay._relay_data` closes each circuit's own streams."""

    def __contains__(self, key: object) -> bool:
        return False


class MemberRelay(CircuitV2Protocol):
    """Circuit relay v2 hop service for members only, with counters."""

    def __init__(self, host: IHost, policy: RelayPolicy, is_member: Callable[[bytes], bool]) -> None:
        super().__init__(host, limits=policy.limits(), allow_hop=True)
        self._active_relays = _PerPeerCircuits()
        self.policy = policy
        self.is_member = is_member
        self.bytes_relayed = 0
        self.counts: Counter[str] = Counter()
        self._circuits: Counter[bytes] = Counter()  # member -> circuits to it, open or being opened

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        """One request per hop stream (RESERVE or CONNECT), as go and rust relays do.

        Replaces py-libp2p's handler, which loops for more requests on the same stream and logs
        an ERROR when the client closes it after its reservation (every renewal), and which feeds
        the client's libp2p peer record into the relay's certified-address book."""
        peer = stream.muxed_conn.peer_id
        try:
            member = bool(self.is_member(peer.to_bytes()))
        except Exception:  # a broken predicate fails closed
            member = False
        if not member or _is_relayed_stream(stream):
            # the connection gate stops non-members first; this is the second lock. Spec: no
            # reservations or circuits over an already relayed connection either.
            reason = "not_member" if not member else "relayed_connection"
            self.counts[f"refused_{reason}"] += 1
            logger.warning("relay refused peer=%s reason=%s", peer, reason,
                           extra={"event": "relay_refused", "reason": reason})
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return
        try:
            with trio.fail_after(self.read_timeout):
                msg = await read_delimited_msg(stream, HopMessage)
        except Exception as exc:  # timeout, reset, garbage: nothing to answer
            logger.info("relay hop stream from %s ended without a request: %s", str(peer)[-8:], type(exc).__name__)
            await stream.reset()
            return
        if msg.type == HopMessage.RESERVE:
            await self._handle_reserve(stream, msg)
            await self._close_stream(stream)
        elif msg.type == HopMessage.CONNECT:
            await self._handle_connect(stream, msg)
        else:
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE)

    async def _refuse(self, stream: INetStream, code: StatusCode) -> None:
        """Answer with `code` and close (a reset right after the write raced the status: the
        client saw StreamReset instead of the refusal)."""
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
        except Exception:  # the peer may be gone already
            logger.debug("relay refusal not delivered", exc_info=True)
        await self._close_stream(stream)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        self.counts["reservations"] += 1
        logger.info("relay reservation peer=%s ttl=%ds", str(stream.muxed_conn.peer_id)[-8:],
                    self.policy.reservation_ttl_s, extra={"event": "relay_reservation"})
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        self.counts["circuits"] += 1
        dst = bytes(msg.peer.id)
        logger.info("relay circuit src=%s dst=%s", str(stream.muxed_conn.peer_id)[-8:],
                    str(ID(dst))[-8:], extra={"event": "relay_circuit"})
        try:
            # py-libp2p checks the member's circuit count before it dials the member and counts
            # the circuit only after the stop handshake: concurrent requests all passed the check
            # (5 of 5 got through a limit of 2). Count each circuit from its request on.
            if self._circuits[dst] >= self.policy.max_circuits_per_peer:
                self.counts["refused_circuit_limit"] += 1
                logger.warning("relay refused circuit dst=%s reason=circuit_limit", str(ID(dst))[-8:],
                               extra={"event": "relay_refused", "reason": "circuit_limit"})
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
                return
            self._circuits[dst] += 1
            try:
                await super()._handle_connect(stream, msg)
            finally:
                self._circuits[dst] -= 1
                if self._circuits[dst] <= 0:
                    del self._circuits[dst]
        finally:
            self.counts["circuits_closed"] += 1

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          deadline: float | None = None, circuit_data_limit: list[int] | None = None) -> None:
        # count what is forwarded (written on), not what is read: the chunk that crosses the
        # byte limit is read and then dropped
        try:
            await super()._relay_data(src_stream, _CountingWriter(dst_stream, self), peer_id, deadline,
                                      circuit_data_limit)
        finally:  # this circuit's streams, not the ones filed under the peer (`_PerPeerCircuits`)
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)

    def summary(self) -> dict[str, Any]:
        return {"bytes_relayed": self.bytes_relayed, "active_reservations": len(self.resource_manager._reservations),
                **dict(self.counts), "limits": {
                    "reservation_ttl_s": self.policy.reservation_ttl_s,
                    "circuit_duration_s": self.policy.circuit_duration_s,
                    "circuit_bytes": self.policy.circuit_bytes,
                    "max_reservations": self.policy.max_reservations,
                    "max_circuits_per_peer": self.policy.max_circuits_per_peer}}


class DialerDCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR without its auto-drive loop: only the side that dialled through the relay
    starts a hole punch (`P2PHost.punch`, right after the relayed dial). With the loop on, the
    other side started its own session within its 2 s poll; the two sessions dialled the same
    address pair from the same listen ports, and one of six netns runs (endpoint-independent
    NATs) failed every dial with EADDRNOTAVAIL and stayed on the relay."""

    async def _auto_drive_loop(self) -> None:
        return


class RelayError(Exception):
    """A relay refused or failed a reservation or a circuit."""


class RelayClient(CircuitV2Protocol):
    """The node's side of circuit relay v2: stop streams, reservations, dialling through a relay."""

    def __init__(self, host: IHost) -> None:
        super().__init__(host, allow_hop=False)
        #: relay peer id -> (relay's address with /p2p/, reservation expiry, unix seconds)
        self.reservations: dict[bytes, tuple[str, int]] = {}

    async def reserve(self, relay_addr: str, relay: bytes, *, timeout: float = 10.0) -> int:
        """Reserve a slot at `relay` (already connected); returns the expiry (unix seconds)."""
        with trio.fail_after(timeout):
            stream = await self.host.new_stream(ID(relay), [HOP_PROTOCOL_ID])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                             peer=CircuitPeerId(id=self.host.get_id().to_bytes())))
                resp = await read_delimited_msg(stream, HopMessage)
            except BaseLibp2pError as exc:
                raise RelayError(f"relay {ID(relay)} dropped the reservation: {type(exc).__name__}") from exc
            finally:
                await stream.close()
        status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
        if status != StatusCode.OK or not resp.HasField("reservation"):
            raise RelayError(f"relay {ID(relay)} refused the reservation: {status.name}")
        expire = int(resp.reservation.expire)
        self.reservations[relay] = (relay_addr, expire)
        return expire

    def circuit_addrs(self) -> list[str]:
        now = time.time()
        return [circuit_addr(addr, relay) for relay, (addr, exp) in self.reservations.items() if exp > now]

    async def dial(self, relay: bytes, dest: bytes, *, timeout: float = 15.0) -> INetConn:
        """Open a relayed connection to `dest` through `relay` (to which we are connected or
        which the peerstore can reach); the Noise handshake runs end to end over the circuit."""
        with trio.fail_after(timeout):
            stream = await self.host.new_stream(ID(relay), [HOP_PROTOCOL_ID])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT,
                                                             peer=CircuitPeerId(id=dest)))
                resp = await read_delimited_msg(stream, HopMessage)
                status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
                if status != StatusCode.OK:
                    raise RelayError(f"relay {ID(relay)} refused a circuit to {ID(dest)}: {status.name}")
                ma = multiaddr.Multiaddr(f"/p2p/{ID(relay)}/p2p-circuit/p2p/{ID(dest)}")
                raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                    addresses=[ma])
                conn = await self.host.upgrade_outbound_connection(raw, ID(dest))
            except BaseException:
                await stream.reset()
                raise
        if hasattr(conn, "set_transport_info"):
            conn.set_transport_info([ma], ConnectionType.RELAYED)
        return conn


# ---- dial-back reachability --------------------------------------------------------------------
async def dial_back(ip: str, port: int, peer: bytes, dialer_key: Any, *, timeout: float = 5.0) -> bool:
    """True if a fresh TCP connection to ip:port completes a Noise handshake with `peer`.

    Runs multistream-select and Noise as the throwaway identity `dialer_key` (a libp2p key pair),
    then closes: no muxer, no stream. The remote end refuses the throwaway id right after Noise,
    which is fine: by then its identity has been proven to us.
    """
    noise = NoiseTransport(dialer_key, noise_privkey=create_x25519_key_pair().private_key)
    security = SecurityMultistream({TProtocol(NOISE_PROTOCOL_ID): noise})
    with trio.move_on_after(timeout):
        try:
            sock = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        raw = RawConnection(TrioTCPStream(sock), initiator=True)
        try:
            secure = await security.secure_outbound(raw, ID(peer))
            await secure.close()
            return True
        except Exception as exc:  # refused, reset, wrong peer: not reachable as `peer`
            logger.debug("dial-back %s:%d failed: %s", ip, port, exc)
            return False
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await raw.close()
                except Exception:
                    logger.debug("closing a dial-back connection failed", exc_info=True)
    return False


def new_dialer_key() -> Any:
    """A throwaway libp2p key pair for one dial-back."""
    return create_new_key_pair()


def pack(obj: object) -> bytes:
    return msgpack.packb(obj)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)

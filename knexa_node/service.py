"""`knexa-node start`: the trio/libp2p shell that runs KNEXA-FL rounds around a ModelBackend.

Each round (SPEC "One round t"): local epoch -> evaluate -> sanitized profile to the CPM ->
wait for the signed directive (GossipSub, with a poll fallback) -> as teacher, generate, filter,
seal and send the package on a direct stream; as student, receive, verify, decrypt, distil (Eq. 2),
compute the reward (Eq. 3) and report it. Blocking ML runs in worker threads behind one limiter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import trio

from knexa_p2p.directory import DirectoryError, exchange_records
from knexa_p2p.host import DialError, GossipSettings, MemberGate, P2PHost, open_host
from knexa_p2p.identity import Identity
from knexa_p2p.nat import RelayPolicy, is_circuit
from knexa_p2p.reach import ReachabilityError, check_reachability, keep_reservation
from knexa_p2p.streams import FramedStream, StreamBroken
from knexa_runtime.atomic import atomic_write_json
from knexa_runtime.control import CONTROL_SOCKET, serve_control
from knexa_runtime.daemon import diff_settings, merged_roster, parse_hostport
from knexa_runtime.logs import set_level
from knexa_runtime.metrics import DaemonMetrics
from knexa_runtime.systemd import Notifier
from protocol import (
    CPM_PROTOCOL,
    FRAME_CAPS,
    KD_PROTOCOL,
    DirectiveBook,
    DirectiveRequest,
    Hello,
    MatchDirective,
    PackageBody,
    PackageItem,
    Profile,
    PublicSetAnnounce,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    RewardReport,
    SealedPackage,
    Signed,
    UnauthorizedError,
    decode,
    directive_topic,
    encode,
    open_package,
    open_signed,
    peer_id_str,
    seal_package,
    sign,
)

from . import public_set as public_set_mod
from .backend import Answer, ModelBackend
from .config import NodeSection
from .errors import UnreachableError
from .profile import PerfPoint, PrivacyAccountant, build_profile, skills_vector
from .public_set import PublicSetMismatch
from .public_set import label as public_set_label
from .reward import compute_reward

__all__ = ["RELOADABLE", "NodeService"]

#: seconds between dial-back checks after the first (node behind a NAT, docs/operations.md)
REACHABILITY_RECHECK_S = 600.0

logger = logging.getLogger("knexa_node")
STATE_FILE = "node-state.json"
ROUNDS_FILE = "rounds.jsonl"
#: how often a node republishes its signed peer record to the CPM and fetches the other members'
#: (a teacher also refreshes right before sending to a student it cannot reach)
DISCOVERY_INTERVAL_S = 10.0
#: discovered members a node keeps a connection to (beyond the CPM and its roster's addrs), so
#: the directive mesh has node-to-node links when nodes know only the CPM's address
DISCOVERED_DIAL_MAX = 8
#: settings SIGHUP applies to a running node; the rest (identity, model, data, listen, CPM)
#: define who and what the node is and need a restart
RELOADABLE = ("bootstrap", "roster", "roster_file", "directive_timeout_s", "directive_poll_s",
              "package_timeout_s", "stream_timeout_s", "reward_gamma", "reward_delta", "profile_decimals",
              "profile_epsilon", "profile_epsilon_budget", "share_skills", "log_level", "stop_grace_s",
              "cpm_connect_timeout_s")


def short(peer: bytes) -> str:
    return peer_id_str(peer)[-8:]


def _kem_public(identity_kem: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return identity_kem.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_peer(maddr: str) -> bytes:
    """The peer id at the end of a full multiaddr (`.../p2p/<id>`)."""
    import base58

    head, sep, pid = maddr.rpartition("/p2p/")
    if not sep or not head or not pid:
        raise ValueError(f"multiaddr {maddr!r} must end with /p2p/<peer-id>")
    try:
        raw = base58.b58decode(pid)
    except ValueError as exc:
        raise ValueError(f"multiaddr {maddr!r}: bad peer id") from exc
    if len(raw) != 38 or not raw.startswith(b"\x00\x24\x08\x01\x12\x20"):
        raise ValueError(f"multiaddr {maddr!r}: peer id is not an Ed25519 id")
    return raw


class NodeService:
    def __init__(self, cfg: NodeSection, backend: ModelBackend | None, identity: Identity, kem_key: Any, *,
                 make_backend: Callable[[Path | None], ModelBackend] | None = None) -> None:
        """`backend` None: build it with `make_backend(public_dir)` once the public set is known
        (fetched from the CPM if this node had none), before the first round."""
        import base58

        if backend is None and make_backend is None:
            raise ValueError("NodeService needs a backend or make_backend")
        self.cfg = cfg
        self.backend: ModelBackend = backend  # type: ignore[assignment]  # set in run() when None
        self._make_backend = make_backend
        #: the federation's public set this node verified (None: the CPM publishes none)
        self.public_set: PublicSetAnnounce | None = None
        self.identity = identity
        self.me = identity.peer_bytes
        self.kem_key = kem_key
        self.cpm_peer = parse_peer(cfg.cpm)
        ids, self.roster_addrs = merged_roster(cfg.roster, cfg.roster_file)
        self.roster = frozenset(base58.b58decode(p) for p in ids)
        self.metrics = DaemonMetrics("node")
        self.metrics_port: int | None = None
        self.phase = "starting"
        self.phase_since = time.time()
        #: seconds spent in each phase of the current round (status; the round log's phase_seconds)
        self.round_phases: dict[str, float] = {}
        self.started = time.time()
        self.notifier = Notifier()
        self.state_dir = cfg.state_dir
        self.book = DirectiveBook()
        self.directive_source: dict[int, str] = {}
        self._directives: dict[int, MatchDirective] = {}
        #: participants of directives the CPM signed: members the CPM admitted that our own
        #: roster file may not list yet (a member added at the CPM reaches us within a round)
        self._cpm_members: set[bytes] = set()
        #: members' current addresses from signed peer records the CPM served (peer -> addrs)
        self.discovered: dict[bytes, tuple[str, ...]] = {}
        self._directive_events: dict[int, trio.Event] = {}
        self._inbox: dict[bytes, tuple[PackageBody, int]] = {}
        #: the kind of connection (direct, relayed, hole_punched) each received package came over
        self._inbox_path: dict[bytes, str] = {}
        self._reserving = False  # relay reservations are being kept (find_reachability)
        self._inbox_events: dict[bytes, trio.Event] = {}
        self._inbox_round: dict[bytes, int] = {}
        self._waiting: set[bytes] = set()
        self._ml = trio.CapacityLimiter(1)
        state = self._load_state()
        self.round: int = state.get("round", 0)
        self.completed: int = state.get("completed", 0)
        self.history: list[PerfPoint] = [PerfPoint(**p) for p in state.get("history", [])]
        self.counters: dict[str, int] = state.get("counters", {})
        # profile noise is drawn from the OS CSPRNG; the spent epsilon survives restarts
        self.privacy = PrivacyAccountant(cfg.profile_epsilon, cfg.profile_epsilon_budget or math.inf,
                                         shares_skills=cfg.share_skills)
        self.privacy.load_state(state.get("privacy", {}))
        self.metrics.observe_privacy(self.privacy.summary())
        if "replay" in state:  # consumed directives stay consumed across restarts
            self.book = DirectiveBook.from_state(state["replay"])
        self.host: P2PHost | None = None
        self.last_rounds: deque[dict[str, Any]] = deque(self._tail_rounds(5), maxlen=5)
        self.metrics.round.set(self.round)

    # ---- state ------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        path = self.state_dir / STATE_FILE
        if path.exists():
            return json.loads(path.read_text())
        return {}

    def _save_state(self) -> None:
        # also saved mid-round (privacy budget, replay book): keep only completed rounds' points,
        # so a crash and re-run of this round does not record its evaluation twice
        atomic_write_json(self.state_dir / STATE_FILE, {
            "round": self.round, "completed": self.completed,
            "history": [asdict(p) for p in self.history[: self.completed]], "counters": self.counters,
            "privacy": self.privacy.to_state(), "replay": self.book.to_state(),
        })

    def _tail_rounds(self, n: int) -> list[dict[str, Any]]:
        path = self.state_dir / ROUNDS_FILE
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines()[-n:]:
            with contextlib.suppress(ValueError):
                out.append(self._round_summary(json.loads(line)))
        return out

    @staticmethod
    def _round_summary(entry: dict[str, Any]) -> dict[str, Any]:
        partner = entry.get("partner")
        return {"round": entry.get("round"), "role": entry.get("role"),
                "partner": partner[-8:] if isinstance(partner, str) else None,
                "reward": round(entry["reward"], 4) if isinstance(entry.get("reward"), float) else None,
                "pass_at_1": entry.get("pass_at_1"), "error": entry.get("error"), "path": entry.get("path"),
                "phase_seconds": entry.get("phase_seconds")}

    def _record(self, entry: dict[str, Any]) -> None:
        with open(self.state_dir / ROUNDS_FILE, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _reject(self, kind: str, reason: str) -> None:
        self._count(f"rejected_{kind}_{reason}")
        self.metrics.rejected.labels(kind, reason).inc()

    async def _ml_call(self, fn: Any, *args: Any) -> Any:
        """Run a blocking ML step in the worker thread. On shutdown, wait `stop_grace_s` for it,
        then abandon it: the node's state on disk is per round, so nothing half-done is kept."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._ml, abandon_on_cancel=True)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.stop_grace_s):
                await trio.to_thread.run_sync(self._ml_idle, limiter=self._ml)
            raise

    @staticmethod
    def _ml_idle() -> None:
        """Acquiring the ML limiter proves the abandoned step finished (used on shutdown)."""

    async def _save_checkpoint(self) -> None:
        """Never abandoned: a checkpoint is written whole (it is atomic on disk anyway)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.backend.save_checkpoint, self.state_dir / "checkpoint",
                                          limiter=self._ml)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        previous, self.phase, self.phase_since = self.phase, name, time.time()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.metrics.phase_seconds.labels(name).observe(dt)
            self.round_phases[name] = self.round_phases.get(name, 0.0) + dt
            self.phase, self.phase_since = previous, time.time()

    # ---- operations -------------------------------------------------------------------
    def reload(self, new: NodeSection) -> list[str]:
        """Apply the reloadable part of a re-read config (SIGHUP); returns what was ignored."""
        import base58

        applied, ignored = diff_settings(self.cfg, new, RELOADABLE)
        if ignored:
            logger.warning("reload: %s changed but need a restart; not applied", ", ".join(ignored))
        cfg = dataclasses.replace(self.cfg, **applied) if applied else self.cfg
        ids, addrs = merged_roster(cfg.roster, cfg.roster_file)
        self.cfg = cfg
        self.roster = frozenset(base58.b58decode(p) for p in ids)
        self.privacy.configure(cfg.profile_epsilon, cfg.profile_epsilon_budget or math.inf,
                               shares_skills=cfg.share_skills)
        self.roster_addrs = addrs
        set_level(cfg.log_level)
        logger.info("reload: applied %s; roster=%d dial=%d", sorted(applied) or "nothing new", len(self.roster),
                    len(self.dial_targets()))
        return ignored

    def dial_targets(self) -> list[str]:
        me = peer_id_str(self.me)
        # a few discovered members, the same ones on every pass: the closest ids by XOR distance.
        # Directly reachable ones only: members behind a NAT (circuit addresses only) are dialled
        # through a relay when a directive pairs us, not kept connected through it for the mesh
        direct = {p: [a for a in addrs if not is_circuit(a)] for p, addrs in self.discovered.items()}
        near = sorted((p for p in direct if direct[p]),
                      key=lambda p: int.from_bytes(p[-16:], "big") ^ int.from_bytes(self.me[-16:], "big"))
        found = [f"{direct[p][0]}/p2p/{peer_id_str(p)}" for p in near[:DISCOVERED_DIAL_MAX]]
        return list(dict.fromkeys(a for a in [self.cfg.cpm, *self.cfg.bootstrap, *self.roster_addrs, *found]
                                  if not a.endswith("/p2p/" + me)))

    # ---- discovery through the CPM -------------------------------------------------------
    async def refresh_directory(self, host: P2PHost) -> bool:
        """Publish our signed peer record to the CPM and learn the other members' (False on failure)."""
        try:
            records = await exchange_records(host, self.cpm_peer, timeout=self.cfg.stream_timeout_s)
        except (StreamBroken, DialError, DirectoryError) as exc:
            logger.info("peer directory exchange failed: %s", exc)
            return False
        fresh = {r.peer: r.addrs for r in records}
        for peer, addrs in fresh.items():
            if self.discovered.get(peer) != addrs:
                logger.info("discovered peer=%s addrs=%s", short(peer), ",".join(addrs),
                            extra={"event": "discovered", "peer": short(peer)})
        self.discovered = fresh
        return True

    async def discover_peers(self, host: P2PHost) -> None:
        """Keep our record at the CPM current and the other members' addresses fresh."""
        while True:
            await self.refresh_directory(host)
            await trio.sleep(DISCOVERY_INTERVAL_S)

    async def find_reachability(self, host: P2PHost, nursery: trio.Nursery) -> None:
        """Ask the CPM for a dial-back from a fresh connection. Unless that proves us public, hold
        a reservation at the CPM's relay (and at `relays`) and publish our circuit addresses.
        Re-checked every REACHABILITY_RECHECK_S (a port forward added later makes us public)."""
        await self._check_reachability(host)
        nursery.start_soon(self._recheck_reachability, host, nursery)
        if host.reachability == "public":
            return
        self._start_reservations(host, nursery)
        with trio.move_on_after(self.cfg.stream_timeout_s):  # the first round needs our circuit address
            while host.relay_client is not None and not host.relay_client.circuit_addrs():
                await trio.sleep(0.1)
        await self.refresh_directory(host)

    def _start_reservations(self, host: P2PHost, nursery: trio.Nursery) -> None:
        if self._reserving:
            return
        self._reserving = True
        for relay in dict.fromkeys((self.cfg.cpm, *self.cfg.relays)):
            nursery.start_soon(functools.partial(
                keep_reservation, host, relay,
                on_change=lambda: nursery.start_soon(self.refresh_directory, host)))

    async def _check_reachability(self, host: P2PHost) -> None:
        try:
            await check_reachability(host, self.cpm_peer, timeout=self.cfg.stream_timeout_s)
        except (ReachabilityError, StreamBroken, DialError) as exc:
            logger.warning("reachability unknown (dial-back failed: %s); holding a relay reservation", exc)

    async def _recheck_reachability(self, host: P2PHost, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(REACHABILITY_RECHECK_S)
            before = host.reachability
            await self._check_reachability(host)
            if host.reachability != "public":
                self._start_reservations(host, nursery)
            if host.reachability != before:
                await self.refresh_directory(host)  # our record's addresses follow

    def status(self) -> dict[str, Any]:
        host = self.host
        cpm_ok = bool(host and host.is_connected(self.cpm_peer))
        return {
            "daemon": "knexa-node", "peer": peer_id_str(self.me), "federation": self.cfg.federation,
            "model": self.backend.model_name if self.backend is not None else self.cfg.model,
            "public_set": public_set_label(self.public_set) if self.public_set else None,
            "round": self.round, "completed": self.completed,
            "phase": self.phase, "phase_for_s": round(time.time() - self.phase_since, 1),
            "health": "ok" if cpm_ok else ("starting" if host is None else "cpm unreachable"),
            "peers": sorted(peer_id_str(p)[-8:] for p in host.connected_peers()) if host else [],
            "roster": len(self.roster), "counters": dict(self.counters),
            "uptime_s": round(time.time() - self.started, 1), "metrics_port": self.metrics_port,
            "last_rounds": list(self.last_rounds), "privacy": self.privacy.summary(),
            "round_phase_seconds": {k: round(v, 1) for k, v in self.round_phases.items()},
            "reachability": host.reachability if host else "unknown",
            "relay_addrs": host.relay_client.circuit_addrs() if host and host.relay_client else [],
            "connections": host.connection_kinds() if host else None,
            "relay": host.relay.summary() if host and host.relay else None,
        }

    # ---- membership -------------------------------------------------------------------
    def is_member(self, peer: bytes) -> bool:
        """The CPM, the roster (re-read on SIGHUP; empty = open), and anyone a CPM-signed directive
        listed as a participant (the CPM only admits roster members to a round)."""
        return (peer == self.cpm_peer or not self.roster or peer in self.roster or peer in self._cpm_members
                or peer in self.discovered)

    def is_relay_member(self, peer: bytes) -> bool:
        """Who may use this node's relay (`relay_service`): members we know of for certain (the
        roster, members the CPM's directory or directives named), never "anyone" as an empty
        roster means for plain connections."""
        return peer in self.roster or peer in self.discovered or peer in self._cpm_members

    def gate(self) -> MemberGate:
        """Non-members are disconnected right after the Noise handshake, counted by reason."""
        return MemberGate(self.is_member, on_refused=lambda reason, _peer: self._reject("connection", reason))

    def valid_directive_message(self, origin: bytes, data: bytes) -> bool:
        """GossipSub topic validator: a message is delivered or relayed only if the CPM published it
        and it is a directive signed by the CPM for our federation (stale rounds still pass: the
        DirectiveBook drops them, and a relay must not depend on our own round)."""
        try:
            if origin != self.cpm_peer:
                raise UnauthorizedError("not published by the CPM")
            self._open_directive(decode(data, Signed, max_size=FRAME_CAPS["directive"]))
        except RemoteProtocolError as exc:
            self._reject("directive", exc.code)
            logger.warning("dropped pubsub message origin=%s reason=%s detail=%s", short(origin), exc.code, exc)
            return False
        return True

    # ---- directives ---------------------------------------------------------------------
    def _open_directive(self, signed: Signed) -> MatchDirective:
        directive = open_signed(signed, MatchDirective, authenticated=self.cpm_peer, sender_of=lambda d: d.cpm)
        if directive.federation != self.cfg.federation:
            raise UnauthorizedError("directive for another federation")
        return directive

    def _accept_directive(self, signed: Signed, source: str) -> MatchDirective | None:
        directive = self._open_directive(signed)
        if not self.book.add_directive(directive):
            return None
        self.directive_source[directive.round] = source
        self._directives[directive.round] = directive
        self._cpm_members = {p for d in self._directives.values() for p in d.participants}
        self._directive_events.setdefault(directive.round, trio.Event()).set()
        logger.info("directive round=%d source=%s pairs=%d", directive.round, source, len(directive.pairs))
        return directive

    async def listen_directives(self, host: P2PHost) -> None:
        sub = await host.subscribe(directive_topic(self.cfg.federation))
        while True:
            msg = await sub.get()
            try:
                signed = decode(msg.data, Signed, max_size=FRAME_CAPS["directive"])
                self._accept_directive(signed, "pubsub")
            except RemoteProtocolError as exc:
                self._reject("directive", exc.code)
                logger.warning("ignored pubsub message from=%s reason=%s", peer_id_str(msg.from_id)[-8:], exc)

    async def wait_directive(self, host: P2PHost, round_: int) -> MatchDirective | None:
        event = self._directive_events.setdefault(round_, trio.Event())
        with trio.move_on_after(self.cfg.directive_timeout_s):
            while not event.is_set():
                with trio.move_on_after(self.cfg.directive_poll_s):
                    await event.wait()
                if not event.is_set():
                    await self._poll_directive(host, round_)
        return self._directives.get(round_)

    async def _poll_directive(self, host: P2PHost, round_: int) -> None:
        try:
            raw = await self._request(host, DirectiveRequest(self.cfg.federation, round_, self.me), cap=FRAME_CAPS["directive"])
        except (StreamBroken, DialError) as exc:
            logger.info("directive poll round=%d failed: %s", round_, exc)
            return
        try:
            msg = decode(raw, (Signed, Reply), max_size=FRAME_CAPS["directive"])
            if isinstance(msg, Signed):
                self._accept_directive(msg, "poll")
        except RemoteProtocolError as exc:
            logger.warning("bad directive poll reply: %s", exc)

    # ---- CPM requests -------------------------------------------------------------------
    async def _request(self, host: P2PHost, msg: Any, *, cap: int) -> bytes:
        stream = await host.open_stream(self.cpm_peer, CPM_PROTOCOL, timeout=self.cfg.stream_timeout_s)
        try:
            await stream.send(encode(sign(msg, self.identity.signing_key)))
            return await stream.receive(max_size=cap, timeout=self.cfg.stream_timeout_s)
        finally:
            await stream.close()

    async def submit(self, host: P2PHost, msg: Any) -> Reply:
        """Send a profile or reward, retrying while the CPM is unreachable (it may be restarting)."""
        delay = 1.0
        while True:
            try:
                raw = await self._request(host, msg, cap=FRAME_CAPS["reply"])
                return decode(raw, Reply, max_size=FRAME_CAPS["reply"])
            except (StreamBroken, DialError, RemoteProtocolError) as exc:
                logger.warning("submit %s failed (%s); retrying in %.0fs", msg.TYPE, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # ---- KD stream: student side ----------------------------------------------------------
    async def handle_kd(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        try:
            if self.roster and peer not in self.roster:
                raise UnauthorizedError("peer not on the roster")
            hello = Hello(self.cfg.federation, self.me, _kem_public(self.kem_key), time.time())
            await stream.send(encode(sign(hello, self.identity.signing_key)))
            raw = await stream.receive(max_size=self.cfg.max_package_bytes, timeout=self.cfg.stream_timeout_s)
            signed = decode(raw, Signed, max_size=self.cfg.max_package_bytes)
            sealed = open_signed(signed, SealedPackage, authenticated=peer, sender_of=lambda m: m.sender,
                                 max_size=self.cfg.max_package_bytes)
            if sealed.recipient != self.me or sealed.federation != self.cfg.federation:
                raise UnauthorizedError("package addressed to another node or federation")
            if sealed.round not in self.book.rounds_seen:  # known rounds (saved ones too) need no wait
                event = self._directive_events.setdefault(sealed.round, trio.Event())
                with trio.move_on_after(30):  # the package may overtake the directive by a moment
                    await event.wait()
            self.book.lookup(sealed.directive_id, sealed.round)
            body = open_package(sealed, self.kem_key, max_size=self.cfg.max_package_bytes)
            self.book.consume(sealed.directive_id, sealed.round, teacher=peer, student=self.me)
            self._save_state()  # with the replay book: after a restart this directive stays used
        except RemoteProtocolError as exc:
            self._reject("package", exc.code)
            logger.warning("rejected package from=%s reason=%s detail=%s", short(peer), exc.code, exc)
            code = exc.code if exc.code in ReplyCode.ALL else ReplyCode.DECODE
            await stream.send(encode(Reply(False, code, str(exc)[:200], self.round)))
            return
        self.metrics.bytes_received.inc(len(raw))
        path = self.host.stream_kind(stream) if self.host else "direct"
        self.metrics.packages_by_path.labels("received", path).inc()
        self._inbox_path[sealed.directive_id] = path
        self._inbox[sealed.directive_id] = (body, len(raw))
        self._inbox_round[sealed.directive_id] = sealed.round
        self._inbox_events.setdefault(sealed.directive_id, trio.Event()).set()
        logger.info("package received from=%s round=%d items=%d bytes=%d path=%s", short(peer), sealed.round,
                    len(body.items), len(raw), path)
        await stream.send(encode(Reply(True, ReplyCode.OK, "", self.round)))

    # ---- KD stream: teacher side ----------------------------------------------------------
    async def send_package(self, host: P2PHost, directive: MatchDirective, student: bytes,
                           directive_id: bytes, answers: list[Answer], blocked: int) -> dict[str, Any]:
        body = PackageBody(items=tuple(PackageItem(a.task_id, a.text) for a in answers), blocked=blocked)
        stream = await host.open_stream(student, KD_PROTOCOL, timeout=self.cfg.stream_timeout_s)
        path = host.stream_kind(stream)
        try:
            raw = await stream.receive(max_size=FRAME_CAPS["hello"], timeout=self.cfg.stream_timeout_s)
            hello = open_signed(decode(raw, Signed, max_size=FRAME_CAPS["hello"]), Hello,
                                authenticated=student, sender_of=lambda h: h.node)
            if hello.federation != self.cfg.federation:
                raise UnauthorizedError("student is in another federation")
            sealed = seal_package(body, federation=self.cfg.federation, round=directive.round,
                                  directive_id=directive_id, sender=self.me, recipient=student,
                                  recipient_kem_public=hello.kem_public)
            payload = encode(sign(sealed, self.identity.signing_key))
            await stream.send(payload)
            ack = decode(await stream.receive(max_size=FRAME_CAPS["reply"], timeout=self.cfg.stream_timeout_s), Reply)
        finally:
            await stream.close()
        self.metrics.packages_by_path.labels("sent", path).inc()
        return {"package_bytes": len(payload), "ack": ack.code, "items": len(body.items), "path": path}

    # ---- connectivity -------------------------------------------------------------------
    async def keep_connected(self, host: P2PHost) -> None:
        """Dial the CPM, bootstrap and roster peers in the background, reconnecting with
        exponential backoff per address (the list is re-read each pass, so SIGHUP edits apply)."""
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while True:
            addrs = self.dial_targets()
            now = trio.current_time()
            for a in addrs:
                backoff.setdefault(a, 0.5)
                if next_try.get(a, 0.0) > now:
                    continue
                try:
                    peer = parse_peer(a)
                    if not host.is_connected(peer):
                        await host.connect(a, timeout=5.0)
                        logger.info("connected peer=%s", short(peer), extra={"event": "connected", "peer": short(peer)})
                    backoff[a] = 0.5
                except (DialError, ValueError) as exc:
                    backoff[a] = min(backoff[a] * 2, 30.0)
                    logger.debug("dial %s failed (next try in %.1fs): %s", a, backoff[a], exc)
                next_try[a] = trio.current_time() + backoff[a]
            await host.enforce_membership()  # a SIGHUP that removed a member disconnects it here
            self.metrics.peers.set(len(host.connected_peers()))
            self.metrics.observe_connections(
                host.connection_kinds(), host.relay.summary() if host.relay else None,
                reservations=len(host.relay_client.circuit_addrs()) if host.relay_client else 0,
                reachability=host.reachability)
            await trio.sleep(0.5)

    async def wait_for_cpm(self, host: P2PHost) -> None:
        """Block the first round (not start-up) until the CPM answers; 0 s = wait forever."""
        last: Exception | None = None
        with trio.move_on_after(self.cfg.cpm_connect_timeout_s or math.inf):
            while True:
                try:
                    await host.connect(self.cfg.cpm, timeout=5.0)
                    return
                except DialError as exc:
                    last = exc
                    await trio.sleep(1.0)
        raise UnreachableError(f"cannot reach CPM at {self.cfg.cpm} within "
                               f"{self.cfg.cpm_connect_timeout_s:.0f}s ({last})")

    # ---- rounds -------------------------------------------------------------------------
    async def _sync_public_set(self, host: P2PHost) -> None:
        """Verify (or fetch) the CPM's public set, then build the backend if it was deferred."""
        if self.backend is not None:  # already loaded: its folder must hold the announced version
            public_dir = self.cfg.public_dir or (self.cfg.data_dir.parent / "public" if self.cfg.data_dir else None)
            ann = await public_set_mod.ask_until_answered(host, self.cpm_peer, self.identity, self.cfg.federation,
                                                          timeout=self.cfg.stream_timeout_s)
            if ann is not None:
                problem = public_set_mod.check_local(public_dir, ann) if public_dir else public_set_mod.MISSING
                if problem is not None:
                    raise PublicSetMismatch(f"public set: {public_dir} {problem}, but the CPM announces "
                                            f"{public_set_label(ann)}; no round runs on it")
            self.public_set = ann
            return
        ann, folder = await public_set_mod.ensure(host, self.cpm_peer, self.identity, federation=self.cfg.federation,
                                                  state_dir=self.state_dir, public_dir=self.cfg.public_dir,
                                                  timeout=self.cfg.stream_timeout_s)
        self.public_set = ann
        assert self._make_backend is not None
        self.backend = await self._ml_call(self._make_backend, folder)

    async def _check_public_set(self, host: P2PHost) -> None:
        """Before every round: refuse it if the CPM now announces another public set."""
        ann = await public_set_mod.ask_until_answered(host, self.cpm_peer, self.identity, self.cfg.federation,
                                                      timeout=self.cfg.stream_timeout_s)
        mine = self.public_set.digest if self.public_set else None
        if (ann.digest if ann else None) != mine:
            have = public_set_label(self.public_set) if self.public_set else "no public set"
            now = public_set_label(ann) if ann else "none"
            raise PublicSetMismatch(f"public set changed: this node runs {have}, the CPM now announces {now}; "
                                    f"round {self.round} not started (restart the node to fetch the new version; "
                                    "rounds of each version are kept apart)")

    async def run_round(self, host: P2PHost) -> None:
        with self._phase("public_set"):
            await self._check_public_set(host)
        t0 = time.time()
        self.round_phases = {}
        budget0 = self._budget()
        self.metrics.round.set(self.round)
        with self._phase("train"):
            train = await self._ml_call(self.backend.train_local_epoch, self.round)
        with self._phase("evaluate"):
            ev = await self._ml_call(self.backend.evaluate, self.round)
        # a diverged model (NaN loss) is reported as "worst", never as NaN on the wire
        self.history.append(PerfPoint(
            pass_at_1=ev.pass_at_1 if math.isfinite(ev.pass_at_1) else 0.0,
            codebleu=ev.codebleu if math.isfinite(ev.codebleu) else 0.0,
            perplexity=ev.perplexity if math.isfinite(ev.perplexity) else float("inf"),
        ))
        vector = build_profile(self.backend.family, self.history, self.backend.category_histogram())
        vector = self.privacy.release(vector, decimals=self.cfg.profile_decimals)
        # skills (opt-in): one more release, charged like the profile's (docs/security.md)
        skills: tuple[float, ...] = ()
        if self.cfg.share_skills:
            with self._phase("skills"):
                _, per_cat = await self._ml_call(self.backend.validation_skills)
            fresh = self.privacy.can_release()
            released = self.privacy.release_skills(skills_vector(per_cat), decimals=self.cfg.profile_decimals)
            if released is not None:
                skills = tuple(map(float, released))
        self._save_state()  # the spent budget is on disk before the profile leaves the node
        self.metrics.observe_privacy(self.privacy.summary())
        if self.cfg.share_skills:
            logger.info("round=%d skills: %s", self.round,
                        "shared (fresh release)" if skills and fresh else
                        "shared (frozen at the last release: budget spent)" if skills else
                        "none sent (budget spent before any release)")
        with self._phase("profile"):
            accepted = await self._submit_profile(host, vector, skills)
        entry: dict[str, Any] = {
            "round": self.round, "node": peer_id_str(self.me), "model": self.backend.model_name,
            "family": self.backend.family, "train_loss": train.mean_loss, "val_loss": ev.val_loss,
            "perplexity": ev.perplexity, "pass_at_1": ev.pass_at_1, "codebleu": ev.codebleu,
            "role": "idle", "partner": None, "train_examples": train.examples,
            "train_samples_per_s": round(train.examples / train.seconds, 3) if train.seconds > 0 else None,
            "public_set": public_set_label(self.public_set) if self.public_set else None,
        }
        directive = None
        if accepted:
            with self._phase("wait_directive"):
                directive = await self.wait_directive(host, self.round)
        if directive is None:
            logger.warning("no directive for round=%d within %.0fs; skipping", self.round, self.cfg.directive_timeout_s)
            entry["role"] = "no_directive"
        else:
            entry["directive_source"] = self.directive_source.get(self.round)
            for m in directive.pairs:
                if m.teacher == self.me:
                    entry.update(await self._teach(host, directive, m.student, m.directive_id))
                elif m.student == self.me:
                    entry.update(await self._learn(host, directive, m.teacher, m.directive_id, ev.val_loss))
        if "val_loss_post" not in entry:
            # equal budgets: whoever did not distil this round takes the same Eq. 2 steps without
            # a teacher term (a student's counterfactual), so no role trains more than another
            with self._phase("integrate_local"):
                await self._ml_call(self.backend.integrate_local, self.round, max(self.cfg.rounds, 1))
        entry["seconds"] = round(time.time() - t0, 2)
        entry["budget"] = {k: v - budget0.get(k, 0) for k, v in self._budget().items()}
        with self._phase("checkpoint"):
            await self._save_checkpoint()
        entry["phase_seconds"] = {k: round(v, 2) for k, v in self.round_phases.items()}
        # counter first: a kill between the two loses a log line, never re-runs a round
        self.round += 1
        self.completed += 1
        self._save_state()
        self._record(entry)
        self._prune()
        self.last_rounds.append(self._round_summary(entry))
        self.metrics.rounds.inc()
        self.metrics.round.set(self.round)
        self.metrics.round_seconds.observe(time.time() - t0)
        self._notify_status()

    async def _submit_profile(self, host: P2PHost, vector: np.ndarray, skills: tuple[float, ...] = ()) -> bool:
        """Send this round's profile (and sanitized skills, if shared; empty = none); False when
        the CPM stayed behind us for directive_timeout_s.

        Catch up only forward: if the CPM has a later round open we jump to it; if it is still
        on an earlier one (we moved on after a directive timeout) we keep our round number and
        resubmit until it gets here, so a round number is never run twice.
        """
        deadline = trio.current_time() + self.cfg.directive_timeout_s
        while True:
            profile = Profile(self.cfg.federation, self.round, self.me, tuple(map(float, vector)), skills=skills)
            reply = await self.submit(host, profile)
            if reply.ok:
                return True
            if reply.code != ReplyCode.STALE_ROUND:
                raise UnauthorizedError(f"CPM refused our profile: {reply.code} {reply.detail}")
            if reply.round > self.round:
                logger.info("CPM has round %d open (we were at %d); catching up", reply.round, self.round)
                self.round = reply.round
                continue
            if trio.current_time() > deadline:
                logger.warning("CPM still at round=%d, we are at round=%d; skipping", reply.round, self.round)
                return False
            await trio.sleep(self.cfg.directive_poll_s)

    def _budget(self) -> dict[str, int]:
        """The backend's training/generation counters (empty for backends that keep none)."""
        budget = getattr(self.backend, "budget", None)
        return dict(budget()) if callable(budget) else {}

    async def _teach(self, host: P2PHost, directive: MatchDirective, student: bytes, did: bytes) -> dict[str, Any]:
        self.metrics.matches.labels("teacher").inc()
        prompts = self.backend.transfer_prompts()
        with self._phase("teach_generate"):
            answers = await self._ml_call(self.backend.generate_answers, prompts)
            kept, report = await self._ml_call(self.backend.filter_outgoing, answers)
        for reason, n in report.reasons.items():
            self.metrics.guardrail_blocks.labels(reason).inc(n)
        logger.info("teacher round=%d student=%s answers=%d blocked=%d reasons=%s", directive.round,
                    short(student), len(kept), report.blocked, report.reasons)
        out: dict[str, Any] = {"role": "teacher", "partner": peer_id_str(student),
                               "guardrail": {"kept": report.kept, "blocked": report.blocked, "reasons": report.reasons}}
        if not host.is_connected(student):
            await self._reach_student(host, student)
        try:
            with self._phase("teach_send"):
                out.update(await self.send_package(host, directive, student, did, kept, report.blocked))
            self.metrics.bytes_sent.inc(out["package_bytes"])
            self._count("packages_sent")
        except (StreamBroken, RemoteProtocolError) as exc:
            self._count("packages_failed")
            logger.warning("package to %s failed: %s", short(student), exc)
            out["error"] = str(exc)[:200]
        return out

    async def _reach_student(self, host: P2PHost, student: bytes) -> None:
        """Refresh its address (it may have moved), then keep dialling it for up to
        `stream_timeout_s`: a student behind a NAT cannot be dialled but dials us itself
        (connection reversal, see `_learn`), and our stream then rides its connection; a student
        that is really gone must not hold up our round for longer than that."""
        await self.refresh_directory(host)
        with trio.move_on_after(min(self.cfg.package_timeout_s, self.cfg.stream_timeout_s)):
            while not await host.dial_peer(student, timeout=self.cfg.stream_timeout_s):
                await trio.sleep(1.0)

    async def _learn(self, host: P2PHost, directive: MatchDirective, teacher: bytes, did: bytes,
                     loss_pre: float) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "student", "partner": peer_id_str(teacher)}
        self.metrics.matches.labels("student").inc()
        event = self._inbox_events.setdefault(did, trio.Event())
        if not host.is_connected(teacher):
            # connection reversal: behind a NAT the teacher cannot dial us, but we can dial it,
            # and its KD stream then rides our connection (tests/integration/test_netns_nat.py)
            if teacher not in self.discovered:
                await self.refresh_directory(host)
            # direct only: a teacher reached through a relay dials us there itself (one circuit,
            # not two crossing ones)
            await host.dial_peer(teacher, timeout=self.cfg.stream_timeout_s, relay=False)
        self._waiting.add(did)
        try:
            with self._phase("learn_wait_package"), trio.move_on_after(self.cfg.package_timeout_s):
                await event.wait()
        finally:
            self._waiting.discard(did)
        if did not in self._inbox:
            logger.warning("no package from teacher=%s round=%d; no reward reported", short(teacher), directive.round)
            out["error"] = "package timeout"
            return out
        body, nbytes = self._inbox.pop(did)
        out["path"] = self._inbox_path.pop(did, None)
        self._inbox_round.pop(did, None)
        self._inbox_events.pop(did, None)
        answers = [Answer(i.task_id, i.text) for i in body.items]
        atomic_write_json(self.state_dir / "received" / f"round-{directive.round:04d}.json",
                          {"teacher": peer_id_str(teacher), "items": [[a.task_id, a.text] for a in answers]})
        adapter_before = self.backend.adapter_fingerprint()
        base_before = self.backend.base_fingerprint()
        with self._phase("learn_distill"):
            learned = await self._ml_call(self.backend.learn, answers, directive.round, max(self.cfg.rounds, 1))
        kd, loss_without, loss_post = learned.report, learned.loss_without, learned.loss_with
        if not (math.isfinite(loss_without) and math.isfinite(loss_post)):
            logger.warning("non-finite validation loss (%s without the teacher, %s with) round=%d; no reward "
                           "reported", loss_without, loss_post, directive.round)
            out["error"] = "non-finite loss"
            out["val_loss_post"] = loss_post
            return out
        # Eq. 3 with a teacher-attributable dL: the loss the same steps reach without the
        # teacher's term, minus the loss with it (docs/method.md, "Reward")
        reward = compute_reward(loss_without, loss_post, nbytes, gamma=self.cfg.reward_gamma,
                                delta=self.cfg.reward_delta)
        report = RewardReport(self.cfg.federation, directive.round, did, teacher, self.me, float(reward), nbytes)
        reply = await self.submit(host, report)
        if reply.ok:
            self.metrics.rewards.observe(reward)
        measure = learned.measure  # validation loss (the paper) or executed validation error
        logger.info("student round=%d teacher=%s %s %.4f without the teacher, %.4f with it (val loss before %.4f) "
                    "reward=%.4f cpm=%s", directive.round, short(teacher), measure, loss_without, loss_post,
                    loss_pre, reward, reply.code)
        out.update({
            "val_loss_pre": loss_pre, "val_loss_without": loss_without, "val_loss_post": loss_post,
            "reward_measure": measure, "reward": reward, "package_bytes": nbytes,
            "items": len(answers), "kd_loss": kd.mean_loss, "reward_ack": reply.code,
            "adapter_before": adapter_before, "adapter_after": self.backend.adapter_fingerprint(),
            "base_before": base_before, "base_after": self.backend.base_fingerprint(),
        })
        return out

    def _prune(self, keep: int = 2) -> None:
        """Forget per-round bookkeeping older than `keep` rounds: a daemon runs for weeks."""
        horizon = self.round - keep
        for book in (self._directives, self._directive_events, self.directive_source):
            for r in [r for r in book if r < horizon]:
                del book[r]
        self._cpm_members = {p for d in self._directives.values() for p in d.participants}
        for did in [d for d, r in self._inbox_round.items() if r < horizon]:
            self._inbox.pop(did, None)
            self._inbox_path.pop(did, None)
            self._inbox_events.pop(did, None)
            del self._inbox_round[did]
        # events created by a student that waited in vain (no package ever arrived)
        for did in [d for d in self._inbox_events if d not in self._inbox_round and d not in self._waiting]:
            del self._inbox_events[did]

    def _notify_status(self) -> None:
        self.notifier.status(f"round {self.round} ({self.completed} completed this run), phase {self.phase}")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.cfg.metrics_listen:
            self.metrics_port = self.metrics.serve(*parse_hostport(self.cfg.metrics_listen))
        gossip = GossipSettings.for_size(len(self.roster) + 1 if self.roster else 5)
        try:
            nat = self.cfg.nat_traversal
            async with open_host(self.identity, self.cfg.listen, gossip=gossip, gate=self.gate(),
                                 relay=RelayPolicy() if self.cfg.relay_service else None,
                                 relay_members=self.is_relay_member, relay_client=nat,
                                 hole_punch=nat and self.cfg.hole_punch) as host, \
                    trio.open_nursery() as nursery:
                self.host = host
                host.set_topic_validator(directive_topic(self.cfg.federation), self.valid_directive_message)
                host.set_handler(KD_PROTOCOL, self.handle_kd)
                await nursery.start(serve_control, self.state_dir / CONTROL_SOCKET, {"status": self.status})
                task_status.started(host.addrs())
                nursery.start_soon(self.keep_connected, host)
                with self._phase("connect_cpm"):
                    await self.wait_for_cpm(host)
                if nat:
                    with self._phase("reachability"):
                        await self.find_reachability(host, nursery)
                with self._phase("public_set"):
                    await self._sync_public_set(host)
                nursery.start_soon(self.listen_directives, host)
                nursery.start_soon(self.discover_peers, host)
                with self._phase("load_checkpoint"):
                    resumed = await self._ml_call(self.backend.load_checkpoint, self.state_dir / "checkpoint")
                if resumed or self.round:
                    logger.info("resuming at round=%d (checkpoint %s)", self.round, "loaded" if resumed else "none",
                                extra={"event": "resume", "round": self.round})
                self.phase = "rounds"
                while self.cfg.rounds == 0 or self.completed < self.cfg.rounds:
                    await self.run_round(host)
                if self.cfg.final_eval:
                    with self._phase("final_eval"):
                        ev = await self._ml_call(self.backend.evaluate, self.round)
                    atomic_write_json(self.state_dir / "final.json", {
                        "node": peer_id_str(self.me), "model": self.backend.model_name, **asdict(ev)})
                logger.info("completed %d rounds; exiting", self.completed)
                nursery.cancel_scope.cancel()
        finally:
            self.host = None
            self.metrics.close()

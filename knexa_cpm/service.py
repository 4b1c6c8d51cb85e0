"""`knexa-cpm serve`: the thin trio/libp2p shell around the round machine and the policy.

It receives signed profiles and rewards on CPM_PROTOCOL, closes rounds on quorum or timeout,
and publishes signed directives on the federation's GossipSub topic. It never opens, stores or
relays a knowledge package: it does not even speak KD_PROTOCOL.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from knexa_p2p.directory import PEERS_PROTOCOL, PeerDirectory
from knexa_p2p.host import GossipSettings, MemberGate, P2PHost, open_host
from knexa_p2p.identity import load_or_create_identity
from knexa_p2p.nat import RelayPolicy
from knexa_p2p.reach import DIALBACK_PROTOCOL, DialBackService
from knexa_p2p.streams import FramedStream, StreamBroken
from knexa_runtime.atomic import atomic_write_json
from knexa_runtime.config import to_toml_dict
from knexa_runtime.control import CONTROL_SOCKET, serve_control
from knexa_runtime.daemon import diff_settings, merged_roster, parse_hostport
from knexa_runtime.logs import set_level
from knexa_runtime.metrics import DaemonMetrics
from protocol import (
    CPM_PROTOCOL,
    PUBLIC_SET_PROTOCOL,
    DirectiveRequest,
    MatchDirective,
    Profile,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    RewardReport,
    Signed,
    decode,
    directive_topic,
    encode,
    open_signed,
    peer_id_str,
    sign,
)

from .config import CpmSection
from .errors import StateError
from .policies import make_policy
from .public_sets import PublicSet, PublicSetError, PublicSetStore, serve_public_set
from .rounds import RoundMachine, RoundSettings, short
from .state import load_state, save_state

__all__ = ["RELOADABLE", "CpmService", "relay_policy", "serve"]

logger = logging.getLogger("knexa_cpm")
REQUEST_CAP = 8 * 1024
READ_TIMEOUT_S = 10.0
#: accepted rewards kept in stats["rewards"] (newest last) for status and post-mortems; the state
#: file is rewritten on every reward, so an unbounded log would make each write grow forever
REWARD_LOG_KEEP = 1000
#: settings SIGHUP applies to a running CPM; the rest (listen, state_dir, federation, policy
#: and its hyper-parameters) shape persisted state or sockets and need a restart
RELOADABLE = ("roster", "roster_file", "expected_nodes", "quorum", "round_timeout_s", "min_participants",
              "log_level")


def _peer_bytes(b58: str) -> bytes:
    import base58

    return base58.b58decode(b58)


class CpmService:
    def __init__(self, cfg: CpmSection) -> None:
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity = load_or_create_identity(self.state_dir / "identity.key")
        self.settings = self._round_settings(cfg)
        roster = self.settings.roster
        self.metrics = DaemonMetrics("cpm")
        self.started = time.time()
        self.last_closed: dict[str, Any] | None = None
        self.metrics_port: int | None = None
        self.policy = make_policy(cfg.policy, context=cfg.context, lam=cfg.lam, beta0=cfg.beta0, seed=cfg.seed,
                                  trust_weight=cfg.trust_weight, trust_rate=cfg.trust_rate,
                                  skill_prior=cfg.skill_prior, reward_scale=cfg.reward_scale, explore=cfg.explore,
                                  adaptive_effects=cfg.adaptive_effects)
        self.machine = RoundMachine(self.settings)
        self.stats: dict[str, Any] = {"updates": 0, "rewards": [], "rejected": {}, "rounds_closed": 0}
        saved = load_state(self.state_dir)
        if saved is not None:
            try:
                self.machine = RoundMachine.from_state(self.settings, saved["machine"])
                self.policy.load_state_dict(saved["policy"])
            except (KeyError, TypeError, ValueError) as exc:
                raise StateError(f"{self.state_dir}: saved state does not fit this configuration ({exc}); "
                                 "restore the old policy/context settings or move the state away") from exc
            self.stats = saved["stats"]
            del self.stats["rewards"][:-REWARD_LOG_KEEP]
            logger.info("resumed state %s updates=%d", self.machine.describe(), self.stats["updates"])
        if not roster:
            logger.warning("no roster configured: any peer that connects may take part")
        self.topic = directive_topic(cfg.federation)
        self._lock = trio.Lock()
        self._host: P2PHost | None = None
        self.dialback: DialBackService | None = None
        #: members' signed peer records, served to members (discovery with only the CPM's address)
        self.directory = PeerDirectory(self.is_member, on_rejected=lambda reason: self._reject(reason, "peer_record"))
        self.public_sets = PublicSetStore(self.state_dir)
        self.public_set: PublicSet | None = None
        try:
            self._refresh_public_set()
        except PublicSetError as exc:
            raise StateError(f"public set: {exc}") from exc

    def _refresh_public_set(self) -> None:
        """Load the current public-set version; note from which round on it is announced, so
        results of rounds run on different versions stay apart."""
        current = self.public_sets.current()
        if current is None or (self.public_set is not None and current.digest == self.public_set.digest):
            return
        history = self.stats.setdefault("public_sets", [])
        if not history or history[-1]["digest"] != current.digest.hex():
            history.append({"version": current.version, "digest": current.digest.hex(),
                            "from_round": self.machine.round, "announced_at": time.time()})
            self.persist()
        self.public_set = current
        logger.info("public set %s announced from round=%d test=%d transfer=%d", current.label,
                    history[-1]["from_round"], current.test, current.transfer)

    def _round_settings(self, cfg: CpmSection) -> RoundSettings:
        ids, _addrs = merged_roster(cfg.roster, cfg.roster_file)
        roster = frozenset(_peer_bytes(p) for p in ids)
        return RoundSettings(
            federation=cfg.federation, cpm=self.identity.peer_bytes, roster=roster,
            expected_nodes=len(roster) or cfg.expected_nodes, quorum=cfg.quorum,
            round_timeout_s=cfg.round_timeout_s, min_participants=cfg.min_participants,
        )

    # ---- operations -------------------------------------------------------------------
    def reload(self, new: CpmSection) -> list[str]:
        """Apply the reloadable part of a re-read config (SIGHUP); returns what was ignored."""
        try:
            self._refresh_public_set()
        except PublicSetError as exc:
            logger.error("reload: public set not changed: %s", exc)
        applied, ignored = diff_settings(self.cfg, new, RELOADABLE)
        if ignored:
            logger.warning("reload: %s changed but need a restart; not applied", ", ".join(ignored))
        if not applied and new.roster_file is None:
            logger.info("reload: nothing changed")
            return ignored
        cfg = dataclasses.replace(self.cfg, **applied) if applied else self.cfg
        settings = self._round_settings(cfg)  # re-reads the roster file even if its path is unchanged
        self.cfg = cfg
        self.settings = settings
        self.machine.settings = settings
        set_level(cfg.log_level)
        logger.info("reload: applied %s; roster=%d quorum=%d", sorted(applied) or "roster file",
                    len(settings.roster), settings.quorum_count)
        return ignored

    def status(self) -> dict[str, Any]:
        host = self._host
        return {
            "daemon": "knexa-cpm", "peer": str(self.identity.peer_id), "federation": self.cfg.federation,
            "policy": self.cfg.policy, "context": self.cfg.context, "round": self.machine.round,
            "profiles_this_round": len(self.machine.profiles), "quorum": self.settings.quorum_count,
            "roster": len(self.settings.roster), "pending_rewards": len(self.machine.pending),
            "rounds_closed": self.stats["rounds_closed"], "bandit_updates": self.stats["updates"],
            "rejected": dict(self.stats["rejected"]), "last_round": self.last_closed,
            "peer_records": len(self.directory.records),
            "peers": sorted(peer_id_str(p)[-8:] for p in host.connected_peers()) if host else [],
            "uptime_s": round(time.time() - self.started, 1), "metrics_port": self.metrics_port,
            "health": "ok" if host is not None else "starting",
            "public_set": self.public_set.label if self.public_set else None,
            "connections": host.connection_kinds() if host else None,
            "relay": host.relay.summary() if host and host.relay else None,
            "dialback": dict(self.dialback.counts) if self.dialback else None,
        }

    # ---- persistence ------------------------------------------------------------------
    def persist(self) -> None:
        save_state(self.state_dir, {
            "machine": self.machine.to_state(),
            "policy": self.policy.state_dict(),
            "stats": self.stats,
        })

    def is_member(self, peer: bytes) -> bool:
        """The roster decides membership (read at start and on SIGHUP); an empty roster is open."""
        roster = self.settings.roster
        return not roster or peer in roster or peer == self.identity.peer_bytes

    def gate(self) -> MemberGate:
        """Non-members are disconnected right after the Noise handshake, counted by reason."""
        return MemberGate(self.is_member, on_refused=lambda reason, _peer: self._reject(reason, "connection"))

    def valid_directive_message(self, origin: bytes, data: bytes) -> bool:
        """GossipSub topic validator: only the CPM publishes directives, so nothing else is relayed."""
        if origin == self.identity.peer_bytes:
            return True
        self._reject("not_cpm", "pubsub")
        logger.warning("dropped pubsub message origin=%s reason=not_cpm", short(origin))
        return False

    def _log_reward(self, row: list[Any]) -> None:
        """Append an accepted reward to stats["rewards"], keeping the newest REWARD_LOG_KEEP."""
        rewards = self.stats["rewards"]
        rewards.append(row)
        del rewards[:-REWARD_LOG_KEEP]

    def _reject(self, reason: str, kind: str = "request") -> None:
        self.stats["rejected"][reason] = self.stats["rejected"].get(reason, 0) + 1
        self.metrics.rejected.labels(kind, reason).inc()

    # ---- request handling ---------------------------------------------------------------
    async def handle_stream(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        try:
            raw = await stream.receive(max_size=REQUEST_CAP, timeout=READ_TIMEOUT_S)
            signed = decode(raw, Signed, max_size=REQUEST_CAP)
            msg = open_signed(
                signed, (Profile, RewardReport, DirectiveRequest), authenticated=peer,
                sender_of=lambda m: m.student if isinstance(m, RewardReport) else m.node,
            )
        except RemoteProtocolError as exc:
            self._reject(exc.code)
            logger.warning("rejected request peer=%s reason=%s detail=%s", short(peer), exc.code, exc)
            await self._reply(stream, Reply(False, exc.code if exc.code in ReplyCode.ALL else ReplyCode.DECODE,
                                            str(exc)[:200], self.machine.round))
            return
        async with self._lock:
            if isinstance(msg, Profile):
                reply = self.machine.submit_profile(peer, msg, time.time())
                logger.info("profile peer=%s round=%d ok=%s %s", short(peer), msg.round, reply.ok, self.machine.describe())
                if reply.ok:
                    self.persist()
            elif isinstance(msg, RewardReport):
                reply, entry = self.machine.submit_reward(peer, msg)
                if entry is not None:
                    self.policy.observe(np.asarray(entry.teacher_profile), np.asarray(entry.student_profile), msg.reward,
                                        teacher_id=peer_id_str(entry.teacher), student_id=peer_id_str(entry.student))
                    self.metrics.rewards.observe(msg.reward)
                    self.stats["updates"] += 1
                    self._log_reward([msg.round, peer_id_str(msg.teacher), peer_id_str(msg.student), msg.reward])
                    self.persist()
                logger.info("reward peer=%s round=%d teacher=%s reward=%.4f ok=%s code=%s", short(peer), msg.round,
                            short(msg.teacher), msg.reward, reply.ok, reply.code)
            elif not self.is_member(peer):  # members only: a directive says who is online and paired
                reply = Reply(False, ReplyCode.UNAUTHORIZED, "peer not on the federation roster", self.machine.round)
                logger.warning("refused directive request peer=%s round=%d reason=not_member", short(peer), msg.round)
            else:
                directive = self.machine.directive_for(msg.round)
                if directive is not None:
                    await self._send(stream, encode(sign(directive, self.identity.signing_key)))
                    return
                reply = Reply(False, ReplyCode.NOT_READY, "directive not issued yet", self.machine.round)
            if not reply.ok and reply.code != ReplyCode.NOT_READY:  # a poll too early is no offence
                self._reject(reply.code)
        await self._reply(stream, reply)

    async def handle_public_set(self, stream: FramedStream) -> None:
        """PUBLIC_SET_PROTOCOL: the signed announce of the current version, or its chunks."""
        try:
            outcome = await serve_public_set(
                stream, self.public_set, federation=self.cfg.federation, identity=self.identity,
                allowed=lambda p: not self.settings.roster or p in self.settings.roster, round_=self.machine.round)
        except StreamBroken as exc:
            logger.info("public set stream to %s broke: %s", short(stream.remote_peer), exc)
            return
        if outcome not in ("announce", "fetch", "none"):
            self._reject(outcome, "public_set")
        logger.info("public set peer=%s request=%s", short(stream.remote_peer), outcome)

    async def _reply(self, stream: FramedStream, reply: Reply) -> None:
        await self._send(stream, encode(reply))

    async def _send(self, stream: FramedStream, payload: bytes) -> None:
        try:
            await stream.send(payload)
        except StreamBroken as exc:
            logger.info("could not reply to %s: %s", short(stream.remote_peer), exc)

    # ---- round loop ---------------------------------------------------------------------
    async def round_loop(self, host: P2PHost) -> None:
        new_id: Callable[[], bytes] = lambda: os.urandom(16)  # noqa: E731
        while True:
            await trio.sleep(0.25)
            async with self._lock:
                if not self.machine.ready_to_close(time.time()):
                    continue
                round_ = self.machine.round
                # close_round matches the open round's reporters in sorted order: the same rows as P
                ids = [peer_id_str(p) for p in sorted(self.machine.profiles)]
                directive = self.machine.close_round(
                    time.time(), lambda P, r, ids=ids: self.policy.select(P, r, peer_ids=ids), new_id
                )
                self.stats["rounds_closed"] += 1
                self.persist()
            pairs = ", ".join(f"{short(m.teacher)}->{short(m.student)}" for m in directive.pairs)
            logger.info("round=%d closed participants=%d pairs=[%s]", round_, len(directive.participants), pairs,
                        extra={"event": "round_closed", "round": round_})
            self.metrics.rounds.inc()
            self.metrics.round.set(self.machine.round)
            self.metrics.matches.labels("issued").inc(len(directive.pairs))
            self.last_closed = {"round": round_, "participants": len(directive.participants),
                                "pairs": [f"{short(m.teacher)}->{short(m.student)}" for m in directive.pairs],
                                "closed_at": time.time()}
            await self._publish(host, directive)

    async def _publish(self, host: P2PHost, directive: MatchDirective) -> None:
        data = encode(sign(directive, self.identity.signing_key))
        try:
            await host.publish(self.topic, data)
        except Exception as exc:  # pubsub is best effort: nodes also poll with DirectiveRequest
            logger.warning("publish round=%d failed: %s", directive.round, exc)

    async def watch_peers(self, host: P2PHost) -> None:
        while True:
            await host.enforce_membership()  # a SIGHUP that removed a member disconnects it here
            self.metrics.peers.set(len(host.connected_peers()))
            self.metrics.observe_connections(host.connection_kinds(), host.relay.summary() if host.relay else None)
            await trio.sleep(2.0)

    async def drain(self, host: P2PHost) -> None:
        sub = await host.subscribe(self.topic)
        while True:
            await sub.get()  # our own and stray messages; subscribing keeps us in the mesh


def relay_policy(cfg: CpmSection) -> RelayPolicy | None:
    """The limits the CPM's circuit relay grants members, from ``[cpm]``; None when ``relay`` is off."""
    if not cfg.relay:
        return None
    return RelayPolicy(reservation_ttl_s=cfg.relay_reservation_ttl_s, circuit_duration_s=cfg.relay_circuit_duration_s,
                       circuit_bytes=cfg.relay_circuit_bytes, max_reservations=cfg.relay_max_reservations,
                       max_circuits_per_peer=cfg.relay_max_circuits_per_peer)


async def serve(cfg: CpmSection, *, service: CpmService | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the CPM until cancelled. Reports its multiaddrs via `task_status.started`."""
    svc = CpmService(cfg) if service is None else service
    atomic_write_json(cfg.state_dir / "effective-config.json", to_toml_dict(cfg))
    gossip = GossipSettings.for_size(svc.settings.expected_nodes + 1)
    if cfg.metrics_listen:
        svc.metrics_port = svc.metrics.serve(*parse_hostport(cfg.metrics_listen))
    try:
        relay = relay_policy(cfg)
        async with open_host(svc.identity, cfg.listen, gossip=gossip, gate=svc.gate(), relay=relay) as host:
            svc._host = host
            svc.dialback = DialBackService(host, svc.is_member)
            host.set_handler(DIALBACK_PROTOCOL, svc.dialback.handle)
            host.set_topic_validator(svc.topic, svc.valid_directive_message)
            host.set_handler(CPM_PROTOCOL, svc.handle_stream)
            host.set_handler(PEERS_PROTOCOL, svc.directory.handle)
            host.set_handler(PUBLIC_SET_PROTOCOL, svc.handle_public_set)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc.drain, host)
                nursery.start_soon(svc.round_loop, host)
                nursery.start_soon(svc.watch_peers, host)
                await nursery.start(serve_control, cfg.state_dir / CONTROL_SOCKET, {"status": svc.status})
                addrs = host.addrs()
                logger.info("cpm ready peer=%s federation=%s policy=%s quorum=%d",
                            host.identity.peer_id, cfg.federation, cfg.policy, svc.settings.quorum_count)
                task_status.started(addrs)
    finally:
        svc._host = None
        svc.metrics.close()

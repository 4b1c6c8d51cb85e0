"""Prometheus metrics for both daemons (`prometheus_client`), on a per-daemon registry.

One registry per daemon (not the process-global default) so in-process tests can run several
daemons side by side. Names follow Prometheus conventions: `_total` counters, `_seconds`
histograms, and a `role` label (`node` or `cpm`) so one dashboard covers both.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

__all__ = ["DaemonMetrics"]

logger = logging.getLogger(__name__)
disable_created_metrics()  # `*_created` series double the output and nobody graphs them
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_REWARD_BUCKETS = (-1.0, -0.5, -0.1, -0.01, 0.0, 0.01, 0.1, 0.5, 1.0)


class DaemonMetrics:
    """Every metric a KNEXA daemon exports. Unused ones simply stay at zero."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("knexa_round", "The round this daemon is in", registry=r)
        self.rounds = Counter("knexa_rounds_total", "Rounds completed (node) or closed (CPM)", registry=r)
        self.matches = Counter("knexa_matches_total", "Matches: pairs issued (CPM) or taken part in (node)",
                               ["role"], registry=r)
        self.rewards = Histogram("knexa_reward", "Rewards (Eq. 3) reported (node) or accepted (CPM)",
                                 buckets=_REWARD_BUCKETS, registry=r)
        self.bytes_sent = Counter("knexa_bytes_sent_total", "Knowledge-package bytes sent", registry=r)
        self.bytes_received = Counter("knexa_bytes_received_total", "Knowledge-package bytes received",
                                      registry=r)
        self.rejected = Counter("knexa_rejected_messages_total", "Messages rejected, by reason",
                                ["kind", "reason"], registry=r)
        self.guardrail_blocks = Counter("knexa_guardrail_blocks_total",
                                        "Outgoing answers blocked by the guardrail, by reason", ["reason"],
                                        registry=r)
        self.round_seconds = Histogram("knexa_round_duration_seconds", "Wall time of a whole round",
                                       buckets=_DURATION_BUCKETS, registry=r)
        self.phase_seconds = Histogram("knexa_phase_duration_seconds", "Wall time of a round phase",
                                       ["phase"], buckets=_DURATION_BUCKETS, registry=r)
        self.peers = Gauge("knexa_peers", "libp2p peers currently connected", registry=r)
        self.privacy_spent = Gauge("knexa_privacy_epsilon_spent",
                                   "Profile privacy: epsilon spent so far (basic composition; node)", registry=r)
        self.privacy_budget = Gauge("knexa_privacy_epsilon_budget",
                                    "Profile privacy: total epsilon budget (+Inf = no limit; node)", registry=r)
        self.privacy_epsilon = Gauge("knexa_privacy_epsilon_per_round",
                                     "Profile privacy: epsilon of one noised profile (0 = noise off; node)",
                                     registry=r)
        self.privacy_releases = Gauge("knexa_privacy_releases",
                                      "Profiles sent, by kind: fresh (noised, charged) or frozen (re-sent, free)",
                                      ["kind"], registry=r)
        self.privacy_exhausted = Gauge("knexa_privacy_budget_exhausted",
                                       "1 once the budget is spent and the profile's dynamic features are frozen",
                                       registry=r)
        self.connections = Gauge("knexa_connections", "libp2p connections open now, by kind "
                                 "(direct, relayed, hole_punched)", ["kind"], registry=r)
        self.connections_opened = Counter("knexa_connections_opened_total", "libp2p connections opened, by kind",
                                          ["kind"], registry=r)
        self.packages_by_path = Counter("knexa_packages_by_path_total", "Knowledge packages sent or received, "
                                        "by the kind of connection that carried them", ["direction", "kind"],
                                        registry=r)
        self.relay_bytes = Counter("knexa_relay_bytes_total", "Bytes this daemon's relay forwarded between "
                                   "members (Noise ciphertext; CPM or relay_service node)", registry=r)
        self.relay_reservations = Gauge("knexa_relay_reservations", "Relay reservations: held by others at this "
                                        "daemon (relay) or held by this node at relays", registry=r)
        self.reachable = Gauge("knexa_reachable", "1 public, 0 private (dial-back from a fresh connection failed), "
                               "-1 unknown (node)", registry=r)
        self._seen: dict[str, float] = {}
        self.up = Gauge("knexa_up", "1 while the daemon runs", ["daemon"], registry=r)
        self.up.labels(role).set(1)
        self._server: Any = None

    def observe_privacy(self, summary: dict[str, Any]) -> None:
        """Export a node's privacy accountant (`PrivacyAccountant.summary()`); a profile ever sent
        with noise off shows the spent epsilon as +Inf, which is what an un-noised release costs."""
        spent = summary.get("epsilon_spent")
        budget = summary.get("epsilon_budget")
        self.privacy_spent.set(float("inf") if spent is None else float(spent))
        self.privacy_budget.set(float("inf") if budget is None else float(budget))
        self.privacy_epsilon.set(float(summary.get("epsilon_per_round", 0.0)))
        self.privacy_releases.labels("fresh").set(int(summary.get("releases", 0)))
        self.privacy_releases.labels("frozen").set(int(summary.get("frozen_releases", 0)))
        self.privacy_exhausted.set(1 if summary.get("exhausted") else 0)

    def observe_connections(self, kinds: dict[str, Any], relay: dict[str, Any] | None = None,
                            reservations: int | None = None, reachability: str | None = None) -> None:
        """Export `P2PHost.connection_kinds()` and, for a relay, its summary (counters advance by
        the difference to the last call: the host keeps the totals)."""
        for kind, n in kinds.get("open", {}).items():
            self.connections.labels(kind).set(n)
        for kind, n in kinds.get("opened", {}).items():
            self._advance(self.connections_opened.labels(kind), f"opened_{kind}", n)
        if relay is not None:
            self._advance(self.relay_bytes, "relay_bytes", relay.get("bytes_relayed", 0))
            self.relay_reservations.set(relay.get("active_reservations", 0))
        elif reservations is not None:
            self.relay_reservations.set(reservations)
        if reachability is not None:
            self.reachable.set({"public": 1, "private": 0}.get(reachability, -1))

    def _advance(self, counter: Any, key: str, total: float) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = total

    def serve(self, address: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        bound = int(server.server_address[1])
        logger.info("metrics endpoint http://%s:%d/metrics", address, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

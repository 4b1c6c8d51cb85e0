"""CPM configuration: `[cpm]` table of a TOML file, overridable from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpmConfig", "CpmSection"]


@dataclass(frozen=True, slots=True)
class CpmSection:
    federation: str = "knexa"
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    state_dir: Path = Path(".knexa/cpm")
    #: base58 peer ids allowed to take part; empty = accept any peer (logged as a warning)
    roster: tuple[str, ...] = ()
    #: a roster file ([[peer]] id/name/addr, see knexa_runtime.roster), merged with `roster`;
    #: re-read on SIGHUP so members can join a running federation
    roster_file: Path | None = None
    #: expected federation size (sizes the GossipSub mesh and the quorum when roster is empty)
    expected_nodes: int = 4
    #: a round closes when this fraction of the roster has sent a profile ...
    quorum: float = 1.0
    #: ... or this many seconds after the first profile of the round, if >= min_participants
    round_timeout_s: float = 120.0
    min_participants: int = 2
    #: LinUCB and friends (knexa_cpm.policies)
    policy: str = "linucb"
    context: str = "interaction"
    lam: float = 0.01
    beta0: float = 1.0
    #: trust scores: a teacher whose packages keep yielding negative rewards loses
    #: trust_weight * badness from its scores (badness: EMA with rate trust_rate); 0 = off
    trust_weight: float = 0.0
    trust_rate: float = 0.2
    #: hybrid only (knexa_cpm.hybrid): prior mean of the skill-gap coefficient, in reward per
    #: teachable category (0 = none), and the reward noise assumed until ten rewards are in
    skill_prior: float = 0.0
    reward_scale: float = 1.0
    #: hybrid only: scale of its Thompson draw (1 = the posterior itself, 0 = greedy on the mean)
    explore: float = 0.3
    #: hybrid only: estimate from the rewards how far teachers differ beyond what the profiles
    #: explain (empirical Bayes), instead of assuming a fixed spread
    adaptive_effects: bool = False
    seed: int = 42
    log_level: str = "INFO"
    #: "text" (key=value) or "json" (one JSON object per line)
    log_format: str = "text"
    #: Prometheus endpoint "HOST:PORT" ("" = off; port 0 = any free port, logged)
    metrics_listen: str = ""
    #: circuit relay v2 for members behind NATs (members only; docs/operations.md): on/off, how
    #: long a reservation lasts, and per circuit (one relayed connection) its lifetime and bytes;
    #: reservations in all, and circuits at once to one reserved member
    relay: bool = True
    relay_reservation_ttl_s: int = 900
    relay_circuit_duration_s: int = 600
    relay_circuit_bytes: int = 64 * 1024 * 1024
    relay_max_reservations: int = 512
    relay_max_circuits_per_peer: int = 8

    def __post_init__(self) -> None:
        from knexa_runtime.daemon import check_common

        check_common(self.log_format, self.metrics_listen, self.log_level)
        if min(self.relay_reservation_ttl_s, self.relay_circuit_duration_s, self.relay_circuit_bytes,
               self.relay_max_reservations, self.relay_max_circuits_per_peer) <= 0:
            raise ValueError("relay limits must be > 0")
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError("quorum must be in (0, 1]")
        if self.min_participants < 2:
            raise ValueError("min_participants must be >= 2 (a pair needs two peers)")
        if self.round_timeout_s <= 0:
            raise ValueError("round_timeout_s must be > 0")
        if not (self.skill_prior >= 0 and self.reward_scale > 0 and self.explore >= 0):
            raise ValueError("skill_prior and explore must be >= 0 and reward_scale > 0")
        if not self.trust_weight >= 0 or not 0 < self.trust_rate <= 1:
            raise ValueError("trust_weight must be >= 0 and trust_rate in (0, 1]")


@dataclass(frozen=True, slots=True)
class CpmConfig:
    cpm: CpmSection = field(default_factory=CpmSection)

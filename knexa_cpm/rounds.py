"""The CPM's round state machine: pure, synchronous, deterministic (time and ids are arguments).

It decides; the service acts. `submit_profile` / `submit_reward` return a `Reply`; `maybe_close`
returns the `MatchDirective` to sign and publish, or None. Everything it holds round-trips through
`to_state`/`from_state` so the service can persist it after every change.

Round semantics: round r is open for profiles until a quorum of the roster (or, after a timeout,
at least `min_participants`) reported; then it closes, pairs are chosen among the reporters, and
round r+1 opens at once. A profile for an older round is answered `stale_round` with the open
round so the node catches up; rewards are accepted for any directive still in the window, once,
and only from that directive's student.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol import (
    PROFILE_DIM,
    Match,
    MatchDirective,
    Profile,
    Reply,
    ReplyCode,
    RewardReport,
    peer_id_str,
)

from .policies import profile_row

__all__ = ["RoundMachine", "RoundSettings", "Selector"]

#: chooses ordered (teacher_idx, student_idx) pairs from an (N, ROW_DIM) matrix of profile rows
#: (`policies.profile_row`: the 32 wire dims, then the node's skills or UNKNOWN_SKILL)
Selector = Callable[[np.ndarray, int], list[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class RoundSettings:
    federation: str
    cpm: bytes
    roster: frozenset[bytes]  # empty = open federation
    expected_nodes: int
    quorum: float
    round_timeout_s: float
    min_participants: int
    reward_window: int = 8  # rounds a directive stays open for its reward

    @property
    def quorum_count(self) -> int:
        base = len(self.roster) if self.roster else self.expected_nodes
        return max(self.min_participants, math.ceil(self.quorum * base))


@dataclass
class _Pending:
    round: int
    teacher: bytes
    student: bytes
    teacher_profile: list[float]
    student_profile: list[float]


@dataclass
class RoundMachine:
    settings: RoundSettings
    round: int = 0
    opened_at: float | None = None  # time of the first profile of the open round
    profiles: dict[bytes, list[float]] = field(default_factory=dict)
    directives: dict[int, MatchDirective] = field(default_factory=dict)
    pending: dict[bytes, _Pending] = field(default_factory=dict)
    rewarded: dict[bytes, float] = field(default_factory=dict)
    last_seen: dict[bytes, int] = field(default_factory=dict)

    # ---- inputs -------------------------------------------------------------------------
    def submit_profile(self, sender: bytes, profile: Profile, now: float) -> Reply:
        if not self._allowed(sender):
            return Reply(False, ReplyCode.UNAUTHORIZED, "peer not on the federation roster", self.round)
        if profile.federation != self.settings.federation:
            return Reply(False, ReplyCode.UNAUTHORIZED, "wrong federation", self.round)
        if profile.round < self.round:
            done = self.directives.get(profile.round)
            if done is not None and sender in done.participants:
                # a retry whose first reply was lost: the round closed with this node in it, so
                # say OK for *that* round and let the node fetch its directive (idempotent)
                return Reply(True, ReplyCode.OK, "already counted; round closed", profile.round)
        if profile.round != self.round:
            return Reply(False, ReplyCode.STALE_ROUND, f"round {self.round} is open", self.round)
        if not self.profiles:
            self.opened_at = now
        self.profiles[sender] = profile_row(profile.vector, profile.skills)
        self.last_seen[sender] = self.round
        return Reply(True, ReplyCode.OK, "", self.round)

    def submit_reward(self, sender: bytes, report: RewardReport) -> tuple[Reply, _Pending | None]:
        """Accept a student's reward once; returns the pending entry for the bandit update."""
        if report.federation != self.settings.federation:
            return Reply(False, ReplyCode.UNAUTHORIZED, "wrong federation", self.round), None
        did = report.directive_id
        if did in self.rewarded:
            return Reply(False, ReplyCode.REPLAY, "reward already reported", self.round), None
        entry = self.pending.get(did)
        if entry is None or entry.round != report.round:
            return Reply(False, ReplyCode.REPLAY, "no such open directive", self.round), None
        if sender != entry.student or report.student != entry.student or report.teacher != entry.teacher:
            return Reply(False, ReplyCode.UNAUTHORIZED, "only the directive's student reports", self.round), None
        del self.pending[did]
        self.rewarded[did] = report.reward
        return Reply(True, ReplyCode.OK, "", self.round), entry

    def directive_for(self, round_: int) -> MatchDirective | None:
        return self.directives.get(round_)

    # ---- round closing ------------------------------------------------------------------
    def ready_to_close(self, now: float) -> bool:
        n = len(self.profiles)
        if n >= self.settings.quorum_count:
            return True
        timed_out = self.opened_at is not None and now - self.opened_at >= self.settings.round_timeout_s
        return timed_out and n >= self.settings.min_participants

    def close_round(self, now: float, select: Selector, new_id: Callable[[], bytes]) -> MatchDirective:
        """Match the reporters of the open round, record the directive, open the next round."""
        peers: Sequence[bytes] = sorted(self.profiles)
        matrix = np.asarray([self.profiles[p] for p in peers], dtype=np.float64)
        pairs = select(matrix, self.round) if len(peers) >= 2 else []
        matches = []
        for t, s in pairs:
            did = new_id()
            matches.append(Match(directive_id=did, teacher=peers[t], student=peers[s]))
            self.pending[did] = _Pending(self.round, peers[t], peers[s],
                                         self.profiles[peers[t]], self.profiles[peers[s]])
        directive = MatchDirective(
            federation=self.settings.federation, round=self.round, cpm=self.settings.cpm,
            issued_at=now, pairs=tuple(matches), participants=tuple(peers),
        )
        self.directives[self.round] = directive
        self.round += 1
        self.profiles = {}
        self.opened_at = None
        self._prune()
        return directive

    def _prune(self) -> None:
        horizon = self.round - self.settings.reward_window
        self.directives = {r: d for r, d in self.directives.items() if r >= horizon}
        expired = [d for d, p in self.pending.items() if p.round < horizon]
        for d in expired:
            del self.pending[d]
        live = {m.directive_id for d in self.directives.values() for m in d.pairs}
        self.rewarded = {d: r for d, r in self.rewarded.items() if d in live}

    def _allowed(self, peer: bytes) -> bool:
        return not self.settings.roster or peer in self.settings.roster

    def describe(self) -> str:
        return (f"round={self.round} profiles={len(self.profiles)}/{self.settings.quorum_count} "
                f"pending_rewards={len(self.pending)}")

    # ---- persistence (plain data for msgpack) --------------------------------------------
    def to_state(self) -> dict:
        from protocol import encode

        return {
            "round": self.round,
            "opened_at": self.opened_at,
            "profiles": {p: v for p, v in self.profiles.items()},
            "directives": {str(r): encode(d) for r, d in self.directives.items()},
            "pending": {d: [p.round, p.teacher, p.student, p.teacher_profile, p.student_profile]
                        for d, p in self.pending.items()},
            "rewarded": dict(self.rewarded),
            "last_seen": dict(self.last_seen),
        }

    @classmethod
    def from_state(cls, settings: RoundSettings, state: dict) -> RoundMachine:
        from protocol import decode

        m = cls(settings)
        m.round = int(state["round"])
        m.opened_at = state["opened_at"]
        m.profiles = {bytes(p): _row(v) for p, v in state["profiles"].items()}
        m.directives = {int(r): decode(d, MatchDirective) for r, d in state["directives"].items()}
        m.pending = {bytes(d): _Pending(int(v[0]), bytes(v[1]), bytes(v[2]), _row(v[3]), _row(v[4]))
                     for d, v in state["pending"].items()}
        m.rewarded = {bytes(d): float(r) for d, r in state["rewarded"].items()}
        m.last_seen = {bytes(p): int(r) for p, r in state["last_seen"].items()}
        return m


def _row(saved: list[float]) -> list[float]:
    """A persisted row; one saved before rows carried skills (32 values) gets UNKNOWN_SKILL."""
    return profile_row(saved) if len(saved) == PROFILE_DIM else [float(x) for x in saved]


def short(peer: bytes) -> str:
    """A log-friendly peer id: the last 8 chars of its base58 form."""
    return peer_id_str(peer)[-8:]

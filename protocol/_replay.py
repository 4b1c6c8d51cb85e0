"""Replay bookkeeping as plain data: which directives were issued, which were used.

Pure state with no clock of its own; both daemons keep one and persist it with their state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._errors import ReplayError, UnauthorizedError
from ._messages import Match, MatchDirective

__all__ = ["DirectiveBook"]


@dataclass
class DirectiveBook:
    """Directives known for recent rounds, and which of them were already consumed.

    `window` bounds memory: directives older than `latest_round - window` are forgotten and
    anything for those rounds is rejected as stale.
    """

    window: int = 8
    latest_round: int = -1
    matches: dict[bytes, tuple[int, Match]] = field(default_factory=dict)
    consumed: set[bytes] = field(default_factory=set)
    rounds_seen: set[int] = field(default_factory=set)

    def add_directive(self, directive: MatchDirective) -> bool:
        """Record a verified directive; False (not an error) when already known."""
        if directive.round in self.rounds_seen:
            return False
        if directive.round < self.latest_round - self.window:
            raise ReplayError(f"directive for stale round {directive.round}")
        self.rounds_seen.add(directive.round)
        self.latest_round = max(self.latest_round, directive.round)
        for m in directive.pairs:
            self.matches[m.directive_id] = (directive.round, m)
        self._prune()
        return True

    def lookup(self, directive_id: bytes, round_: int) -> Match:
        """The issued match for this id and round, or ReplayError."""
        entry = self.matches.get(directive_id)
        if entry is None:
            raise ReplayError("directive id was never issued (or is too old)")
        if entry[0] != round_:
            raise ReplayError(f"directive belongs to round {entry[0]}, not {round_}")
        return entry[1]

    def consume(self, directive_id: bytes, round_: int, *, teacher: bytes, student: bytes) -> Match:
        """Accept the one package/reward a directive allows; reject a second one."""
        match = self.lookup(directive_id, round_)
        if (match.teacher, match.student) != (teacher, student):
            raise UnauthorizedError("peer is not the teacher/student of this directive")
        if directive_id in self.consumed:
            raise ReplayError("directive already used")
        self.consumed.add(directive_id)
        return match

    def _prune(self) -> None:
        horizon = self.latest_round - self.window
        stale = [d for d, (r, _) in self.matches.items() if r < horizon]
        for d in stale:
            del self.matches[d]
            self.consumed.discard(d)
        self.rounds_seen = {r for r in self.rounds_seen if r >= horizon}

"""Replay bookkeeping as plain data: which directives were issued, which were used.

Pure state with no clock of its own; both daemons keep one and persist it with their state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def to_state(self) -> dict[str, Any]:
        """Plain JSON-able data (hex for bytes), so a daemon can save the book atomically with its
        state: without it a restart would make every consumed directive fresh again."""
        return {
            "window": self.window, "latest_round": self.latest_round,
            "rounds_seen": sorted(self.rounds_seen),
            "matches": [[d.hex(), r, m.teacher.hex(), m.student.hex()] for d, (r, m) in self.matches.items()],
            "consumed": sorted(d.hex() for d in self.consumed),
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DirectiveBook:
        """Rebuild a book from :meth:`to_state`; raises ValueError (or KeyError/TypeError) on bad data."""
        book = cls(window=int(state["window"]), latest_round=int(state["latest_round"]))
        book.rounds_seen = {int(r) for r in state["rounds_seen"]}
        for did, r, teacher, student in state["matches"]:
            raw = bytes.fromhex(did)
            book.matches[raw] = (int(r), Match(raw, bytes.fromhex(teacher), bytes.fromhex(student)))
        book.consumed = {bytes.fromhex(d) for d in state["consumed"]} & set(book.matches)
        return book

    def _prune(self) -> None:
        horizon = self.latest_round - self.window
        stale = [d for d, (r, _) in self.matches.items() if r < horizon]
        for d in stale:
            del self.matches[d]
            self.consumed.discard(d)
        self.rounds_seen = {r for r in self.rounds_seen if r >= horizon}

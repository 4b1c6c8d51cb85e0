"""A real `knexa-cpm serve` with trust scores on matches a poisoning teacher less and less.

Four signed client identities drive the daemon over libp2p for 16 rounds, as nodes would: each
round every client sends its profile (the poisoner copies the best honest teacher's), fetches the
directive, and every student reports its reward: -1 after a lesson from the poisoner, +0.5 after
anyone else's. The daemon only ever sees profiles and those scalars; the test reads back who
taught, with trust on and, as the control, off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import protocol as P
from knexa_p2p.host import P2PHost, open_host
from knexa_p2p.identity import Identity

from . import test_persistence
from .test_persistence import FEDERATION, Daemon, _directive, _request

daemons = test_persistence.daemons  # the fixture: every daemon is SIGKILLed and reaped afterwards

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 16
POISONER = 3


def _profile(i: int, round_: int) -> tuple[float, ...]:
    """Node 2 is the best honest teacher; the poisoner sends exactly node 2's profile, so no
    feature tells them apart: only trust, which follows peer ids, can."""
    i = 2 if i == POISONER else i
    v = np.zeros(P.PROFILE_DIM)
    v[P.FAMILY_SLICE.start + i] = 1.0
    v[P.PERF_SLICE] = 0.2 * (i + 1) + 0.01 * round_
    v[P.HIST_SLICE] = np.eye(12)[i * 3] * 0.5 + 0.5 / 12
    return tuple(float(x) for x in v)


def _play(ids: list[Identity]) -> Any:
    async def script(hosts: list[P2PHost], cpm: bytes) -> list[list[tuple[int, int]]]:
        index = {ident.peer_bytes: k for k, ident in enumerate(ids)}
        taught: list[list[tuple[int, int]]] = []
        for r in range(ROUNDS):
            for i, (h, ident) in enumerate(zip(hosts, ids, strict=True)):
                reply = await _request(h, cpm, P.Profile(FEDERATION, r, ident.peer_bytes, _profile(i, r)), ident)
                assert reply.ok and reply.round == r, reply
            directive = await _directive(hosts[0], cpm, r, ids[0])
            pairs = []
            for m in directive.pairs:
                t, s = index[m.teacher], index[m.student]
                pairs.append((t, s))
                reward = -1.0 if t == POISONER else 0.5
                report = P.RewardReport(FEDERATION, r, m.directive_id, m.teacher, m.student, reward, 1000)
                reply = await _request(hosts[s], cpm, report, ids[s])
                assert reply.ok, reply
            taught.append(pairs)
        return taught
    return script


async def _session(maddr: str, ids: list[Identity], script: Any) -> Any:
    async with open_host(ids[0]) as h0, open_host(ids[1]) as h1, open_host(ids[2]) as h2, \
            open_host(ids[3]) as h3:
        hosts = [h0, h1, h2, h3]
        cpm = await h0.connect(maddr)
        for h in hosts[1:]:
            assert await h.connect(maddr) == cpm
        return await script(hosts, cpm)


def _run(tmp_path: Path, daemons: list[Daemon], policy: str, trust: float) -> list[int]:
    """How often the poisoner taught, round by round."""
    ids = [Identity.from_seed(bytes([i + 11]) * 32) for i in range(4)]
    cpm = Daemon(tmp_path / f"cpm-{policy}-{trust}", ["--set", "cpm.expected_nodes=4", "--set",
                                                       f"cpm.trust_weight={trust}", "--set", f"cpm.policy={policy}"])
    daemons.append(cpm)
    taught = trio.run(_session, cpm.wait_listening(), ids, _play(ids))
    assert all(len(pairs) == 2 for pairs in taught)
    return [sum(t == POISONER for t, _ in pairs) for pairs in taught]


@pytest.mark.parametrize("policy", ["linucb", "hybrid"])
def test_a_poisoning_teacher_is_matched_less_and_less(tmp_path: Path, daemons: list[Daemon], policy: str) -> None:
    as_teacher = _run(tmp_path, daemons, policy, trust=10.0)
    first, last = sum(as_teacher[:ROUNDS // 2]), sum(as_teacher[ROUNDS // 2:])
    assert first >= 1, f"the poisoner never taught early on: {as_teacher}"
    assert last == 0 < first, as_teacher


def test_without_trust_linucb_keeps_matching_the_look_alike_poisoner(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The control: the same federation with trust off. LinUCB sees the poisoner and the teacher
    it imitates as one context, so it keeps pairing the poisoner as a teacher."""
    as_teacher = _run(tmp_path, daemons, "linucb", trust=0.0)
    assert sum(as_teacher[ROUNDS // 2:]) >= 1, as_teacher

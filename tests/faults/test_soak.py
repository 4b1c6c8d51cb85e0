"""Soak: 6 tiny-model nodes under seeded random kill -9 / restart churn, and one CPM crash.

The issue asks for 30 rounds, the default; KNEXA_SOAK_ROUNDS sets another length (30 rounds
took about 5 min on a shared 2-core box: a minute of start-up, the rest mostly the round
timeouts of rounds that closed without a crashed node):

    KNEXA_SOAK_ROUNDS=12 OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/faults/test_soak.py

"Round" means a round the CPM closed: nodes run until stopped (rounds = 0) and the test stops
them all with SIGTERM once the CPM has closed that many, so a node that lost rounds to a crash
does not have to make them up alone at the end.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass

import pytest

from tests.faults.harness import (
    TINY_MODELS,
    Daemon,
    DaemonDied,
    LoopbackFederation,
    check_rewards_once,
    processes_mentioning,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

SOAK_ROUNDS_DEFAULT = 30
NODES = 6
SEED = 20261123
#: chance that a newly closed round triggers a node crash, and how many may be down at once
KILL_P = 0.35
MAX_DOWN = 2
#: no crash in the last rounds, so the last crashed node is back before the end
QUIET_ROUNDS = 3
#: late RSS over early RSS, per process
RSS_GROWTH_MAX = 1.5


def _soak_rounds() -> int:
    return int(os.environ.get("KNEXA_SOAK_ROUNDS", SOAK_ROUNDS_DEFAULT))


@dataclass
class _Crash:
    node: int
    restart_at: float
    #: what the node had on disk and in its round log when it died
    persisted_round: int
    logged: int


def _rss_growth(d: Daemon) -> list[tuple[int, float, float]]:
    """(pid, early MiB, late MiB) for each run of `d` long enough to judge: the median of its
    first fifth of samples (taken once it listened) against the median of its last fifth."""
    out = []
    for pid in dict.fromkeys(p for _, p, _ in d.rss):
        kib = [k for _, p, k in d.rss if p == pid]
        if len(kib) < 30:
            continue
        fifth = len(kib) // 5
        out.append((pid, statistics.median(kib[:fifth]) / 1024, statistics.median(kib[-fifth:]) / 1024))
    return out


@pytest.mark.timeout(3600)
def test_soak_with_random_crashes(model_cache, reap):
    rounds = _soak_rounds()
    assert rounds >= QUIET_ROUNDS + 2, f"KNEXA_SOAK_ROUNDS must be at least {QUIET_ROUNDS + 2}"
    rng = random.Random(SEED)
    last_kill_round = rounds - QUIET_ROUNDS
    cpm_crash_round = min(rounds // 2, last_kill_round)
    models = [TINY_MODELS[i % len(TINY_MODELS)] for i in range(NODES)]
    fed = LoopbackFederation(
        reap, models, model_cache, rounds=0, seed=11,
        learning={"total_rounds": rounds},
        # a round closes without crashed nodes after round_timeout_s; nodes outlast a CPM crash
        # and restart (with margin for a loaded machine) before they give up on a directive
        cpm={"round_timeout_s": 12.0}, node={"package_timeout_s": 12.0, "directive_timeout_s": 150.0},
    )
    crashes: dict[int, _Crash] = {}  # node index -> its latest crash
    kills: list[tuple[int, str]] = []
    pending: list[_Crash] = []  # crashed, not restarted yet
    t0 = time.monotonic()

    def tick() -> int:
        """Sample memory, restart nodes whose downtime is over, fail on an unplanned exit;
        return the number of rounds the CPM closed."""
        fed.sample_rss()
        now = time.monotonic()
        for c in [c for c in pending if c.restart_at <= now]:
            pending.remove(c)
            fed.nodes[c.node].start()  # no waiting: it loads its model while the rest go on
        for i, n in enumerate(fed.nodes):
            if not n.running and not any(c.node == i for c in pending):
                raise DaemonDied(f"{n.name} exited with {n.returncode}:\n{n.tail()}")
        if not fed.cpm.running:
            raise DaemonDied(f"the CPM exited with {fed.cpm.returncode}:\n{fed.cpm.tail()}")
        state = fed.cpm_state()  # None until the first profile arrives
        return state["stats"]["rounds_closed"] if state else 0

    try:
        fed.start()
        seen = 0
        while (closed := tick()) < rounds:
            if closed > seen and closed <= last_kill_round:
                seen = closed
                time.sleep(rng.uniform(0.0, 3.0))  # land in a different phase each time
                if closed >= cpm_crash_round and not any(k == "cpm" for _, k in kills):
                    fed.cpm.kill9()
                    kills.append((closed, "cpm"))
                    time.sleep(2.0)
                    fed.restart(fed.cpm)
                elif len(pending) < MAX_DOWN and rng.random() < KILL_P:
                    up = [i for i, n in enumerate(fed.nodes) if n.listening]
                    victim = rng.choice(up)
                    fed.nodes[victim].kill9()
                    kills.append((closed, fed.nodes[victim].name))
                    crash = _Crash(victim, time.monotonic() + rng.uniform(1.0, 10.0),
                                   fed.node_state(victim).get("round", 0), len(fed.rounds_log(victim)))
                    crashes[victim] = crash
                    pending.append(crash)
            time.sleep(0.5)
        wall_rounds = time.monotonic() - t0

        # every crashed node must come back and finish a round before the federation stops
        def all_back() -> bool:
            tick()
            return not pending and all(len(fed.rounds_log(c.node)) > c.logged for c in crashes.values())

        wait_until(all_back, 300, "every crashed node to log a round after its restart", every=0.5)
        wall = time.monotonic() - t0
    finally:
        codes = fed.stop_all()
    left = processes_mentioning(str(reap))

    print(f"\nsoak: {rounds} rounds in {wall_rounds:.0f}s ({wall:.0f}s with the crashed nodes' comeback), "
          f"crashes (round, daemon): {kills}")
    for d in fed.daemons:
        for pid, early, late in _rss_growth(d):
            print(f"  {d.name} pid {pid}: RSS {early:.0f} -> {late:.0f} MiB")

    assert not left, f"processes outlived the federation: {left}"
    assert all(c == 0 for c in codes.values()), {d.name: (codes[d.name], d.tail(5)) for d in fed.daemons}
    assert any(k == "cpm" for _, k in kills) and crashes, kills

    # no lost or double-counted reward, across every crash
    rows, _ = check_rewards_once(fed, crashed=sorted(crashes))
    assert fed.cpm_state()["stats"]["rounds_closed"] >= rounds
    late_rounds = {r for r, *_ in rows if r >= rounds - rounds // 3}
    assert late_rounds, f"no reward in the last third of the run: {sorted({r for r, *_ in rows})}"
    # a crashed node resumed from its persisted round counter, never from an earlier round,
    # and no node ran a round number twice
    for c in crashes.values():
        after = fed.rounds_log(c.node)[c.logged:]
        assert after and after[0]["round"] >= c.persisted_round, (fed.nodes[c.node].name, c, after[:1])
    for i, n in enumerate(fed.nodes):
        got = [e["round"] for e in fed.rounds_log(i)]
        assert all(a < b for a, b in zip(got, got[1:], strict=False)), (n.name, got)

    # memory stays flat per daemon process. A daemon that was never killed ran the whole soak and
    # must be judged; a killed one may have had only short runs (killed soon after it listened,
    # or restarted late), too short to show a leak, and is judged where a run was long enough.
    killed = {name for _, name in kills}
    unjudged = []
    for d in fed.daemons:
        growth = _rss_growth(d)
        if not growth:
            unjudged.append(d.name)
        for pid, early, late in growth:
            assert late <= RSS_GROWTH_MAX * early, f"{d.name} pid {pid}: RSS {early:.0f} -> {late:.0f} MiB"
    assert len(unjudged) < len(fed.daemons), "no daemon ran long enough to judge its memory"
    assert not set(unjudged) - killed, f"too few RSS samples for daemons that ran throughout: {unjudged}"

"""kill -9 a teacher between its directive and its package: the round goes on without it."""

from __future__ import annotations

import time

import pytest

from protocol import peer_id_str
from tests.faults.harness import TINY_MODELS, LoopbackFederation, check_rewards_once, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ROUNDS = 3
KILL_ROUND = 1


def hold_round(fed: LoopbackFederation, round_: int, timeout: float) -> list[int]:
    """Have the CPM pair `round_` while every node but the last is frozen waiting for it.

    The last node is SIGSTOPped during its local epoch of `round_`, each other
    node as soon as the CPM has its profile (the round cannot close without the last one),
    then the last node is let go and its profile closes the round. So the frozen nodes are
    sure to be waiting for the directive, none teaching yet, when the pairs are decided.
    Returns the frozen node indices.
    """
    last = len(fed.nodes) - 1

    def last_before_profile() -> bool:
        st = fed.nodes[last].status()
        return bool(st and st["round"] == round_ and st["phase"] == "train")

    wait_until(last_before_profile, timeout, f"{fed.nodes[last].name} working on round {round_}", every=0.02,
               alive=fed.daemons)
    fed.nodes[last].pause()
    frozen: list[int] = []

    def others_reported() -> bool:
        state = fed.cpm_state()
        if state and state["machine"]["round"] == round_:
            for p in state["machine"]["profiles"]:
                if (i := fed.index_of(bytes(p))) not in frozen and i != last:
                    fed.nodes[i].pause()
                    frozen.append(i)
        return len(frozen) == last

    try:
        wait_until(others_reported, 60, f"the other profiles of round {round_}", every=0.02, alive=[fed.cpm])
    finally:
        fed.nodes[last].resume()
    return frozen


@pytest.mark.timeout(420)
def test_teacher_killed_mid_transfer(model_cache, reap):
    fed = LoopbackFederation(
        reap, TINY_MODELS, model_cache, rounds=ROUNDS,
        # a dead teacher costs its student package_timeout_s, the next round round_timeout_s
        node={"package_timeout_s": 8.0}, cpm={"round_timeout_s": 10.0},
        # the last node trains longer: hold_round has time to catch it before its profile
        node_learning={3: {"local_epochs": 3}},
    )
    last = len(fed.nodes) - 1
    try:
        fed.start()
        frozen = hold_round(fed, KILL_ROUND, timeout=180)
        try:
            directive = wait_until(lambda: fed.directive(KILL_ROUND), 60, f"directive of round {KILL_ROUND}",
                                   every=0.05, alive=[fed.cpm])
            assert len(directive.pairs) == 2, directive
            # the pair without the last node: both ends are frozen, so nothing has moved yet
            victim_pair = next(m for m in directive.pairs if last not in map(fed.index_of, (m.teacher, m.student)))
            victim, student = fed.index_of(victim_pair.teacher), fed.index_of(victim_pair.student)
            other = next(m for m in directive.pairs if m is not victim_pair)
            # let everyone go but the victim's student: the victim generates its answers, opens
            # the KD stream and hangs in it, waiting for the frozen student's side
            for i in frozen:
                if i != student:
                    fed.nodes[i].resume()
            wait_until(lambda: (fed.nodes[victim].status() or {}).get("phase") == "teach_send", 60,
                       f"{fed.nodes[victim].name} sending its package", every=0.05, alive=[fed.nodes[victim]])
            fed.nodes[victim].kill9()
        finally:
            for i in frozen:
                fed.nodes[i].resume()
        survivors = [d for i, d in enumerate(fed.nodes) if i != victim]
        t_kill = time.monotonic()
        fed.wait_finished(240, nodes=survivors)
        recovered_s = time.monotonic() - t_kill
    finally:
        codes = fed.stop_all()

    assert fed.nodes[victim].find(f"teacher round={KILL_ROUND} student="), "it died before its transfer began"
    assert all(codes[d.name] == 0 for d in survivors), {d.name: (codes[d.name], d.tail()) for d in survivors}
    dead_id, student_id = fed.peer_ids[victim], fed.peer_ids[student]

    # the student waited package_timeout_s, then logged the round without a reward
    [entry] = [e for e in fed.rounds_log(student) if e["round"] == KILL_ROUND]
    assert entry["role"] == "student" and entry["partner"] == dead_id
    assert entry["error"] == "package timeout" and "reward" not in entry, entry
    assert not (fed.node_dirs[student] / "received" / f"round-{KILL_ROUND:04d}.json").exists()

    # ... and the CPM holds no reward for that pair, but does for the other pair of the round
    rows, _ = check_rewards_once(fed)
    keys = {(r, t, s) for r, t, s, _ in rows}
    assert (KILL_ROUND, dead_id, student_id) not in keys
    other_key = (KILL_ROUND, peer_id_str(other.teacher), peer_id_str(other.student))
    assert other_key in keys, f"the surviving pair's reward is missing: {other_key} not in {sorted(keys)}"
    [other_entry] = [e for e in fed.rounds_log(fed.index_of(other.student)) if e["round"] == KILL_ROUND]
    assert other_entry["reward_ack"] == "ok"

    # the next rounds closed on the CPM's round timeout with the survivors only, and each
    # survivor logged every round exactly once
    for r in range(KILL_ROUND + 1, ROUNDS):
        later = fed.directive(r)
        assert later is not None and set(map(peer_id_str, later.participants)) == {
            fed.peer_ids[i] for i in range(len(fed.nodes)) if i != victim}
    for i in range(len(fed.nodes)):
        if i != victim:
            assert [e["round"] for e in fed.rounds_log(i)] == list(range(ROUNDS)), fed.rounds_log(i)
    assert fed.cpm_state()["stats"]["rounds_closed"] == ROUNDS
    print(f"survivors finished {recovered_s:.1f}s after the kill")

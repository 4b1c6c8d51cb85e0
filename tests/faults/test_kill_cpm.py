"""kill -9 the CPM mid-round and restart it on the same port and state: nothing is lost."""

from __future__ import annotations

import time

import pytest

from protocol import peer_id_str
from tests.faults.harness import TINY_MODELS, LoopbackFederation, check_rewards_once, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ROUNDS = 4
KILL_ROUND = 1
DOWN_S = 3.0


@pytest.mark.timeout(420)
def test_cpm_killed_mid_round_and_restarted(model_cache, reap):
    fed = LoopbackFederation(reap, TINY_MODELS[:3], model_cache, rounds=ROUNDS,
                             # every node stays up: rounds close on quorum, never on the timeout
                             cpm={"round_timeout_s": 120.0}, node={"directive_timeout_s": 120.0})
    try:
        fed.start()
        # the moment the directive is on disk no student can have reported its reward yet
        # (it still has to receive the package and distil): the kill leaves rewards pending
        wait_until(lambda: fed.directive(KILL_ROUND), 180, f"directive of round {KILL_ROUND}", every=0.02,
                   alive=fed.daemons)
        fed.cpm.kill9()
        at_kill = fed.cpm_state()
        time.sleep(DOWN_S)
        fed.restart(fed.cpm)
        resumed = fed.cpm.wait_for("resumed state", 10)
        fed.wait_finished(300)
    finally:
        codes = fed.stop_all()

    assert all(codes[n.name] == 0 for n in fed.nodes), {n.name: (codes[n.name], n.tail()) for n in fed.nodes}
    assert f"round={KILL_ROUND + 1}" in resumed, resumed
    pending = {(int(v[0]), peer_id_str(bytes(v[1])), peer_id_str(bytes(v[2])))
               for v in at_kill["machine"]["pending"].values()}
    assert any(r == KILL_ROUND for r, _, _ in pending), "the kill should leave this round's rewards pending"

    rows, rewarded = check_rewards_once(fed)
    keys = {(r, t, s) for r, t, s, _ in rows}
    # every reward pending at the kill that its student computed reached the restarted CPM
    late = [e for e in rewarded if (e["round"], e["partner"], e["node"]) in pending]
    assert late, "no student reported a pending reward after the restart"
    for e in late:
        assert (e["round"], e["partner"], e["node"]) in keys
        assert e["reward_ack"] in ("ok", "replay"), e
    # rounds went on: every node logged every round once, and rewards kept flowing afterwards
    for i in range(len(fed.nodes)):
        assert [e["round"] for e in fed.rounds_log(i)] == list(range(ROUNDS)), fed.rounds_log(i)
    assert any(r > KILL_ROUND for r, _, _ in keys), sorted(keys)
    for r in range(KILL_ROUND + 1, ROUNDS):  # every node reconnected and took part again
        assert set(map(peer_id_str, fed.directive(r).participants)) == set(fed.peer_ids)
    state = fed.cpm_state()
    assert state["stats"]["rounds_closed"] == ROUNDS and state["machine"]["round"] == ROUNDS
    assert fed.cpm.starts == 2

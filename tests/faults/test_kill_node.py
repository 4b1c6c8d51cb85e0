"""kill -9 a node in the middle of its local epoch, restart it: it resumes from its checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.faults.harness import TINY_MODELS, LoopbackFederation, check_rewards_once, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ROUNDS = 4
VICTIM = 0


def _in_round_training(fed: LoopbackFederation, i: int, min_round: int) -> dict | None:
    status = fed.nodes[i].status()
    ok = status and status["phase"] == "train" and status["round"] >= min_round
    return status if ok else None


@pytest.mark.timeout(420)
def test_node_killed_mid_epoch_resumes_from_checkpoint(model_cache, reap):
    fed = LoopbackFederation(
        reap, TINY_MODELS[:3], model_cache, rounds=ROUNDS,
        # the others wait for the victim's profile: its restart (imports, model) must fit
        cpm={"round_timeout_s": 180.0}, node={"directive_timeout_s": 240.0},
    )
    victim = fed.nodes[VICTIM]
    try:
        fed.start()
        status = wait_until(lambda: _in_round_training(fed, VICTIM, 1), 240, "the victim's local epoch of round >= 1",
                            every=0.02, alive=fed.daemons)
        victim.kill9()
        # what the crash left on disk; the restarted node overwrites it at the end of its round
        persisted = fed.node_state(VICTIM)
        saved = fed.root / "checkpoint-at-kill"
        shutil.copytree(fed.node_dirs[VICTIM] / "checkpoint", saved)
        logged_before = fed.rounds_log(VICTIM)
        fed.restart(victim)
        resumed = victim.wait_for("resuming at round=", 120)
        loaded = victim.wait_for("checkpoint loaded from", 10)
        fed.wait_finished(300)
    finally:
        codes = fed.stop_all()

    assert all(c == 0 for c in codes.values()), {d.name: (codes[d.name], d.tail()) for d in fed.daemons}
    meta = json.loads((saved / "meta.json").read_text())
    killed_in = status["round"]
    # the round in flight was not recorded; the persisted counter points at it
    assert persisted["round"] == killed_in and [e["round"] for e in logged_before] == list(range(killed_in))
    assert f"resuming at round={killed_in} (checkpoint loaded)" in resumed, resumed
    step = int(re.search(r"\(step (\d+)\)", loaded).group(1))
    assert step == meta["step"], (loaded, meta["step"])
    # the round log goes on from there: no round repeated or skipped, and the run still ends
    # after `rounds` rounds in all
    assert [e["round"] for e in fed.rounds_log(VICTIM)] == list(range(ROUNDS)), fed.rounds_log(VICTIM)
    assert fed.node_state(VICTIM)["completed"] == ROUNDS
    for i in range(1, len(fed.nodes)):
        assert [e["round"] for e in fed.rounds_log(i)] == list(range(ROUNDS))
    check_rewards_once(fed, crashed=[VICTIM])

    # the adapter the restarted node loaded is the one the checkpoint's meta describes
    from knexa_node.config import NodeConfig
    from knexa_node.torch_backend import LearningConfig, TorchBackend
    from knexa_runtime.config import load_config

    cfg = load_config(NodeConfig, fed.node_dirs[VICTIM] / "node.toml", {})
    backend = TorchBackend.create(cfg.node.model, cfg.node.data_dir, LearningConfig.from_dict(dict(cfg.learning)),
                                  cache_dir=model_cache, public_dir=cfg.node.public_dir)
    fresh = backend.adapter_fingerprint()
    assert backend.load_checkpoint(saved)
    assert backend.adapter_fingerprint() == meta["adapter_fingerprint"] != fresh

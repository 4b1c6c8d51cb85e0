"""`knexa-lab run` output: live match lines, the phase-time table, and the demo's data caps."""

from __future__ import annotations

from pathlib import Path

from knexa_lab.launcher import _prepare, load_preset, match_line, phase_table

NAMES = {"peerA": "node-0", "peerB": "node-1"}


def test_match_line_says_who_taught_whom_with_the_reward() -> None:
    entry = {"round": 2, "node": "peerB", "partner": "peerA", "role": "student", "reward": 0.0123,
             "val_loss_pre": 1.5, "val_loss_post": 1.25, "seconds": 61.2}
    line = match_line(entry, NAMES)
    assert line is not None
    assert line.startswith("round 2: node-0 -> node-1") and "+0.0123" in line
    assert "val loss 1.5000 without the teacher -> 1.2500 with it" in line
    executed = match_line({**entry, "reward_measure": "val_error", "val_loss_without": 0.5, "val_loss_post": 0.25},
                          NAMES)
    assert executed is not None and "val error 0.5000 without the teacher -> 0.2500 with it" in executed
    assert match_line({**entry, "role": "teacher"}, NAMES) is None
    failed = match_line({"round": 0, "node": "peerB", "partner": "peerA", "role": "student",
                         "error": "package timeout"}, NAMES)
    assert failed == "round 0: node-0 -> node-1 failed (package timeout)"


def test_phase_table_averages_each_phase_per_node_in_round_order() -> None:
    rounds = [{"name": "node-0", "phase_seconds": {"checkpoint": 1.0, "train": 10.0}},
              {"name": "node-0", "phase_seconds": {"train": 20.0, "learn_distill": 4.0}},
              {"name": "node-1", "phase_seconds": {"train": 3.0}},
              {"name": "node-2"}]  # an older log line without timings
    rows = phase_table(rounds).splitlines()
    assert rows[0].split() == ["phase", "node-0", "node-1"]
    body = {r.split()[0]: r.split()[1:] for r in rows[2:]}
    assert list(body) == ["train", "learn_distill", "checkpoint"]
    assert body["train"] == ["15.0", "3.0"] and body["learn_distill"] == ["2.0", "0.0"]
    assert phase_table([{"name": "node-0"}]) == ""


def test_demo_preset_caps_each_shard(tmp_path: Path) -> None:
    preset = load_preset("embedded")
    run = preset["run"]
    preset = {**preset, "run": {**run, "models": ["tiny-gpt2"] * 4}}  # no model build needed below
    data = _prepare(tmp_path, ["tiny-gpt2"] * 4, preset, tmp_path / "cache", lambda _msg: None)
    for i in range(4):
        train = (data / f"node-{i}" / "train.jsonl").read_text().splitlines()
        val = (data / f"node-{i}" / "val.jsonl").read_text().splitlines()
        assert 1 <= len(train) <= run["train_cap"] and 1 <= len(val) <= run["val_cap"]

"""`--mode daemons`: node round logs become the simulation's metrics rows; one real federation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from knexa_lab.experiment.daemons import rows_from_nodes
from knexa_lab.experiment.methods.base import METRIC_FIELDS


def _node(tmp_path, i, entries, final=None):
    d = tmp_path / f"node-{i}"
    d.mkdir()
    (d / "rounds.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    if final is not None:
        (d / "final.json").write_text(json.dumps(final))
    return d


def _entry(rnd, node, role, partner=None, **extra):
    return {"round": rnd, "node": node, "model": "tiny-gpt2", "family": "gpt2", "train_loss": 2.0,
            "val_loss": 1.0 + rnd, "pass_at_1": 0.1 * rnd, "codebleu": 0.2, "role": role, "partner": partner,
            "seconds": 3.0, **extra}


def test_node_logs_become_metric_rows(tmp_path):
    teacher = [_entry(0, "PEER-A", "teacher", "PEER-B", package_bytes=900), _entry(1, "PEER-A", "idle")]
    student = [_entry(0, "PEER-B", "student", "PEER-A", package_bytes=1000, reward=0.25, kd_loss=1.5),
               _entry(1, "PEER-B", "idle")]
    final = {"pass_at_1": 0.9, "codebleu": 0.5, "val_loss": 0.5}
    dirs = [_node(tmp_path, 0, teacher, final), _node(tmp_path, 1, student, final)]
    rows = rows_from_nodes("knexa-fl", 3, dirs, rounds=2)
    assert [tuple(r) for r in rows] == [METRIC_FIELDS] * 4
    by = {(r["client"], r["round"]): r for r in rows}
    t, s = by["client-0", 1], by["client-1", 1]
    assert (t["role"], t["partner"], t["bytes_sent"], t["bytes_received"]) == ("teacher", "client-1", 900, 0)
    assert (s["role"], s["partner"], s["reward"], s["kd_loss"], s["bytes_received"]) == \
        ("student", "client-0", 0.25, 1.5, 1000)
    # a round's metrics come from the node's next evaluation (after the exchange); the last from final.json
    assert (t["pass_at_1"], t["val_loss"]) == (0.1, 2.0)
    assert (by["client-0", 2]["pass_at_1"], by["client-0", 2]["role"]) == (0.9, "local")
    assert all(r["pass_at_5"] is None and r["method"] == "knexa-fl" and r["seed"] == 3 for r in rows)


def test_a_node_that_missed_rounds_is_an_error(tmp_path):
    dirs = [_node(tmp_path, 0, [_entry(0, "PEER-A", "idle")])]
    with pytest.raises(ValueError, match=r"node-0 .* rounds \[1\]"):
        rows_from_nodes("random-p2p", 1, dirs, rounds=2)


@pytest.mark.slow
@pytest.mark.integration
def test_daemons_mode_runs_a_p2p_method_through_real_processes(tmp_path, model_cache):
    from tests.integration.conftest import processes_mentioning

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "knexa_lab", "experiment", "--preset", "tiny", "--mode", "daemons",
           "--methods", "knexa-fl", "--seeds", "1", "--rounds", "1", "--out", str(out), "--no-progress",
           "--cache-dir", str(model_cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        left = processes_mentioning(str(tmp_path))
    assert left == [], "daemons outlived the experiment"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["client"] for r in rows) == ["client-0", "client-1", "client-2"]
    roles = sorted(r["role"] for r in rows)
    assert roles == ["local", "student", "teacher"]
    student = next(r for r in rows if r["role"] == "student")
    teacher = next(r for r in rows if r["role"] == "teacher")
    assert student["partner"] == teacher["client"] and student["reward"] is not None
    assert student["bytes_received"] > 0 and teacher["bytes_sent"] > 0
    cpm = (out / "runs" / "knexa-fl" / "seed-1" / "federation" / "cpm" / "cpm.toml").read_text()
    assert 'policy = "linucb"' in cpm and 'context = "interaction"' in cpm
    progress = json.loads((out / "runs" / "knexa-fl" / "seed-1" / "progress.json").read_text())
    assert progress["rounds_done"] == 1

"""The walking skeleton, for real: CPM + nodes as separate processes over libp2p on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import processes_mentioning

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _lab(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "knexa_lab", "run", "--preset", "tiny", "--out", str(out), "--no-progress", *extra]


def test_federation_completes_rounds_over_libp2p(reap):
    out = reap / "run"
    proc = subprocess.run(_lab(out, "--nodes", "3", "--rounds", "2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher -> student" in proc.stdout and "Summary" in proc.stdout

    rounds = [json.loads(line) for i in range(3) for line in (out / f"node-{i}" / "rounds.jsonl").read_text().splitlines()]
    assert {(e["round"], e["node"]) for e in rounds} == {(r, e["node"]) for r in (0, 1) for e in rounds}
    # directives came from the CPM, over pubsub (polling is only a fallback)
    sources = [e.get("directive_source") for e in rounds]
    assert all(s in ("pubsub", "poll") for s in sources) and "pubsub" in sources
    students = [e for e in rounds if e["role"] == "student"]
    teachers = [e for e in rounds if e["role"] == "teacher"]
    assert len(students) >= 2 and len(teachers) == len(students)
    for t in teachers:
        assert t["ack"] == "ok" and t["package_bytes"] > 0
    for s in students:
        assert s["package_bytes"] > 0 and s["items"] > 0
        assert s["reward_ack"] == "ok"
        assert s["adapter_before"] != s["adapter_after"], "KD must change the student's LoRA weights"
        assert s["base_before"] == s["base_after"], "KD must not touch the frozen base"

    # rewards reached the CPM and changed its bandit state
    from knexa_cpm.bandit import array_from_state
    from knexa_cpm.state import load_state

    state = load_state(out / "cpm")
    assert state["stats"]["updates"] == len(students)
    b = array_from_state(state["policy"]["bandit"]["b"])
    assert state["policy"]["bandit"]["n_updates"] == len(students) and abs(b).sum() > 0

    # the CPM never stored or logged package contents
    texts = []
    for i in range(3):
        for f in (out / f"node-{i}" / "received").glob("*.json"):
            texts += [t.strip() for _, t in json.loads(f.read_text())["items"] if len(t.strip()) >= 12]
    assert texts, "students should have kept what they received"
    cpm_blobs = [p.read_bytes() for p in (out / "cpm").rglob("*") if p.is_file()]
    for text in texts:
        needle = text.encode()
        assert not any(needle in blob for blob in cpm_blobs)


def test_killing_the_launcher_leaves_no_daemon(reap):
    out = reap / "run"
    launcher = subprocess.Popen(_lab(out, "--nodes", "2", "--rounds", "50"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = launcher.stdout.readline()
        seen.append(line)
        if "node-1 (" in line:
            break
    assert any("node-1 (" in line for line in seen), "".join(seen)
    assert len(processes_mentioning(str(out))) >= 3  # launcher + cpm + nodes are up
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(out)) == []


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from knexa_node.data import load_problems, make_split, write_split

    d = tmp_path_factory.mktemp("data")
    write_split(make_split(load_problems(), n_nodes=2, seed=1, test_size=10, transfer_size=4), d)
    return d


def _node(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knexa_node", "start", "--state-dir", str(tmp / "state"), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


GOOD_CPM = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWAMVdXcCUNLAfjY5t4SU91S8McA5FteJEU6MnJVsct1Bo"


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--model", "tiny-gpt2", "--cpm", "/ip4/127.0.0.1/tcp/9"], 20, "/p2p/"),
    (["--model", "tiny-gpt2", "--cpm", "garbage"], 20, "/p2p/"),
    (["--model", "gpt-17-ultra", "--cpm", GOOD_CPM], 21, "gpt-17-ultra"),
    (["--model", "/nonexistent/model/dir", "--cpm", GOOD_CPM], 21, "/nonexistent/model/dir"),
    (["--model", "tiny-gpt2", "--cpm", GOOD_CPM, "--set", "node.cpm_connect_timeout_s=3"], 22, "cannot reach CPM"),
])
def test_node_bad_input_exits_with_one_line(args, code, needle, shard, reap):
    proc = _node([*args, "--data", str(shard / "node-0")], reap)
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("knexa-node:")]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(err_lines) == 1 and needle in err_lines[0]

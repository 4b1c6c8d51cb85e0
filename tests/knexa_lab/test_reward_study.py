"""The reward study's summary (`knexa_lab.skills.reward_study.summarize`) on pairs whose answer is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from knexa_lab.skills.reward_study import summarize


def _rows() -> list[dict]:
    rows = []
    for s in range(3):
        for i, t in enumerate(t for t in range(4) if t != s):
            gain = 0.1 * (i + 1) - 0.15  # per student: -0.05, +0.05, +0.15 by teacher rank
            rows.append({"teacher": t, "student": s, "d_test_pass": gain, "d_val_error": 2 * gain,  # same order
                         "d_val_loss": -gain, "teachable": float(i)})  # reversed order
    return rows


def test_summary_ranks_measures_and_states_package_effects() -> None:
    got = summarize(_rows())
    assert got["pairs"] == 9
    assert got["measures"]["d_val_error"]["within_student_vs_test_gain"] == pytest.approx(1.0)
    assert got["measures"]["d_val_loss"]["within_student_vs_test_gain"] == pytest.approx(-1.0)
    assert got["teachable_vs_test_gain_within_student"] == pytest.approx(1.0)
    assert got["mean_test_effect"] == pytest.approx(0.05)
    assert got["best_teacher_test_effect"] == pytest.approx(0.15)


def test_cli_summarizes_a_pairs_file_without_models(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    proc = subprocess.run([sys.executable, "-m", "knexa_lab.skills.reward_study", "--pairs", str(pairs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["best_teacher_test_effect"] == pytest.approx(0.15)
    bad = subprocess.run([sys.executable, "-m", "knexa_lab.skills.reward_study"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--out is required" in bad.stderr
    for content in ("not json\n", json.dumps({"teacher": 1}) + "\n"):
        pairs.write_text(content)
        broken = subprocess.run([sys.executable, "-m", "knexa_lab.skills.reward_study", "--pairs", str(pairs)],
                                capture_output=True, text=True, timeout=120)
        assert broken.returncode == 2 and "cannot summarize" in broken.stderr and "Traceback" not in broken.stderr

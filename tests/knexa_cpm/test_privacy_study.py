"""`knexa-cpm privacy-study`: the epsilon curve's arithmetic, and the command end to end (tiny grid)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from knexa_cpm.cli import main as cpm_main
from knexa_cpm.privacy_study import oracle_fraction, run_study


def test_oracle_fraction() -> None:
    assert oracle_fraction(linucb=7.0, random=2.0, oracle=12.0) == pytest.approx(0.5)
    assert oracle_fraction(linucb=2.0, random=2.0, oracle=12.0) == 0.0
    assert math.isnan(oracle_fraction(linucb=3.0, random=2.0, oracle=2.0))


def test_noise_reaches_the_policy_and_the_budget_freezes_profiles() -> None:
    rows = run_study([math.inf, 0.5], nodes=[4], hets=["high"], seeds=[0], rounds=12, worlds=["family"],
                     progress=False)
    by_eps = {r["epsilon"]: r for r in rows}
    assert set(by_eps) == {math.inf, 0.5}
    # the same world, the same random and oracle baselines; only what LinUCB saw differs
    assert by_eps[math.inf]["cum_random"] == by_eps[0.5]["cum_random"]
    assert by_eps[math.inf]["cum_linucb"] != by_eps[0.5]["cum_linucb"]
    frozen = run_study([10.0], nodes=[4], hets=["high"], seeds=[0], rounds=12, worlds=["family"], budget=50.0,
                       progress=False)
    assert frozen[0]["frozen_rounds"] == 12 - 5  # five releases of 10 fit a budget of 50


def test_cli_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    assert cpm_main(["privacy-study", "--out", str(out), "--epsilon", "inf", "50", "--nodes", "4", "--het", "low",
                     "--seeds", "2", "--rounds", "8", "--world", "family", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "privacy.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["epsilon"] for r in rows} == {"inf", "50.0"}
    table = (out / "privacy.md").read_text()
    assert "| no noise |" in table and "| 50 |" in table and table in capsys.readouterr().out
    assert cpm_main(["privacy-study", "--out", str(out), "--epsilon", "0"]) == 2

"""The signal study: which profile signal ranks pairs by what the teacher can teach."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knexa_lab.skills.signal_study import main, pair_table, study
from protocol._layout import CATEGORIES

CLIENTS = ["client-0", "client-1", "client-2", "client-3"]


def _write(tmp_path: Path, skills: dict[tuple[int, int, str], np.ndarray]) -> Path:
    config = {"experiment": {"models": ["skills-gpt2"] * len(CLIENTS)}, "skills": {"val_per_category": 2}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rows = []
    for (seed, rnd, client), k in sorted(skills.items()):
        rows.append({"method": "random-p2p", "seed": seed, "round": rnd, "client": client,
                     "pass_at_1": float(k.mean()), "categories": dict(zip(CATEGORIES, map(float, k), strict=True))})
    rows.append({**rows[0], "method": "local-only"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _skills(seed: int, rounds: int, binary: bool) -> dict[tuple[int, int, str], np.ndarray]:
    rng = np.random.default_rng(seed)
    draw = (lambda: (rng.random(12) < 0.4).astype(float)) if binary else (lambda: np.round(rng.random(12), 2))
    return {(seed, r, c): draw() for r in range(1, rounds + 1) for c in CLIENTS}


def test_pairs_are_every_ordered_pair_of_every_round_but_the_last(tmp_path: Path) -> None:
    skills = _skills(1, 3, binary=False)
    rows = [json.loads(x) for x in _write(tmp_path, skills).joinpath("metrics.jsonl").read_text().splitlines()]
    table = pair_table(rows, "random-p2p")
    assert list(table) == [1] and len(table[1]) == 2 * 4 * 3  # rounds 2 and 3, 12 ordered pairs each
    p = table[1][0]
    assert p["round"] == 2 and (p["teacher"], p["student"]) == ("client-0", "client-1")
    assert p["gain"] == pytest.approx(np.maximum(skills[(1, 1, "client-0")] - skills[(1, 1, "client-1")], 0).sum())


def test_exact_validation_skills_rank_pairs_exactly_and_noisy_ones_less(tmp_path: Path) -> None:
    """Skills of 0 or 1 are measured exactly by any number of validation problems; skills in
    between are not, and more problems measure them better."""
    exact = study(_write(tmp_path, {**_skills(1, 4, binary=True), **_skills(2, 4, binary=True)}), draws=5)
    assert exact["spearman_mean"]["skill_gap@2"] == pytest.approx(1.0)
    assert exact["spearman_mean"]["skill_gap@4"] == pytest.approx(1.0)
    assert set(exact["spearman_per_seed"]["js"]) == {1, 2} and np.isfinite(exact["spearman_mean"]["js"])
    noisy = study(_write(tmp_path, {**_skills(3, 6, binary=False), **_skills(4, 6, binary=False)}), draws=20)
    m = noisy["spearman_mean"]
    assert 0.3 < m["skill_gap@2"] < m["skill_gap@4"] < 1.0, m


def test_cli_prints_and_writes_and_refuses_a_method_without_rows(tmp_path: Path, capsys) -> None:
    d = _write(tmp_path, _skills(1, 3, binary=False))
    assert main([str(d), "--draws", "2", "--out", str(tmp_path / "s.json")]) == 0
    assert "skill_gap@2" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["pairs"] == 24
    with pytest.raises(SystemExit) as e:
        main([str(d), "--method", "oracle-p2p"])
    assert e.value.code == 2 and "no skills rows of method 'oracle-p2p'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("signal_study: ") and "missing" in err

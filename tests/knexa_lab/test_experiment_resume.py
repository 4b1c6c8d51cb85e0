"""Interrupt a tiny experiment mid-run, resume it, and get exactly the uninterrupted run's rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from .conftest import read_rows, tiny_config

pytestmark = pytest.mark.slow

METHODS = ["knexa-fl", "local-only"]


def _comparable(rows):
    """Rows by key without wall time (the only field that legitimately differs between runs)."""
    return {(r["method"], r["seed"], r["round"], r["client"]): {k: v for k, v in r.items() if k != "wall_s"}
            for r in rows}


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, model_cache, monkeypatch, reference_run):
    from knexa_lab.experiment import engine

    cfg = tiny_config(methods=METHODS)
    real_save = engine.save_round

    def interrupted_save(results_dir, run_dir, rounds_done, *args, **kwargs):
        # Ctrl-C after knexa-fl's round-2 rows were appended but before that round was committed
        if run_dir.parent.name == "knexa-fl" and rounds_done == 2:
            raise KeyboardInterrupt
        return real_save(results_dir, run_dir, rounds_done, *args, **kwargs)

    monkeypatch.setattr(engine, "save_round", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        engine.run_experiment(cfg, tmp_path, cache_dir=model_cache, progress=False)
    rows = read_rows(tmp_path)
    assert Counter(r["method"] for r in rows) == {"knexa-fl": 6}  # round 2 written, not committed
    progress = json.loads((tmp_path / "runs" / "knexa-fl" / "seed-1" / "progress.json").read_text())
    assert progress["rounds_done"] == 1
    monkeypatch.setattr(engine, "save_round", real_save)

    # resume: knexa-fl reloads its round-1 checkpoint, local-only starts; both in worker processes
    failed = engine.run_experiment(cfg, tmp_path, cache_dir=model_cache, progress=False, jobs=2)
    assert failed == []
    rows = read_rows(tmp_path)
    keys = Counter((r["method"], r["seed"], r["round"], r["client"]) for r in rows)
    assert len(rows) == 2 * 2 * 3 and set(keys.values()) == {1}, "no duplicated or missing rows"

    # deterministic seeds: the same numbers as the uninterrupted reference run, field for field
    reference = {k: v for k, v in _comparable(reference_run.rows).items() if k[0] in METHODS}
    assert _comparable(rows) == reference

"""Shared fixtures for `knexa-lab experiment`: one tiny-model cache and one reference run per session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: the methods this engine ships (the others' tests live with their modules)
ENGINE_METHODS = ["local-only", "random-p2p", "heuristic-p2p", "knexa-fl", "knexa-fl-concat", "fedavg"]
#: the tiny preset, one seed, sampled Pass@k on one problem after the final round
OVERRIDES: dict[str, Any] = {
    "experiment": {"seeds": [1], "rounds": 2, "passk_samples": 10, "passk_when": "final"},
    "learning": {"eval_problems": 1},
}


def tiny_config(**experiment: Any) -> Any:
    from knexa_lab.experiment.config import resolve_config

    return resolve_config("tiny", {"experiment": {**OVERRIDES["experiment"], **experiment},
                                   "learning": dict(OVERRIDES["learning"])})


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class Run:
    out: Path
    rows: list[dict[str, Any]]
    failed: list[str]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knexa-cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Run:
    """Every engine method on the tiny preset, one seed, two rounds, never interrupted."""
    from knexa_lab.experiment.engine import run_experiment

    out = tmp_path_factory.mktemp("reference")
    failed = run_experiment(tiny_config(methods=ENGINE_METHODS), out, cache_dir=model_cache, progress=False)
    return Run(out, read_rows(out), failed)

"""Fixtures for fault-injection tests: one prepared tiny-model cache, and a reaper.

Every test here starts real daemons (or a whole in-process federation) and must leave nothing
behind: `reap` fails the test if a process whose command line mentions its tmp dir survives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import TINY_MODELS, processes_mentioning


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection (kill -9, restarts, lossy transport)")
    config.addinivalue_line("markers", "soak: long randomized churn run; KNEXA_SOAK_ROUNDS sets its length")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KNEXA_CACHE for the daemons, with every tiny preset built once (about a second each)."""
    from knexa_node.models import prepare_model

    cache = tmp_path_factory.mktemp("cache")
    for name in TINY_MODELS:
        prepare_model(name, cache_dir=cache)
    return cache


@pytest.fixture
def reap(tmp_path: Path) -> Iterator[Path]:
    """Fails the test if any process mentioning tmp_path outlives it, and kills leftovers."""
    yield tmp_path
    left = processes_mentioning(str(tmp_path))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {left}"

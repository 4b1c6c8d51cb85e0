"""Shared fixtures for the learning stack: one tiny-model cache and one split per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from knexa_node.data import load_problems, make_split, write_split

#: small, fast settings: a tiny model learns visibly in one epoch at this lr
FAST = {"max_len": 192, "max_new_tokens": 16, "eval_problems": 2, "transfer_size": 4, "threads": 1,
        "micro_batch": 4, "effective_batch": 8, "lr": 1e-3, "kd_lr": 1e-3, "total_rounds": 3,
        "sandbox_timeout_s": 10.0, "sandbox_workers": 2}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny presets are built here once per session (about a second per family)."""
    return tmp_path_factory.mktemp("knexa-cache")


@pytest.fixture(scope="session")
def problems() -> list[dict[str, str]]:
    return load_problems()


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory: pytest.TempPathFactory, problems: list[dict[str, str]]) -> Path:
    """A 2-node HumanEval split in write_split's layout (node-0, node-1, public)."""
    out = tmp_path_factory.mktemp("split")
    write_split(make_split(problems, n_nodes=2, seed=7, test_size=12, transfer_size=6, alpha=0.5), out)
    return out


@pytest.fixture
def make_backend(model_cache: Path, split_dir: Path) -> Callable[..., object]:
    """``make_backend(model, node=0, **learning_overrides)`` -> a TorchBackend on the split."""
    from knexa_node.torch_backend import LearningConfig, TorchBackend

    def make(model: str, node: int = 0, **overrides: object) -> TorchBackend:
        cfg = LearningConfig(**{**FAST, **overrides})
        return TorchBackend.create(model, split_dir / f"node-{node}", cfg, cache_dir=model_cache)

    return make

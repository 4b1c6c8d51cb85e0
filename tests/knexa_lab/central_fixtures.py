"""Tiny federations for the centralised-KD baselines' tests (plain helpers, no conftest)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knexa_lab.experiment.methods.base import Client, RoundContext
from knexa_node.data import load_problems, make_split, write_split

#: small, fast settings (as in tests/knexa_node/conftest.py): one KD step per round
FAST: dict[str, Any] = {
    "max_len": 192, "max_new_tokens": 16, "eval_problems": 0, "transfer_size": 4, "threads": 1,
    "micro_batch": 4, "effective_batch": 8, "lr": 1e-3, "kd_lr": 1e-3, "total_rounds": 3,
}
#: two clients share a model (hence a tokenizer); the third has another vocabulary
MODELS = ("tiny-gpt2", "tiny-gpt2", "tiny-llama")


def write_tiny_split(root: Path, n_clients: int) -> Path:
    """A seeded HumanEval split for ``n_clients`` in write_split's layout under ``root``."""
    split = make_split(load_problems(), n_nodes=n_clients, seed=7, test_size=12, transfer_size=6, alpha=0.5)
    write_split(split, root)
    return root


def make_clients(root: Path, cache: Path, models: Sequence[str] = MODELS, **overrides: Any) -> list[Client]:
    """One TorchBackend per model on its own shard, each with its own seed (as the engine does)."""
    from knexa_node.torch_backend import LearningConfig, TorchBackend

    split = root if (root / "public").is_dir() else write_tiny_split(root, len(models))
    clients = []
    for i, model in enumerate(models):
        cfg = LearningConfig(**{**FAST, "seed": 100 + i, **overrides})
        backend = TorchBackend.create(model, split / f"node-{i}", cfg, cache_dir=cache)
        clients.append(Client(index=i, name=f"client-{i}", backend=backend, seed=100 + i))
    return clients


def round_context(clients: Sequence[Client], workdir: Path, round_idx: int = 0, total_rounds: int = 3,
                  settings: Mapping[str, Any] | None = None) -> RoundContext:
    return RoundContext(round_idx=round_idx, total_rounds=total_rounds, clients=clients,
                        rng=np.random.default_rng(round_idx), history={c.index: [] for c in clients},
                        settings=dict(settings or {}), workdir=workdir)

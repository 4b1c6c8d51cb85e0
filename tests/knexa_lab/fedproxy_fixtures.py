"""Deeper tiny models and small federations for FedProxy's tests (plain helpers, no conftest).

The tiny presets have 2 decoder layers, so a proxy of one keeps both (first and last) and nothing
is compressed. These helpers save a 5-layer variant of a preset (same family config and
tokenizer, seeded random weights) as a local checkpoint, which every loader takes as a model path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knexa_lab.experiment.methods.base import Client, RoundContext
from knexa_node.data import load_problems, make_split, write_split

DEEP_LAYERS = 5
#: small, fast settings (as in tests/knexa_node/conftest.py): a few optimiser steps per epoch
FAST: dict[str, Any] = {
    "max_len": 128, "max_new_tokens": 16, "eval_problems": 0, "transfer_size": 4, "threads": 1,
    "micro_batch": 4, "effective_batch": 8, "lr": 1e-3, "kd_lr": 1e-3, "total_rounds": 3,
}


def deep_tiny(preset: str, cache: Path, n_layers: int = DEEP_LAYERS) -> Path:
    """``cache/deep-<preset>``: the preset's config with ``n_layers`` layers, built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from knexa_node.models import prepare_model

    out = cache / f"deep-{preset}"
    if (out / "config.json").is_file():
        return out
    spec = prepare_model(preset, cache_dir=cache)
    config = AutoConfig.from_pretrained(spec.path)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * n_layers
    config.num_hidden_layers = n_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(n_layers)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(spec.path).save_pretrained(out)
    return out


def make_clients(split_root: Path, models: Sequence[str], cache: Path, **overrides: Any) -> list[Client]:
    """One TorchBackend per model (a preset or a checkpoint path) on its own shard and seed."""
    from knexa_node.torch_backend import LearningConfig, TorchBackend

    if not (split_root / "public").is_dir():
        write_split(make_split(load_problems(), n_nodes=len(models), seed=7, test_size=12, transfer_size=6,
                               alpha=0.5), split_root)
    clients = []
    for i, model in enumerate(models):
        cfg = LearningConfig(**{**FAST, "seed": 100 + i, **overrides})
        backend = TorchBackend.create(str(model), split_root / f"node-{i}", cfg, cache_dir=cache)
        clients.append(Client(index=i, name=f"client-{i}", backend=backend, seed=100 + i))
    return clients


def round_context(clients: Sequence[Client], workdir: Path, round_idx: int, settings: dict[str, Any]) -> RoundContext:
    return RoundContext(round_idx=round_idx, total_rounds=3, clients=clients,
                        rng=np.random.default_rng(round_idx), history={c.index: [] for c in clients},
                        settings=settings, workdir=workdir)


def lora_tensors(client: Client) -> dict[str, Any]:
    """A detached copy of a client's LLM adapter (its trainable tensors), by name."""
    return {n: p.detach().clone() for n, p in client.backend.model.named_parameters() if p.requires_grad}

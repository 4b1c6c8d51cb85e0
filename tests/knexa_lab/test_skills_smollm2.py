"""The skills benchmark's real-model variant: SmolLM2-135M clients fine-tuned on their own shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from knexa_lab.experiment.config import resolve_config
from knexa_lab.skills.models import (
    SMOLLM2,
    PretrainSettings,
    build_client_model,
    client_model_dir,
    skills_family,
)
from knexa_lab.skills.split import SplitSettings, make_skills_split


@pytest.mark.parametrize("quick", [False, True])
def test_preset_runs_smollm2_clients_in_the_format_they_were_trained_in(quick: bool) -> None:
    cfg = resolve_config("skills-smollm2", quick=quick)
    assert cfg.experiment.problems == "skills"
    assert {skills_family(m) for m in cfg.experiment.models} == {SMOLLM2}
    assert "oracle-p2p" in cfg.experiment.methods or quick
    # the client stage trains on raw prompt + solution, so the node must not wrap prompts in chat
    assert cfg.learning["prompt_format"] == "raw"
    assert cfg.skills.lr < 1e-3  # a real model, not a 128-wide tiny one


@pytest.mark.slow
def test_client_model_is_the_embedded_smollm2_fine_tuned_on_its_shard(model_cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from knexa_node.models import prepare_embedded

    train = make_skills_split(SplitSettings(clients=2, train_per_client=4), seed=1).nodes[0][0]
    settings = PretrainSettings(client_steps=2, batch=4, lr=1e-4, threads=2)
    cache = model_cache / "skills"
    built = build_client_model(SMOLLM2, train, cache, 1, settings)
    base = prepare_embedded(model_cache)  # converted once, beside the skills cache

    client = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert client.config.model_type == "llama" and client.config.vocab_size == reference.config.vocab_size
    changed = [name for name, p in client.state_dict().items()
               if not torch.equal(p, reference.state_dict()[name])]
    assert changed, "the client stage left SmolLM2 unchanged"

    # the tiny families' first-stage settings do not shape a SmolLM2 client; its own do
    marker = next(built.iterdir()).stat().st_mtime_ns
    same = build_client_model(SMOLLM2, train, cache, 1, dataclasses.replace(settings, hidden=64, base_steps=7))
    assert same == built and next(built.iterdir()).stat().st_mtime_ns == marker
    for change in ({"client_steps": 3}, {"lr": 2e-4}, {"batch": 2}):
        assert client_model_dir(SMOLLM2, train, cache, 1, dataclasses.replace(settings, **change)) != built
    assert client_model_dir(SMOLLM2, train, cache, 2, settings) != built

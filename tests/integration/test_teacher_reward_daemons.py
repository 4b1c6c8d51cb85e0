"""The reward measures the teacher through real daemons: `knexa-cpm serve` + 4 `knexa-node start`.

Two nodes hold data for categories 0-3 only; one teacher holds data for categories 4-7; one node
has random weights. Over 8 rounds the CPM (random policy) pairs them in many ways; the rewards
students reported for the strong teacher must beat, on average, those reported for the
random-weight one, as the in-process test (tests/knexa_lab/test_teacher_reward.py) shows with a
confidence interval.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knexa_lab.launcher import FederationSpec, run_federation
from knexa_lab.skills.models import PretrainSettings, build_client_model
from knexa_lab.skills.problems import generate
from knexa_node.data import write_jsonl
from protocol._layout import CATEGORIES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = len(CATEGORIES)
SETTINGS = PretrainSettings(hidden=96, layers=2, public_examples=1500, base_steps=300, client_steps=120)
LEARNING = {"max_len": 96, "max_new_tokens": 12, "eval_problems": 12, "transfer_size": 0, "micro_batch": 16,
            "effective_batch": 16, "lr": 5e-3, "kd_lr": 5e-3, "a_kd_start": 0.5, "a_kd_end": 0.5, "kd_epochs": 2,
            "lora_dropout": 0.0, "gen_batch": 128, "threads": 1, "sandbox_workers": 1}


def _random_weights(like: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like)).save_pretrained(out)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return out


def test_strong_teacher_earns_more_than_random_weights_through_daemons(reap: Path) -> None:
    sets = generate({"train": [36 if c < 8 else 0 for c in range(N)], "val": [3] * N, "transfer": [4] * N,
                     "test": [1] * N}, seed=7)
    weak = [p for p in sets["train"] if CATEGORIES.index(p["category"]) < 4]
    strong = [p for p in sets["train"] if CATEGORIES.index(p["category"]) >= 4]
    shards = [weak[0::2], strong, weak[1::2], weak[1::2]]  # node 2 gets random weights below
    data = reap / "data"
    write_jsonl(data / "public" / "test.jsonl", sets["test"])
    write_jsonl(data / "public" / "transfer.jsonl", sets["transfer"])
    cache = reap / "models"
    models = []
    for i, shard in enumerate(shards):
        write_jsonl(data / f"node-{i}" / "train.jsonl", shard)
        write_jsonl(data / f"node-{i}" / "val.jsonl", sets["val"])
        models.append(str(build_client_model("gpt2", shard, cache, seed=3 + i, s=SETTINGS)))
    models[2] = str(_random_weights(Path(models[0]), reap / "random-model"))

    spec = FederationSpec(out=reap / "fed", data=data, models=models, rounds=8, learning=LEARNING,
                          node_seeds=[100 + i for i in range(4)], cache=cache,
                          cpm={"policy": "random", "seed": 5}, node={"final_eval": True},
                          round_timeout_s=300.0, timeout_s=1500.0, progress=False)
    fed = run_federation(spec, lambda msg: None)
    assert not fed.failed

    entries = [[json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()] for d in fed.node_dirs]
    index = {e["node"]: i for i, log in enumerate(entries) for e in log}
    # pairings depend on the run's fresh peer ids (ties are broken by id), so every student's
    # rewards count: which teacher a student had is what the comparison is about
    rewards: dict[int, list[float]] = {1: [], 2: []}
    for i in range(4):
        for e in entries[i]:
            if e["role"] == "student" and e.get("reward") is not None:
                teacher = index[e["partner"]]
                if teacher in rewards:
                    rewards[teacher].append(e["reward"])
    assert rewards[1] and rewards[2], f"both teachers must have taught in 8 rounds: {rewards}"
    assert np.mean(rewards[1]) > np.mean(rewards[2]), rewards

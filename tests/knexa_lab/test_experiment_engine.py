"""The in-process engine on the tiny preset: complete rows, each method's signature behaviour."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from knexa_lab.experiment.methods.base import METRIC_FIELDS

from .conftest import ENGINE_METHODS, read_rows, tiny_config

pytestmark = pytest.mark.slow

P2P = ["random-p2p", "heuristic-p2p", "knexa-fl", "knexa-fl-concat"]
CLIENTS = ["client-0", "client-1", "client-2"]  # tiny: tiny-gpt2, tiny-llama, tiny-gpt2


def _by(rows, method):
    return [r for r in rows if r["method"] == method]


def test_every_method_seed_round_client_has_one_complete_row(reference_run):
    assert reference_run.failed == []
    rows = reference_run.rows
    keys = Counter((r["method"], r["seed"], r["round"], r["client"]) for r in rows)
    assert set(keys) == {(m, 1, r, c) for m in ENGINE_METHODS for r in (1, 2) for c in CLIENTS}
    assert set(keys.values()) == {1}
    for r in rows:
        assert tuple(r) == METRIC_FIELDS
        for k in ("pass_at_1", "codebleu", "val_loss", "train_loss", "wall_s"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert 0.0 <= r["pass_at_1"] <= 1.0 and 0.0 <= r["codebleu"] <= 1.0 and r["val_loss"] > 0
        assert r["model"] == ("tiny-llama" if r["client"] == "client-1" else "tiny-gpt2")
        assert r["family"] == ("llama" if r["client"] == "client-1" else "gpt2")
    out = reference_run.out
    assert len((out / "metrics.csv").read_text().splitlines()) == len(rows) + 1
    info = json.loads((out / "run-info.json").read_text())
    assert info["seeds"] == [1] and info["packages"]["torch"] and info["python"]
    assert json.loads((out / "config.json").read_text())["experiment"]["methods"] == ENGINE_METHODS


def test_sampled_pass_at_k_only_after_the_final_round(reference_run):
    for r in reference_run.rows:
        if r["round"] == 1:
            assert r["pass_at_5"] is None and r["pass_at_10"] is None
        else:
            assert 0.0 <= r["pass_at_5"] <= r["pass_at_10"] <= 1.0


def test_local_only_exchanges_nothing(reference_run):
    for r in _by(reference_run.rows, "local-only"):
        assert (r["role"], r["partner"], r["reward"], r["kd_loss"]) == ("local", None, None, None)
        assert r["bytes_sent"] == r["bytes_received"] == 0


@pytest.mark.parametrize("method", P2P)
def test_p2p_pairs_a_teacher_and_a_student_who_reports_a_reward(reference_run, method):
    rows = _by(reference_run.rows, method)
    for rnd in (1, 2):
        this = {r["client"]: r for r in rows if r["round"] == rnd}
        roles = Counter(r["role"] for r in this.values())
        assert roles == {"teacher": 1, "student": 1, "local": 1}  # 3 clients: floor(3/2) = 1 pair
        teacher = next(r for r in this.values() if r["role"] == "teacher")
        student = next(r for r in this.values() if r["role"] == "student")
        assert teacher["partner"] == student["client"] and student["partner"] == teacher["client"]
        assert teacher["bytes_sent"] == student["bytes_received"] > 0
        assert teacher["bytes_received"] == student["bytes_sent"] == 0
        assert math.isfinite(student["reward"]) and teacher["reward"] is None
        # None when every answer was empty (a random tiny teacher may say nothing): no KD step ran
        assert student["kd_loss"] is None or math.isfinite(student["kd_loss"])


def test_students_distil_what_teachers_send(reference_run):
    kd = [r["kd_loss"] for r in reference_run.rows if r["role"] == "student"]
    assert len(kd) == len(P2P) * 2 and any(k is not None and k > 0 for k in kd)


def _meta(out, method, client):
    return json.loads((out / "runs" / method / "seed-1" / "checkpoint" / "round-0002" / client / "meta.json").read_text())


def test_fedavg_makes_same_model_adapters_identical(reference_run):
    out = reference_run.out
    fed = {c: _meta(out, "fedavg", c)["adapter_fingerprint"] for c in CLIENTS}
    local = {c: _meta(out, "local-only", c)["adapter_fingerprint"] for c in CLIENTS}
    assert fed["client-0"] == fed["client-2"], "the two tiny-gpt2 clients must share the averaged adapter"
    assert local["client-0"] != local["client-2"], "without averaging, their adapters differ"
    for r in _by(reference_run.rows, "fedavg"):
        if r["client"] == "client-1":  # tiny-llama is alone in its group
            assert r["role"] == "local" and r["bytes_sent"] == r["bytes_received"] == 0
        else:
            assert r["role"] == "aggregated" and r["bytes_sent"] == r["bytes_received"] > 0


def test_only_the_latest_checkpoint_is_kept(reference_run):
    for m in ENGINE_METHODS:
        folder = reference_run.out / "runs" / m / "seed-1" / "checkpoint"
        assert sorted(p.name for p in folder.iterdir()) == ["round-0002"]
        progress = json.loads((folder.parent / "progress.json").read_text())
        assert progress == {"rounds_done": 2, "total_rounds": 2, "checkpoint": f"runs/{m}/seed-1/checkpoint/round-0002"}


class _Corrupting:
    """A method that (wrongly) writes into the frozen base: the engine must refuse its run."""

    name = "local-only"
    local_training = True

    def setup(self, clients, settings, workdir):
        self.clients = clients

    def communicate(self, ctx):
        import torch

        p = next(p for p in ctx.clients[0].backend.model.parameters() if not p.requires_grad)
        with torch.no_grad():
            p.add_(1.0)
        return {}

    def save(self, directory):
        pass

    def load(self, directory):
        pass


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, model_cache, monkeypatch, caplog):
    from knexa_lab.experiment import engine
    from knexa_lab.experiment.methods import create_method

    monkeypatch.setattr(engine, "create_method",
                        lambda name: _Corrupting() if name == "fedavg" else create_method(name))
    cfg = tiny_config(methods=["fedavg", "local-only"], rounds=1, passk_samples=0)
    failed = engine.run_experiment(cfg, tmp_path, cache_dir=model_cache, progress=False)
    assert failed == ["fedavg/seed-1"]
    assert "changed the frozen base weights of client-0" in caplog.text
    done = json.loads((tmp_path / "runs" / "local-only" / "seed-1" / "progress.json").read_text())
    assert done["rounds_done"] == 1
    # the broken run never committed a round, so it counts as not done and left no rows
    assert not (tmp_path / "runs" / "fedavg" / "seed-1" / "progress.json").exists()
    assert {r["method"] for r in read_rows(tmp_path)} == {"local-only"}

"""The reward measures the teacher (issue 13): real small models through the node's own learning code.

A student that holds data for some categories only; a teacher that holds data for exactly the
others. Over 10 repetitions (different rounds: different local batches and package orders, each
from the same student state) the strong teacher's Eq. 3 reward beats a random-weight teacher's
and the student's own answers', with the paired difference's 95% CI above 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from knexa_lab.experiment.methods.base import package_bytes
from knexa_lab.experiment.stats import mean_ci
from knexa_lab.skills.models import PretrainSettings, build_client_model
from knexa_lab.skills.problems import generate
from knexa_node.backend import Answer
from knexa_node.data import write_jsonl
from knexa_node.reward import compute_reward
from knexa_node.torch_backend import LearningConfig, TorchBackend
from protocol._layout import CATEGORIES

pytestmark = pytest.mark.slow

N = len(CATEGORIES)
STUDENT_CATS = range(0, 4)
TEACHER_CATS = range(4, 8)
SETTINGS = PretrainSettings(hidden=96, layers=2, public_examples=1500, base_steps=300, client_steps=120)
CFG = LearningConfig(max_len=96, max_new_tokens=12, eval_problems=0, transfer_size=0, micro_batch=16,
                     effective_batch=16, lr=5e-3, kd_lr=5e-3, a_kd_start=0.5, a_kd_end=0.5, kd_epochs=2,
                     lora_dropout=0.0, gen_batch=128, threads=1, sandbox_workers=1, total_rounds=10, seed=0)


def _counts(cats: range, per: int) -> list[int]:
    return [per if c in cats else 0 for c in range(N)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TorchBackend]:
    root = tmp_path_factory.mktemp("reward")
    sets = generate({"train": [24 if c < 8 else 0 for c in range(N)], "val": [3] * N, "transfer": [4] * N,
                     "test": [1] * N}, seed=7)
    train = sets["train"]
    shards = {"student": [p for p in train if CATEGORIES.index(p["category"]) in STUDENT_CATS],
              "teacher": [p for p in train if CATEGORIES.index(p["category"]) in TEACHER_CATS]}
    write_jsonl(root / "public" / "test.jsonl", sets["test"])
    write_jsonl(root / "public" / "transfer.jsonl", sets["transfer"])
    cache = root / "models"
    backends = {}
    for name, shard in shards.items():
        write_jsonl(root / name / "train.jsonl", shard)
        write_jsonl(root / name / "val.jsonl", sets["val"])
        path = build_client_model("gpt2", shard, cache, seed=3, s=SETTINGS)
        backends[name] = TorchBackend.create(str(path), root / name, CFG, public_dir=root / "public")
    backends["random"] = TorchBackend.create(str(_random_weights(path, root / "random-model")), root / "student",
                                             CFG, public_dir=root / "public")
    return backends


def _random_weights(like: Path, out: Path) -> Path:
    """The same architecture and tokenizer with freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like)).save_pretrained(out)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return out


def _rewards(student: TorchBackend, answers: list[Answer], reps: int = 10) -> list[float]:
    out = []
    nbytes = package_bytes(answers)
    for r in range(reps):
        snap = student.trainer.snapshot()
        learned = student.learn(answers, round_idx=r, total_rounds=10)
        student.trainer.restore(snap)
        out.append(compute_reward(learned.loss_without, learned.loss_with, nbytes))
    return out


def test_teacher_strong_where_student_is_weak_earns_more(world: dict[str, TorchBackend]) -> None:
    student = world["student"]
    prompts = student.transfer_prompts()
    packages = {name: world[name].generate_answers(prompts) for name in ("teacher", "random", "student")}
    rewards = {name: np.array(_rewards(student, answers)) for name, answers in packages.items()}
    for weaker in ("random", "student"):
        ci = mean_ci(list(rewards["teacher"] - rewards[weaker]))
        assert ci.low is not None and ci.low > 0, (weaker, ci, {k: v.round(4).tolist() for k, v in rewards.items()})


def test_counterfactual_is_exact_and_rolled_back(world: dict[str, TorchBackend]) -> None:
    """With no usable answer the two branches are the same steps: equal losses, to the bit."""
    student = world["student"]
    learned = student.learn([Answer("Not/InTransfer", "    return 1\n")], round_idx=3, total_rounds=10)
    assert learned.loss_without == learned.loss_with
    assert learned.report.steps == student.kd_steps_per_round


def _with(backend: TorchBackend, **changes: object) -> TorchBackend:
    backend.cfg = dataclasses.replace(backend.cfg, **changes)
    return backend


def test_teacher_answers_only_categories_it_passes_on_validation(world: dict[str, TorchBackend]) -> None:
    from knexa_node.categories import classify_name

    teacher = world["teacher"]
    original = teacher.cfg
    try:
        _, skill = teacher.validation_skills()
        strong = {c for c, v in skill.items() if v >= 0.5}
        assert strong and strong <= {CATEGORIES[c] for c in TEACHER_CATS}, skill
        prompts = world["student"].transfer_prompts()
        before = teacher.budget()["tokens_generated"]
        answers = _with(teacher, teach_min_skill=0.5).generate_answers(prompts)
        by_id = dict(prompts)
        assert answers and {classify_name(by_id[a.task_id]) for a in answers} == strong
        assert len(answers) < len(prompts)
        assert teacher.budget()["tokens_generated"] > before  # only what it answered is counted
        assert _with(teacher, teach_min_skill=1.0).generate_answers(prompts[:0]) == []
    finally:
        teacher.cfg = original


def test_validation_error_reward_is_an_executed_fraction(world: dict[str, TorchBackend]) -> None:
    """With reward_measure = val_error both branches are 1 - Pass@1 on the validation problems."""
    student = world["student"]
    original = student.cfg
    n_val = len(student.data.val)
    try:
        _with(student, reward_measure="val_error")
        teacher_answers = world["teacher"].generate_answers(student.transfer_prompts())
        snap = student.trainer.snapshot()
        learned = student.learn(teacher_answers, round_idx=1, total_rounds=10)
        student.trainer.restore(snap)
        for err in (learned.loss_without, learned.loss_with):
            assert 0.0 <= err <= 1.0 and abs(err * n_val - round(err * n_val)) < 1e-9
        # the counterfactual branch is what integrate_local reaches: measured the same way
        snap = student.trainer.snapshot()
        student.integrate_local(round_idx=1, total_rounds=10)
        assert student.validation_error() == learned.loss_without
        student.trainer.restore(snap)
    finally:
        student.cfg = original
    with pytest.raises(ValueError, match="reward_measure"):
        dataclasses.replace(CFG, reward_measure="bleu")
    with pytest.raises(ValueError, match="teach_min_skill"):
        dataclasses.replace(CFG, teach_min_skill=1.5)

"""Eq. 2's weights reach the right loss terms: L = (1 - a_KD) * L_local + a_KD * CE(teacher text).

Through the public training API (``Trainer.kd_phase``) on a real tiny Llama with LoRA: from the
same snapshot, a_KD = 0 gives bit-identical adapters whatever the teacher said (and equals the
step with no teacher at all); a_KD = 1 gives bit-identical adapters whatever the local data is.
Controls at a_KD = 0.5 show each term does move the adapter, so equality is not vacuous.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from knexa_node.models import LoraSettings, load_model, resolve_model
from knexa_node.training import Example, Trainer, TrainSettings

LOCAL_A = [("def add(a, b):\n", "    return a + b\n"), ("def neg(x):\n", "    return -x\n"),
           ("def first(xs):\n", "    return xs[0]\n"), ("def is_even(n):\n", "    return n % 2 == 0\n")]
LOCAL_B = [("def mul(a, b):\n", "    return a * b\n"), ("def last(xs):\n", "    return xs[-1]\n"),
           ("def half(n):\n", "    return n // 2\n"), ("def swap(p):\n", "    return p[1], p[0]\n")]
TEACHER_A = [("def add(a, b):\n", "    result = a + b\n    return result\n"),
             ("def neg(x):\n", "    return 0 - x\n")]
TEACHER_B = [("def add(a, b):\n", "    return sum([a, b])\n"),
             ("def neg(x):\n", "    y = -1 * x\n    return y\n")]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    cache: Path = tmp_path_factory.mktemp("eq2-cache")
    loaded = load_model(resolve_model("tiny-llama", cache_dir=cache), lora=LoraSettings(dropout=0.0),
                        threads=1, seed=0)
    settings = TrainSettings(lr=1e-2, kd_lr=1e-2, micro_batch=2, effective_batch=4, max_len=64, warmup_steps=1)
    return Trainer(loaded.model, loaded.tokenizer, settings, seed=0, model_type=loaded.model_type,
                   device=loaded.device)


def adapter_after(trainer: Trainer, kd: Sequence[tuple[str, str]], local: Sequence[tuple[str, str]],
                  a_kd: float) -> list[torch.Tensor]:
    """The adapter after two Eq. 2 steps from a fixed starting point (then undone)."""
    snap = trainer.snapshot()
    try:
        kd_ex: list[Example] = trainer.encode_pairs(kd)
        trainer.kd_phase(kd_ex, trainer.encode_pairs(local), a_kd, round_idx=0, steps=2)
        return [p.detach().clone() for p in trainer.params]
    finally:
        trainer.restore(snap)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_kd_zero_ignores_the_teachers_text(trainer: Trainer) -> None:
    with_a = adapter_after(trainer, TEACHER_A, LOCAL_A, 0.0)
    assert same(with_a, adapter_after(trainer, TEACHER_B, LOCAL_A, 0.0))
    assert same(with_a, adapter_after(trainer, [], LOCAL_A, 0.0)), "a_KD = 0 must be the no-teacher step"
    start = [p.detach().clone() for p in trainer.params]
    assert not same(with_a, start), "the local term moved nothing: the test would be vacuous"
    # control: with weight on the teacher term, the teacher's text matters
    assert not same(adapter_after(trainer, TEACHER_A, LOCAL_A, 0.5), adapter_after(trainer, TEACHER_B, LOCAL_A, 0.5))


def test_a_kd_one_ignores_the_local_loss(trainer: Trainer) -> None:
    with_a = adapter_after(trainer, TEACHER_A, LOCAL_A, 1.0)
    assert same(with_a, adapter_after(trainer, TEACHER_A, LOCAL_B, 1.0))
    assert not same(with_a, adapter_after(trainer, TEACHER_B, LOCAL_A, 1.0)), "the teacher term moved nothing"
    # control: with weight on the local term, the local data matters
    assert not same(adapter_after(trainer, TEACHER_A, LOCAL_A, 0.5), adapter_after(trainer, TEACHER_A, LOCAL_B, 0.5))

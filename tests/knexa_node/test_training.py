"""Completion-only loss, local epochs and AKD (Eq. 2) move only the adapter, deterministically."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from knexa_node.backend import Answer
from knexa_node.models import LoraSettings, load_model, resolve_model
from knexa_node.training import (
    IGNORE,
    Trainer,
    TrainSettings,
    a_kd_schedule,
    collate,
    encode,
    token_loss_sum,
)

PAIRS = [
    ("def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "    return a + b\n"),
    ("def neg(x):\n    \"\"\"Negate x.\"\"\"\n", "    return -x\n"),
    ("def first(xs):\n    \"\"\"First element.\"\"\"\n", "    return xs[0]\n"),
    ("def is_even(n):\n    \"\"\"True if n is even.\"\"\"\n", "    return n % 2 == 0\n"),
]


@pytest.fixture
def tiny_llama(model_cache: Path):  # noqa: ANN201 - LoadedModel
    return load_model(resolve_model("tiny-llama", cache_dir=model_cache), lora=LoraSettings(dropout=0.0),
                      threads=1, seed=0)


def _trainer(loaded, **kw) -> Trainer:  # noqa: ANN001
    settings = TrainSettings(**{"lr": 1e-2, "micro_batch": 2, "effective_batch": 4, "max_len": 64, **kw})
    return Trainer(loaded.model, loaded.tokenizer, settings, seed=0, model_type=loaded.model_type,
                   device=loaded.device)


def test_prompt_tokens_are_masked(tiny_llama) -> None:  # noqa: ANN001
    tok = tiny_llama.tokenizer
    prompt, completion = PAIRS[0]
    ex = encode(tok, prompt, completion, max_len=64)
    n_prompt = len(tok(prompt)["input_ids"])
    assert all(x == IGNORE for x in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])
    assert ex.labels[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:], skip_special_tokens=True) == completion
    assert ex.n_targets == len(tok(completion, add_special_tokens=False)["input_ids"]) + 1


def test_truncation_keeps_the_answer(tiny_llama) -> None:  # noqa: ANN001
    ex = encode(tiny_llama.tokenizer, "x = 1\n" * 100, "    return 1\n" * 100, max_len=40)
    assert len(ex.input_ids) == 40 and ex.n_targets >= 19


def test_loss_counts_only_completion_tokens(tiny_llama) -> None:  # noqa: ANN001
    """Our fast path (head on completion positions only) equals HF's masked loss; prompts don't count."""
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    model.eval()
    batch = collate([encode(tok, p, c, 64) for p, c in PAIRS], tok.pad_token_id, "cpu")
    with torch.no_grad():
        fast, n = token_loss_sum(model, batch, "llama")
        slow, n2 = token_loss_sum(model, batch, "unknown-type")  # full-logits fallback
        hf = model(**batch).loss
    assert n == n2 == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(fast / n, hf, atol=1e-5) and torch.allclose(fast, slow, atol=1e-4)
    examples = [encode(tok, p, c, 64) for p, c in PAIRS]
    assert n == sum(e.n_targets for e in examples)  # exactly the completion tokens (+eos)
    assert n == sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in PAIRS)


def test_accumulation_equals_one_big_batch(model_cache: Path) -> None:
    grads = []
    for micro in (1, 4):
        loaded = load_model(resolve_model("tiny-gpt2", cache_dir=model_cache), lora=LoraSettings(dropout=0.0),
                            threads=1, seed=0)
        tr = _trainer(loaded, micro_batch=micro, grad_clip=0.0)
        tr._step([(1.0, tr.encode_pairs(PAIRS))], 0.0)  # lr 0: only look at the gradient through Adam state
        grads.append(torch.cat([tr.optimizer.state[p]["exp_avg"].flatten() for p in tr.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_warmup_then_constant(tiny_llama) -> None:  # noqa: ANN001
    tr = _trainer(tiny_llama, warmup_steps=4)
    assert tr.lr_at(1.0) == 0.25
    tr.step = 3
    assert tr.lr_at(1.0) == 1.0
    tr.step = 100
    assert tr.lr_at(1.0) == 1.0


def test_a_kd_schedule() -> None:
    assert a_kd_schedule(0, 20) == pytest.approx(0.2)
    assert a_kd_schedule(19, 20) == pytest.approx(0.5)
    assert a_kd_schedule(10, 21) == pytest.approx(0.35)
    assert a_kd_schedule(50, 20) == pytest.approx(0.5) and a_kd_schedule(0, 1) == pytest.approx(0.5)


def test_local_epoch_moves_adapter_not_base(make_backend: Callable) -> None:
    node = make_backend("tiny-qwen2")
    adapter, base, loss0 = node.adapter_fingerprint(), node.base_fingerprint(), node.validation_loss()
    report = node.train_local_epoch(0)
    assert report.steps == math.ceil(len(node.data.train) / 8) and report.examples == len(node.data.train)
    assert node.adapter_fingerprint() != adapter and node.base_fingerprint() == base
    assert node.validation_loss() != loss0


def test_training_is_deterministic_under_seed(make_backend: Callable) -> None:
    runs = []
    for _ in range(2):
        node = make_backend("tiny-gptneox", lora_dropout=0.1)
        node.train_local_epoch(0)
        runs.append((node.adapter_fingerprint(), node.validation_loss()))
    assert runs[0] == runs[1]
    other = make_backend("tiny-gptneox", lora_dropout=0.1, seed=43)
    other.train_local_epoch(0)
    assert other.adapter_fingerprint() != runs[0][0]


def test_kd_across_tokenizers_gpt2_teacher_llama_student(make_backend: Callable) -> None:
    teacher = make_backend("tiny-gpt2", node=1)
    student = make_backend("tiny-llama", node=0)
    assert teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab()
    prompts = teacher.transfer_prompts()
    assert prompts == student.transfer_prompts()
    answers = teacher.generate_answers(prompts)
    # random tiny teachers may emit nothing useful; add a real answer so KD certainly has text
    answers.append(Answer(prompts[0][0], "    return sorted(set(x))\n"))
    adapter, base = student.adapter_fingerprint(), student.base_fingerprint()
    report = student.distill(answers, round_idx=1, total_rounds=3)
    assert report.steps >= 1 and report.examples >= 1 and math.isfinite(report.mean_loss)
    assert student.adapter_fingerprint() != adapter and student.base_fingerprint() == base


def test_kd_ignores_unknown_tasks_and_empty_answers(make_backend: Callable, caplog: pytest.LogCaptureFixture) -> None:
    student = make_backend("tiny-llama")
    adapter = student.adapter_fingerprint()
    report = student.distill([Answer("Not/InTransfer", "    return 1\n"), Answer(student.transfer_prompts()[0][0], "  ")],
                             round_idx=0, total_rounds=3)
    assert report.steps == 0 and student.adapter_fingerprint() == adapter
    assert "ignored 2 of 2" in caplog.text


def test_gradient_checkpointing_gives_the_same_gradient(model_cache: Path) -> None:
    grads = []
    for gc in (False, True):
        loaded = load_model(resolve_model("tiny-llama", cache_dir=model_cache), lora=LoraSettings(dropout=0.0),
                            threads=1, seed=0, gradient_checkpointing=gc)
        loaded.model.train()
        tr = _trainer(loaded, grad_clip=0.0)
        tr._step([(1.0, tr.encode_pairs(PAIRS))], 0.0)
        grads.append(torch.cat([tr.optimizer.state[p]["exp_avg"].flatten() for p in tr.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)

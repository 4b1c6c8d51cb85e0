"""TorchBackend end to end on tiny models: config, evaluation, packages, checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from knexa_node.backend import Answer, EvalReport, ModelBackend
from knexa_node.models import ModelLoadError
from knexa_node.torch_backend import LearningConfig, TorchBackend


def test_learning_config_defaults_follow_spec() -> None:
    cfg = LearningConfig()
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lr, cfg.kd_lr) == (8, 32, 3e-5, 5e-5)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == (0.9, 0.98, 1e-6)
    assert (cfg.effective_batch, cfg.warmup_frac, cfg.grad_clip) == (32, 0.02, 1.0)
    assert cfg.micro_batch == 0  # auto: 8 on CUDA, 1 on CPU; the optimizer step is the same
    assert (cfg.a_kd_start, cfg.a_kd_end, cfg.seed) == (0.2, 0.5, 42)
    for f in dataclasses.fields(cfg):  # plain TOML scalars only
        assert f.type in ("int", "float", "str", "bool"), f.name


def test_learning_config_validation() -> None:
    with pytest.raises(ValueError) as info:
        LearningConfig(lr=-1.0, micro_batch=8, effective_batch=30, top_p=2.0, device="tpu")
    for part in ("lr must be >= 0", "multiple of micro_batch", "top_p must be in [0, 1]", "device must be"):
        assert part in str(info.value)
    with pytest.raises(ValueError, match="unknown learning settings"):
        LearningConfig.from_dict({"lr": 1e-4, "learning_rate": 1})
    assert LearningConfig.from_dict({"lr": 1e-4}).lr == 1e-4


def test_implements_the_backend_protocol() -> None:
    for name, member in inspect.getmembers(ModelBackend, inspect.isfunction):
        if not name.startswith("_"):
            impl = getattr(TorchBackend, name)
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(member).parameters), name


def test_create_and_evaluate(make_backend: Callable) -> None:
    node = make_backend("tiny-llama")
    assert node.family == "llama" and node.model_name == "tiny-llama"
    report = node.evaluate(0)
    assert isinstance(report, EvalReport) and report.n_problems == 2
    assert math.isfinite(report.val_loss) and report.perplexity == pytest.approx(math.exp(report.val_loss))
    assert 0.0 <= report.pass_at_1 <= 1.0 and 0.0 <= report.codebleu <= 1.0
    hist = node.category_histogram()
    assert hist.shape == (12,) and np.isclose(hist.sum(), 1.0)


def test_auto_micro_batch_on_cpu(make_backend: Callable) -> None:
    assert make_backend("tiny-gpt2", micro_batch=0).trainer.settings.micro_batch == 1
    assert make_backend("tiny-gpt2", micro_batch=4).trainer.settings.micro_batch == 4


def test_families_map_to_protocol(make_backend: Callable) -> None:
    assert make_backend("tiny-gptneox").family == "gpt_neox"
    assert make_backend("tiny-gpt2").family == "gpt2"
    assert make_backend("tiny-qwen2").family == "qwen"


def test_teacher_package_and_guardrail(make_backend: Callable) -> None:
    node = make_backend("tiny-gpt2", node=1)
    prompts = node.transfer_prompts()
    assert len(prompts) == 4 and all(tid.startswith("HumanEval/") for tid, _ in prompts)
    answers = node.generate_answers(prompts)
    assert [a.task_id for a in answers] == [t for t, _ in prompts]
    private = node.data.train[0]
    leak = Answer(prompts[0][0], private["prompt"] + private["canonical_solution"])
    kept, report = node.filter_outgoing([*answers, leak])
    assert leak not in kept and report.blocked >= 1 and report.kept == len(kept)


def test_checkpoint_round_trip(make_backend: Callable, tmp_path: Path) -> None:
    node = make_backend("tiny-llama")
    assert node.load_checkpoint(tmp_path / "ckpt") is False
    node.train_local_epoch(0)
    saved_fp, saved_step, saved_loss = node.adapter_fingerprint(), node.trainer.step, node.validation_loss()
    node.save_checkpoint(tmp_path / "ckpt")
    node.save_checkpoint(tmp_path / "ckpt")  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or aside copies left
    assert not any(p.name == "model.safetensors" for p in (tmp_path / "ckpt").iterdir())  # never the base
    node.train_local_epoch(1)
    assert node.adapter_fingerprint() != saved_fp

    fresh = make_backend("tiny-llama")
    assert fresh.load_checkpoint(tmp_path / "ckpt") is True
    assert fresh.adapter_fingerprint() == saved_fp and fresh.trainer.step == saved_step
    assert fresh.validation_loss() == pytest.approx(saved_loss)
    # the restored optimizer continues exactly like the original would have
    node.load_checkpoint(tmp_path / "ckpt")
    node.train_local_epoch(1)
    fresh.train_local_epoch(1)
    assert fresh.adapter_fingerprint() == node.adapter_fingerprint()


def test_interrupted_swap_falls_back_to_aside_copy(make_backend: Callable, tmp_path: Path) -> None:
    node = make_backend("tiny-gpt2")
    node.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # crash between the two renames
    assert node.load_checkpoint(tmp_path / "ckpt") is True


def test_checkpoint_of_another_base_is_refused(make_backend: Callable, tmp_path: Path) -> None:
    make_backend("tiny-gpt2").save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="trained on base"):
        make_backend("tiny-gptneox").load_checkpoint(tmp_path / "ckpt")


def test_unknown_model_fails_fast(split_dir: Path, model_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model alias"):
        TorchBackend.create("gpt-5", split_dir / "node-0", LearningConfig(), cache_dir=model_cache)

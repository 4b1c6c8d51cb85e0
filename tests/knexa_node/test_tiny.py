"""Tiny presets: offline, deterministic, two genuinely different tokenizers, usable by generate()."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from knexa_node.models import prepare_model
from knexa_node.tiny import FAMILIES, build_tiny, build_tokenizer, corpus


def test_corpus_is_humaneval_in_task_order() -> None:
    texts = corpus()
    assert len(texts) == 164 and texts[0].startswith("from typing import List")


@pytest.mark.parametrize("style", ["bytelevel", "llama"])
def test_tokenizer_is_deterministic_and_lossless(style: str) -> None:
    a, b = build_tokenizer(style), build_tokenizer(style)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    for text in [corpus()[3], "    return [x for x in y]\n", "héllo ✓\twörld\n\n"]:
        ids = a(text, add_special_tokens=False)["input_ids"]
        assert a.decode(ids, skip_special_tokens=True) == text
    assert None not in (a.eos_token_id, a.pad_token_id, a.bos_token_id)


def test_styles_really_differ() -> None:
    gpt, llama = build_tokenizer("bytelevel"), build_tokenizer("llama")
    text = "def add(a, b):\n    return a + b\n"
    assert gpt.tokenize(text) != llama.tokenize(text)
    assert len(gpt) != len(llama) and llama.eos_token == "</s>" and gpt.eos_token == "<|endoftext|>"
    # prompt and completion tokenized apart concatenate to the same text (training relies on it)
    for tok in (gpt, llama):
        p, c = text[:15], text[15:]
        ids = tok(p, add_special_tokens=False)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_weights_are_seeded(tmp_path: Path) -> None:
    digests = []
    for out in (tmp_path / "a", tmp_path / "b"):
        build_tiny("qwen2", out)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_unknown_family_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny("mamba", tmp_path)
    assert set(FAMILIES) == {"llama", "qwen2", "gpt_neox", "gpt2"}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gptneox", "tiny-gpt2"])
def test_presets_generate(model_cache: Path, preset: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = prepare_model(preset, cache_dir=model_cache)
    tok = AutoTokenizer.from_pretrained(spec.path)
    model = AutoModelForCausalLM.from_pretrained(spec.path)
    assert sum(p.numel() for p in model.parameters()) < 400_000
    tok.padding_side = "left"
    enc = tok(["def f(x):\n", "def longer(a, b, c):\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 5

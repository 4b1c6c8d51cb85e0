"""Small models for the skills benchmark: a public base per family, then each client's own model.

Why two stages (../shared/SKILLS-BENCH-NOTES.md): a tiny model learns *new syntax* from a few
dozen distilled texts far too slowly for a round to matter, but learns a new *fact* quickly. So,
as with real LLMs, every family first learns the shared syntax from the public corpus
(:func:`knexa_lab.skills.problems.public_corpus`), once per (family, seed); then each client
fine-tunes that base on its own private shard, which teaches it the hidden rules of the
categories it holds data for. The client's result is the frozen base its node runs with LoRA.

Three families with three different tokenizers (all trained on the public corpus, so nothing
private shapes a vocabulary): GPT-2 byte-level BPE (512), GPT-NeoX byte-level BPE (384) and
Llama-style SentencePiece BPE with byte fallback. Everything is cached on disk under a key of
(family, seed, settings, shard) and built through :func:`knexa_node.models.build_once`, so
parallel runs build each model once.

The real-model variant (``skills-smollm2``, preset ``skills-smollm2``) skips the first stage: its
public base is the embedded SmolLM2-135M-Instruct (:func:`knexa_node.models.prepare_embedded`),
which already writes Python; each client fine-tunes all of it on its own shard, as above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .problems import public_corpus

__all__ = ["PretrainSettings", "SKILL_FAMILIES", "SMOLLM2", "base_model", "build_base", "build_client_model",
           "client_model_dir", "model_key", "skills_family"]

logger = logging.getLogger(__name__)

#: family -> (tokenizer style, vocabulary size)
SKILL_FAMILIES: dict[str, tuple[str, int]] = {"gpt2": ("bytelevel", 512), "gpt_neox": ("bytelevel", 384),
                                              "llama": ("llama", 600)}


#: the real-model family: its base is the embedded SmolLM2-135M, not trained here
SMOLLM2 = "smollm2"

#: model names a skills preset lists (one per client) -> family
SKILL_MODELS: dict[str, str] = {"skills-gpt2": "gpt2", "skills-gptneox": "gpt_neox", "skills-llama": "llama",
                                "skills-smollm2": SMOLLM2}


def skills_family(name: str) -> str:
    """The family of a skills model name (``skills-gpt2`` ...); ValueError names the known ones."""
    if name not in SKILL_MODELS:
        raise ValueError(f"unknown skills model {name!r}; known: {', '.join(SKILL_MODELS)}")
    return SKILL_MODELS[name]


@dataclass(frozen=True, slots=True)
class PretrainSettings:
    """Sizes and schedules of both stages (a field of the preset's ``[skills]`` table)."""

    hidden: int = 128
    layers: int = 2
    public_examples: int = 3000
    base_steps: int = 400
    client_steps: int = 150
    batch: int = 32
    lr: float = 3e-3
    threads: int = 1


def model_key(*parts: Any) -> str:
    """A short stable hash of what a cached model depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer(family: str, texts: list[str]) -> Any:
    from knexa_node.tiny import build_tokenizer

    style, vocab = SKILL_FAMILIES[family]
    return build_tokenizer(style, texts, vocab_size=vocab)


def _train(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], steps: int, s: PretrainSettings, seed: int,
           model_type: str) -> float:
    """Full-parameter training on (prompt, solution) pairs, loss on the solution only."""
    import numpy as np
    import torch

    from knexa_node.training import Trainer, TrainSettings

    torch.set_num_threads(max(s.threads, 1))
    trainer = Trainer(model, tok, TrainSettings(lr=s.lr, micro_batch=s.batch, effective_batch=s.batch,
                                                warmup_steps=max(steps // 20, 1), grad_clip=1.0, max_len=96),
                      seed=seed, model_type=model_type, device=torch.device("cpu"))
    examples = trainer.encode_pairs(pairs)
    rng = np.random.default_rng(seed)
    model.train()
    loss = float("nan")
    for step in range(steps):
        batch = [examples[i] for i in rng.choice(len(examples), size=min(s.batch, len(examples)), replace=False)]
        # cosine decay to 10%: the fast jump the notes describe needs a high rate early
        lr = s.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / max(steps, 1))))
        loss = trainer._step([(1.0, batch)], lr)[0]
    model.eval()
    return loss


def build_base(family: str, cache: Path, seed: int, s: PretrainSettings) -> Path:
    """The public base of ``family`` (tokenizer + model trained on the public corpus), cached."""
    from knexa_node.models import build_once

    if family not in SKILL_FAMILIES:
        raise ValueError(f"unknown skills family {family!r}; known: {', '.join(SKILL_FAMILIES)}")
    target = Path(cache) / f"base-{family}-{model_key(family, seed, asdict(s))}"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        from knexa_node.tiny import tiny_config

        corpus = public_corpus(s.public_examples, seed)
        tok = _tokenizer(family, [p + c for p, c in corpus])
        config = tiny_config(family, tok, hidden=s.hidden, layers=s.layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{family}/{seed}".encode()))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            loss = _train(model, tok, corpus, s.base_steps, s, seed, config.model_type)
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        logger.info("skills base %s seed=%d: %d steps, final loss %.4f", family, seed, s.base_steps, loss)

    return build_once(target, build)


#: the settings a SmolLM2 client depends on (it has no first stage, so the rest cannot change it)
_CLIENT_STAGE = ("client_steps", "batch", "lr", "threads")


def base_model(family: str, cache: Path, s: PretrainSettings) -> Path:
    """The public base a client of ``family`` starts from: one for all seeds, like a real LLM.

    ``cache`` is the skills cache (``<cache_dir>/skills``); the embedded SmolLM2 is converted
    into its parent, where every other command finds it too.
    """
    if family == SMOLLM2:
        from knexa_node.models import prepare_embedded

        return prepare_embedded(Path(cache).parent)
    return build_base(family, cache, 0, s)


def _shard(train: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    return [(p["prompt"], p["canonical_solution"]) for p in train]


def client_model_dir(family: str, train: Sequence[dict[str, str]], cache: Path, seed: int,
                     s: PretrainSettings) -> Path:
    """Where a client's model is cached: keyed by everything it depends on, and nothing else."""
    settings = asdict(s) if family != SMOLLM2 else {k: v for k, v in asdict(s).items() if k in _CLIENT_STAGE}
    return Path(cache) / f"client-{family}-{model_key(family, seed, settings, _shard(train))}"


def build_client_model(family: str, train: Sequence[dict[str, str]], cache: Path, seed: int,
                       s: PretrainSettings) -> Path:
    """A client's own model: its family's base fine-tuned on its private shard, cached."""
    from knexa_node.models import build_once

    base = base_model(family, cache, s)
    shard = _shard(train)
    target = client_model_dir(family, train, cache, seed, s)

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"client/{seed}".encode()))
            loss = _train(model, tok, shard, s.client_steps, s, seed, model.config.model_type)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        logger.info("skills client model %s (%d problems): %d steps, final loss %.4f", family, len(shard),
                    s.client_steps, loss)

    return build_once(target, build)

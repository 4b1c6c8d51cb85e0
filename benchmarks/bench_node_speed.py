"""Node speed on the embedded SmolLM2-135M: KNEXA's generation and training versus plain HF calls.

Two comparisons, each against a baseline measured in the same run on the same loaded model
(frozen base + LoRA, the node's own PeftModel), same prompts, same batch and same thread count:

* generation: :func:`knexa_node.generation.generate` (left-padded batches sorted by length,
  stop at the end of the function, KV cache on) versus a plain ``model.generate`` over the same
  batches with greedy decoding and ``use_cache=True``. Both are counted in generated tokens per
  second (padding excluded); the plain call runs to ``max_new_tokens`` or EOS, ours stops when
  every row has finished its function, so tokens/s is the fair measure. Target: ours within
  1.3x of plain. A third line runs ours on a model loaded with gradient checkpointing on, to
  show nothing of it leaks into generation.
* training: :meth:`knexa_node.training.Trainer.train_epoch` (completion-only loss, micro-batch 1,
  AdamW) versus a plain loop of ``model(input_ids, labels=...).loss.backward()`` and one AdamW
  step over the same examples, in samples per second.

    python -m benchmarks node_speed
    python benchmarks/bench_node_speed.py --model smollm2-135m --prompts 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import save


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--examples", type=int, default=8, help="training examples (one epoch, effective batch = all)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=None)
    return p


def _plain_generate(model: Any, tok: Any, prompts: list[str], batch_size: int, max_new: int) -> tuple[float, int]:
    """Plain HF: the same left-padded, length-sorted batches, greedy, KV cache, no stopping rule."""
    import torch

    order = sorted(prompts, key=lambda p: len(tok(p)["input_ids"]))
    side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    tokens = 0
    t0 = time.perf_counter()
    try:
        for i in range(0, len(order), batch_size):
            enc = tok(order[i:i + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, use_cache=True,
                                     pad_token_id=tok.pad_token_id)
            tokens += int((out[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
    finally:
        tok.padding_side = side
    return time.perf_counter() - t0, tokens


def _plain_train(model: Any, tok: Any, pairs: list[tuple[str, str]], max_len: int) -> float:
    """Plain HF loop: full-sequence loss (prompt tokens included), one AdamW step over all examples."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)
    model.train()
    t0 = time.perf_counter()
    for prompt, completion in pairs:
        ids = tok(prompt + completion, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss / len(pairs)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv or [])
    from knexa_node.data import load_problems
    from knexa_node.generation import (
        GenerationSettings,
        format_prompt,
        generate,
        training_target,
        uses_chat,
    )
    from knexa_node.models import LoraSettings, default_cache_dir, load_model, resolve_model
    from knexa_node.training import Trainer, TrainSettings

    cache = args.cache_dir or default_cache_dir()
    spec = resolve_model(args.model, cache_dir=cache)
    loaded = load_model(spec, lora=LoraSettings(dropout=0.0), threads=args.threads, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    problems = load_problems()
    prompts = [format_prompt(tok, p["prompt"]) for p in problems[:args.prompts]]
    entry = [p["entry_point"] for p in problems[:args.prompts]]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.prompts)

    _plain_generate(model, tok, prompts[:2], 2, 4)  # warm-up: first-call allocations
    plain_s, plain_tok = _plain_generate(model, tok, prompts, args.prompts, args.max_new_tokens)
    ours = generate(model, tok, prompts, settings=settings, entry_points=entry)
    ours_tps, plain_tps = ours.new_tokens / ours.seconds, plain_tok / plain_s

    gc = load_model(spec, lora=LoraSettings(dropout=0.0), threads=args.threads, device="cpu",
                    gradient_checkpointing=True)
    ours_gc = generate(gc.model, gc.tokenizer, prompts, settings=settings, entry_points=entry)
    gc_tps = ours_gc.new_tokens / ours_gc.seconds
    del gc

    chat = uses_chat(tok)
    pairs = [(format_prompt(tok, p["prompt"]), training_target(p["prompt"], p["canonical_solution"], chat))
             for p in problems[:args.examples]]
    trainer = Trainer(model, tok, TrainSettings(lr=0.0, micro_batch=1, effective_batch=args.examples,
                                                max_len=args.max_len), seed=0, model_type=loaded.model_type,
                      device=loaded.device)
    report = trainer.train_epoch(trainer.encode_pairs(pairs), 0)
    plain_train_s = _plain_train(model, tok, pairs, args.max_len)
    ours_sps, plain_sps = report.examples / report.seconds, len(pairs) / plain_train_s

    result = {
        "model": args.model, "threads": args.threads, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "generation": {"knexa_s": ours.seconds, "knexa_tokens": ours.new_tokens, "knexa_tok_per_s": ours_tps,
                       "plain_s": plain_s, "plain_tokens": plain_tok, "plain_tok_per_s": plain_tps,
                       "plain_over_knexa_tok_per_s": plain_tps / ours_tps,
                       "grad_ckpt_model_tok_per_s": gc_tps, "knexa_over_grad_ckpt": ours_tps / gc_tps},
        "training": {"examples": report.examples, "knexa_s": report.seconds, "knexa_samples_per_s": ours_sps,
                     "plain_s": plain_train_s, "plain_samples_per_s": plain_sps,
                     "plain_over_knexa": plain_sps / ours_sps},
    }
    print(f"node speed {args.model}: {len(prompts)} prompts, <= {args.max_new_tokens} new tokens, "
          f"{args.examples} training examples, {args.threads} thread(s)")
    print(f"  generate  knexa {ours.seconds:7.2f} s {ours.new_tokens:5d} tok {ours_tps:7.1f} tok/s | plain "
          f"model.generate {plain_s:7.2f} s {plain_tok:5d} tok {plain_tps:7.1f} tok/s | plain/knexa "
          f"{plain_tps / ours_tps:.2f}x (target <= 1.3x)")
    print(f"  generate  on a gradient-checkpointing model: {gc_tps:7.1f} tok/s | knexa/that {ours_tps / gc_tps:.2f}x")
    print(f"  train     knexa {report.seconds:7.2f} s {ours_sps:6.2f} samples/s | plain HF loop {plain_train_s:7.2f} s "
          f"{plain_sps:6.2f} samples/s | plain/knexa {plain_sps / ours_sps:.2f}x")
    print(f"saved {save(f'node-speed-{args.model}', result)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

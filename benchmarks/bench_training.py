"""Training throughput: micro-batch sizes for the same 8-example optimizer step (8 vs 1 by
default), and the completion-only LM head versus full-vocabulary logits (same loss, micro-batch).

Tiny model by default; ``--model smollm2-135m`` for the embedded real model (49k vocabulary,
where skipping prompt-position logits matters most).

    python -m benchmarks training
    python benchmarks/bench_training.py --model smollm2-135m
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
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--examples", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-len", type=int, default=None, help="default 256 (tiny) or 384")
    p.add_argument("--micro", default="8,1", help="micro-batch sizes to compare; the first is the baseline "
                   "(8 at 384 tokens needs ~11 GB for SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=None, help="best of N (default 3 tiny, 1 real)")
    p.add_argument("--cache-dir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv or [])
    from knexa_node.data import load_problems
    from knexa_node.generation import format_prompt, training_target, uses_chat
    from knexa_node.models import LoraSettings, default_cache_dir, load_model, resolve_model
    from knexa_node.training import Trainer, TrainSettings

    tiny = args.model.startswith("tiny-")
    max_len = args.max_len or (256 if tiny else 384)
    repeat = args.repeat or (3 if tiny else 1)
    loaded = load_model(resolve_model(args.model, cache_dir=args.cache_dir or default_cache_dir()),
                        lora=LoraSettings(), threads=args.threads)
    tok = loaded.tokenizer
    chat = uses_chat(tok)
    pairs = [(format_prompt(tok, p["prompt"]), training_target(p["prompt"], p["canonical_solution"], chat))
             for p in load_problems()[:args.examples]]

    def step_time(micro: int, model_type: str) -> float:
        trainer = Trainer(loaded.model, tok, TrainSettings(micro_batch=micro, effective_batch=args.examples,
                                                           max_len=max_len), seed=0, model_type=model_type,
                          device=loaded.device)
        examples = trainer.encode_pairs(pairs)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            trainer._step([(1.0, examples)], 0.0)  # lr 0: the weights stay put between repeats
            best = min(best, time.perf_counter() - t0)
        return best

    n_tokens = sum(len(e.input_ids) for e in Trainer(loaded.model, tok, TrainSettings(max_len=max_len), seed=0,
                                                     model_type=loaded.model_type,
                                                     device=loaded.device).encode_pairs(pairs))
    n = args.examples
    micros = [int(m) for m in args.micro.split(",")]
    times = {m: step_time(m, loaded.model_type) for m in micros}
    head_micro = min(micros)
    full = step_time(head_micro, "full-logits")
    base = times[micros[0]]
    result = {
        "model": args.model, "examples": n, "tokens": n_tokens, "max_len": max_len, "threads": args.threads,
        "step_s": {str(m): t for m, t in times.items()},
        "samples_per_s": {str(m): n / t for m, t in times.items()},
        "speedup_vs_first": {str(m): base / t for m, t in times.items()},
        "full_logits_s": full, "full_logits_micro": head_micro,
        "speedup_completion_head": full / times[head_micro],
    }
    print(f"training {args.model}: one optimizer step over {n} examples ({n_tokens} tokens), {args.threads} thread(s)")
    for m, t in times.items():
        print(f"  micro-batch {m}: {t:7.2f} s  {n / t:6.2f} samples/s   ratio vs micro-batch {micros[0]}: "
              f"{base / t:.2f}x")
    print(f"  full-vocab logits (micro-batch {head_micro}): {full:7.2f} s   "
          f"ratio completion-only head = {full / times[head_micro]:.2f}x")
    name = "training" if args.model == "tiny-llama" else f"training-{args.model}"
    print(f"saved {save(name, result)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

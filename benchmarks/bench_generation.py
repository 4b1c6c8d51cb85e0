"""Teacher-answer generation: batched (left-padded) versus one prompt at a time, same prompts.

Both runs decode greedily the same HumanEval prompts with the node's stop-at-end-of-function
rule; throughput counts generated tokens (padding after a finished row excluded). Tiny model by
default (seconds); ``--model smollm2-135m`` measures the embedded real model.

    python -m benchmarks generation
    python benchmarks/bench_generation.py --model smollm2-135m --prompts 8 --max-new-tokens 128
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
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (tiny) or 128")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=None, help="best of N (default 3 tiny, 1 real)")
    p.add_argument("--cache-dir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv or [])
    from knexa_node.data import load_problems
    from knexa_node.generation import GenerationSettings, format_prompt, generate
    from knexa_node.models import LoraSettings, default_cache_dir, load_model, resolve_model

    tiny = args.model.startswith("tiny-")
    max_new = args.max_new_tokens or (32 if tiny else 128)
    repeat = args.repeat or (3 if tiny else 1)
    t0 = time.perf_counter()
    loaded = load_model(resolve_model(args.model, cache_dir=args.cache_dir or default_cache_dir()),
                        lora=LoraSettings(), threads=args.threads)
    load_s = time.perf_counter() - t0
    problems = load_problems()[:args.prompts]
    prompts = [format_prompt(loaded.tokenizer, p["prompt"]) for p in problems]
    entry = [p["entry_point"] for p in problems]

    def run(batch_size: int) -> tuple[float, int]:
        settings = GenerationSettings(max_new_tokens=max_new, batch_size=batch_size)
        best, tokens = float("inf"), 0
        for _ in range(repeat):
            res = generate(loaded.model, loaded.tokenizer, prompts, settings=settings, entry_points=entry)
            if res.seconds < best:
                best, tokens = res.seconds, res.new_tokens
        return best, tokens

    batched_s, batched_tok = run(len(prompts))
    single_s, single_tok = run(1)
    result = {
        "model": args.model, "prompts": len(prompts), "max_new_tokens": max_new, "threads": args.threads,
        "load_s": load_s, "batched_s": batched_s, "batched_tokens": batched_tok,
        "batched_tok_per_s": batched_tok / batched_s, "sequential_s": single_s, "sequential_tokens": single_tok,
        "sequential_tok_per_s": single_tok / single_s,
        "speedup_tok_per_s": (batched_tok / batched_s) / (single_tok / single_s),
        "speedup_wall": single_s / batched_s,
    }
    print(f"generation {args.model}: {len(prompts)} prompts x <= {max_new} new tokens, {args.threads} thread(s)")
    print(f"  batched    {batched_s:7.2f} s  {batched_tok:5d} tokens  {result['batched_tok_per_s']:7.1f} tok/s")
    print(f"  one by one {single_s:7.2f} s  {single_tok:5d} tokens  {result['sequential_tok_per_s']:7.1f} tok/s")
    print(f"  ratio batched/one-by-one: {result['speedup_tok_per_s']:.2f}x tok/s, {result['speedup_wall']:.2f}x wall")
    name = "generation" if args.model == "tiny-llama" else f"generation-{args.model}"
    print(f"saved {save(name, result)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

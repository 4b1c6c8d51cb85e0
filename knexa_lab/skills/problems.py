"""A seeded generator of function-writing problems whose ground truth is known, in 12 categories.

Why: HumanEval with a 135M model on two CPU cores cannot show whether *matching* matters. Here
every category (one per bin of the profile's data histogram, ``protocol.CATEGORIES``) hides one
fixed *house rule* (``return x * 7``, ``return x % 4``, ...). A prompt only names the category
("Apply the circle rule to v."), never the rule, so a model can only solve a category it has
seen solved: in its own private data, or in a teacher's answers. Which client knows which
category is set by the Dirichlet split, so the best teacher for a student is known exactly.

The *public* corpus (:func:`public_corpus`) states its rule in words ("Return v times 3."): it
teaches every model the shared syntax (a one-line ``return`` with an operator and a digit,
copying the argument's name), like the public pre-training of a real LLM, and nothing about the
private rules.

Every problem is HumanEval-shaped (``task_id, prompt, canonical_solution, test, entry_point``)
and scored by the same sandbox and Pass@k code. Instances (function name, argument, phrasing)
are drawn without replacement from disjoint pools per set, so test problems never repeat a
training or transfer instance (tests/knexa_lab/test_skills.py checks it, and that
:func:`knexa_node.categories.classify` puts each prompt in its own category).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol._layout import CATEGORIES

__all__ = ["CUES", "RULES", "Rule", "SETS", "generate", "public_corpus", "rule_of"]


@dataclass(frozen=True, slots=True)
class Rule:
    """``return <arg> <op> <k>``: what a category's hidden house rule computes."""

    op: str
    k: int

    def body(self, arg: str) -> str:
        return f"    return {arg} {self.op} {self.k}\n"

    def apply(self, x: int) -> int:
        return int(eval(f"{x} {self.op} {self.k}"))  # op is one of five fixed operators


#: category -> its hidden rule; operators repeat across categories so a wrong guess is plausible
RULES: dict[str, Rule] = {
    "strings": Rule("+", 7), "arithmetic": Rule("*", 3), "number_theory": Rule("%", 4),
    "lists": Rule("-", 2), "sorting_searching": Rule("//", 2), "dicts_sets": Rule("*", 5),
    "recursion_dp": Rule("+", 9), "parsing_formatting": Rule("%", 7), "logic_conditions": Rule("-", 8),
    "geometry": Rule("*", 7), "counting_combinatorics": Rule("//", 3), "other": Rule("+", 4),
}
#: category -> words that put a docstring in that category (knexa_node.categories.RULES)
CUES: dict[str, tuple[str, ...]] = {
    "strings": ("string",), "arithmetic": ("sum",), "number_theory": ("prime",), "lists": ("list",),
    "sorting_searching": ("sort",), "dicts_sets": ("dict",), "recursion_dp": ("recursion",),
    "parsing_formatting": ("format",), "logic_conditions": ("check",), "geometry": ("circle",),
    "counting_combinatorics": ("count",), "other": ("house",),
}
_PHRASES = ("Apply the {cue} rule to {a}.", "Use the {cue} convention on {a}.",
            "Transform {a} by the {cue} rule.", "Return {a} under the {cue} rule.")
_ARGS = ("x", "n", "v", "k", "a", "b", "m", "p", "q", "z", "t", "w", "y", "val", "item", "arg")
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
          "kilo", "lima", "mike", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "victor",
          "whiskey", "xray", "yankee", "zulu", "beta", "gamma", "theta", "iota", "kappa", "lambda",
          "omega", "sigma", "zeta", "rho", "tau", "phi", "chi", "psi", "nova", "orbit")
_OPWORDS = {"+": "plus", "-": "minus", "*": "times", "//": "floor-divided by", "%": "modulo"}
#: the sets a split draws, in the order their instance pools are cut (disjoint by construction)
SETS: tuple[str, ...] = ("test", "probe", "transfer", "val", "train")
_TEST_INPUTS = (0, 3, 10, 17, 26)


def rule_of(category: str) -> Rule:
    return RULES[category]


def _instances(seed: int) -> list[tuple[str, str, str]]:
    """Every (function name, argument, phrase) instance, in a seeded order."""
    names = [f"{a}_{b}" for a, b in itertools.permutations(_WORDS, 2)]
    combos = list(itertools.product(names, _ARGS, _PHRASES))
    rng = np.random.default_rng([seed, 0x5C111])
    return [combos[i] for i in rng.choice(len(combos), size=20_000, replace=False)]


def _problem(task_id: str, category: str, name: str, arg: str, phrase: str, rng: np.random.Generator) -> dict[str, str]:
    rule = RULES[category]
    cue = CUES[category][int(rng.integers(len(CUES[category])))]
    doc = phrase.format(cue=cue, a=arg)
    prompt = f'def {name}({arg}):\n    """{doc}"""\n'
    asserts = "".join(f"    assert candidate({x}) == {rule.apply(x)}\n" for x in _TEST_INPUTS)
    return {"task_id": task_id, "prompt": prompt, "canonical_solution": rule.body(arg),
            "test": f"def check(candidate):\n{asserts}", "entry_point": name, "category": category}


def generate(counts: dict[str, Sequence[int]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Problems for each set: ``counts[set][c]`` problems of ``CATEGORIES[c]``.

    Instances are cut from one seeded pool in :data:`SETS` order, so no two problems of any
    sets share a (name, argument, phrasing) instance, and no function name appears in two sets
    (each set draws from its own block of names).
    """
    unknown = set(counts) - set(SETS)
    if unknown:
        raise ValueError(f"unknown sets {sorted(unknown)}; known: {', '.join(SETS)}")
    pool = _instances(seed)
    rng = np.random.default_rng([seed, 0x5C112])
    # names are partitioned between sets: a set's names never occur in another set
    names = sorted({n for n, _, _ in pool})
    name_rng = np.random.default_rng([seed, 0x5C113])
    owner = {n: SETS[i % len(SETS)] for i, n in enumerate(name_rng.permutation(names))}
    by_set: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SETS}
    for inst in pool:
        by_set[owner[inst[0]]].append(inst)
    out: dict[str, list[dict[str, str]]] = {}
    for set_name in SETS:
        if set_name not in counts:
            continue
        per_cat = list(counts[set_name])
        if len(per_cat) != len(CATEGORIES):
            raise ValueError(f"counts[{set_name!r}] needs {len(CATEGORIES)} entries, got {len(per_cat)}")
        items, cursor = [], 0
        for c, n in enumerate(per_cat):
            for j in range(int(n)):
                if cursor >= len(by_set[set_name]):
                    raise ValueError(f"the {set_name} set asks for more than {cursor} distinct instances")
                name, arg, phrase = by_set[set_name][cursor]
                cursor += 1
                items.append(_problem(f"Skills/{set_name}/{CATEGORIES[c]}/{j}", CATEGORIES[c], name, arg,
                                      phrase, rng))
        out[set_name] = items
    return out


def public_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, solution) pairs whose docstring states the rule: the shared public pre-training.

    Operators and digits are drawn uniformly, so the corpus teaches syntax and argument copying
    but favours no private rule.
    """
    rng = np.random.default_rng([seed, 0x9B11C])
    ops = list(_OPWORDS)
    out = []
    for _ in range(n):
        a = _ARGS[int(rng.integers(len(_ARGS)))]
        name = f"{_WORDS[int(rng.integers(len(_WORDS)))]}_{_WORDS[int(rng.integers(len(_WORDS)))]}"
        op, k = ops[int(rng.integers(len(ops)))], int(rng.integers(2, 10))
        prompt = f'def {name}({a}):\n    """Return {a} {_OPWORDS[op]} {k}."""\n'
        out.append((prompt, Rule(op, k).body(a)))
    return out

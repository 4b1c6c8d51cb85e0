"""Deterministic problem-category classifier behind the profile's 12-bin data histogram.

SPEC "Context": the last 12 dims of a node's profile are the distribution of its training data
over problem categories (protocol.CATEGORIES), and the Dirichlet split (data.make_split) is
non-IID *over these categories*. Both need the same, reproducible labelling on every node, so it
is a fixed list of keyword rules, not a model:

1. Text: the prompt's docstring prose (doctest ``>>>`` lines dropped, since examples are data,
   not intent) plus the function name with ``_``/camelCase split into words; lower-cased.
2. Rules are tried in :data:`PRIORITY` order; the first whose pattern matches wins; no match is
   "other". Specific domains come first (geometry, recurrences, number theory, counting), then
   the operation (parsing/formatting, sorting/searching, dicts/sets), then the data type
   (strings, lists), then generic arithmetic and boolean logic. A prompt mentioning "prime" and
   "list" is a number-theory problem about a list, not a list problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from protocol._layout import CATEGORIES

__all__ = ["PRIORITY", "RULES", "classify", "classify_name", "histogram", "problem_text"]

#: category -> pattern over the lower-cased text (word boundaries keep "area" out of "arrange")
RULES: dict[str, str] = {
    "geometry": r"\b(triangles?|polygons?|circles?|radius|perimeter|area|angled?|hypotenuse|"
                r"geometr\w*|rectangles?)\b",
    "recursion_dp": r"\b(fib\w*|tribonacci|recursive\w*|recursion|recurrence|memo\w*|"
                    r"dynamic programming|sub-?arrays?|paths?)\b",
    "number_theory": r"\b(primes?|prime factors?|divisors?|divisible|divides|gcd|lcm|"
                     r"greatest common|factori[sz]\w*|modulo|modular|digits?|collatz|"
                     r"cubes?|simple power|even numbers|odd numbers)\b",
    "counting_combinatorics": r"\b(count\w*|how many|number of times|factorials?|"
                              r"permutations?|combinations?|occurrences?)\b",
    "parsing_formatting": r"\b(parenthes[ie]s|brackets?|pars\w+|roman|binary|hexadecimal|base|"
                          r"decimal to|to decimal|encod\w*|decod\w*|encrypt\w*|cipher|md5|hash|format\w*|"
                          r"dates?|file'?s? name|representation|delimited|xor)\b",
    "sorting_searching": r"\b(sort\w*|ordered|ascending|descending|search\w*|closest|"
                         r"smallest|largest|longest|shortest|max\w*|min\w*|median|greatest|"
                         r"index of)\b",
    "dicts_sets": r"\b(dictionar\w*|dict|unique|duplicates?|keys?|"
                  r"frequency|common|intersection|union)\b",
    "strings": r"\b(strings?|substrings?|characters?|chars?|letters?|words?|vowels?|"
               r"consonants?|palindrom\w*|(upper|lower)[ -]?case\w*|prefix\w*|suffix\w*|sentences?|"
               r"text|concatenat\w*)\b",
    "lists": r"\b(lists?|arrays?|elements?|matrix|matrices|grid|nested|tuples?|"
             r"ind(ex|ices|icies))\b",
    "arithmetic": r"\b(sum\w*|products?|add\w*|multipl\w*|average|mean|deviation|round\w*|"
                  r"float\w*|integers?|numbers?|polynomial|derivative|powers?|squares?|"
                  r"difference|subtract\w*|divide|absolute|truncate)\b",
    "logic_conditions": r"\b(true|false|whether|checks?|valid\w*|if and only if|otherwise|"
                        r"yes|no)\b",
}
#: The fixed tie-break order (see module docstring); "other" is the fallback.
PRIORITY: tuple[str, ...] = tuple(RULES)
_COMPILED = [(CATEGORIES.index(name), re.compile(pat)) for name, pat in RULES.items()]
_OTHER = CATEGORIES.index("other")

assert set(PRIORITY) | {"other"} == set(CATEGORIES)

_DOC = re.compile(r'("""|\'\'\')(.*?)(\1|$)', re.S)
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M)


def problem_text(prompt: str) -> str:
    """The text the rules see: docstring prose + the (last) function's name, lower-cased."""
    docs = [m.group(2) for m in _DOC.finditer(prompt)] or [prompt]
    lines = []
    in_example = False
    for line in "\n".join(docs).splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
            continue
        if in_example and stripped and not stripped[0].isalpha():
            continue  # the expected output of a doctest
        in_example = False
        lines.append(stripped)
    names = _DEF.findall(prompt)
    name = names[-1] if names else ""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ")
    return f"{name}\n" + "\n".join(lines).lower()


def classify(prompt: str) -> int:
    """Index into protocol.CATEGORIES of the first rule (in PRIORITY order) matching ``prompt``."""
    text = problem_text(prompt).lower()
    for index, pattern in _COMPILED:
        if pattern.search(text):
            return index
    return _OTHER


def classify_name(prompt: str) -> str:
    """:func:`classify`, as the category's name."""
    return CATEGORIES[classify(prompt)]


def histogram(prompts: Iterable[str]) -> np.ndarray:
    """Normalised 12-bin category histogram (uniform when ``prompts`` is empty)."""
    counts = np.zeros(len(CATEGORIES), dtype=np.float64)
    for prompt in prompts:
        counts[classify(prompt)] += 1.0
    total = counts.sum()
    return counts / total if total else np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))

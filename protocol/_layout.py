"""The 32-dim profile layout shared by nodes (who build it) and the CPM (who reads it).

It is part of the wire contract: a node and a CPM that disagree on it would learn garbage, so it
lives here and is versioned with the protocol (SPEC "Context": 8 + 12 + 12 = 32).
"""

from __future__ import annotations

__all__ = [
    "CATEGORIES",
    "FAMILIES",
    "FAMILY_SLICE",
    "HIST_SLICE",
    "PERF_SLICE",
    "PROFILE_DIM",
    "SKILLS_DIM",
]

#: Backbone families, one-hot in the first 8 dims. "other" catches every unknown architecture.
FAMILIES: tuple[str, ...] = (
    "llama", "qwen", "gpt_neox", "bloom", "gpt2", "mistral", "phi", "other",
)
#: Problem categories of the 12-bin data histogram (see knexa_node.categories for the classifier).
CATEGORIES: tuple[str, ...] = (
    "strings", "arithmetic", "number_theory", "lists", "sorting_searching", "dicts_sets",
    "recursion_dp", "parsing_formatting", "logic_conditions", "geometry",
    "counting_combinatorics", "other",
)
FAMILY_SLICE = slice(0, 8)
PERF_SLICE = slice(8, 20)
HIST_SLICE = slice(20, 32)
PROFILE_DIM = 32
#: An optional field beside the 32 dims (a KNEXA addition, not the paper's): the node's greedy
#: Pass@1 per category on its own validation problems, in CATEGORIES order; empty = not shared.
SKILLS_DIM = len(CATEGORIES)

assert len(FAMILIES) == FAMILY_SLICE.stop - FAMILY_SLICE.start
assert len(CATEGORIES) == HIST_SLICE.stop - HIST_SLICE.start

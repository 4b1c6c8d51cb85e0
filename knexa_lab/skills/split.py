"""One seeded federation over the skills problems: who holds data for which category.

Layout (what :func:`knexa_node.data.load_node_data` reads, plus the oracle's probe set):

* ``public/test.jsonl``: the global test set, ``test_per_category`` of each category;
* ``public/transfer.jsonl``: X_u, the prompts teachers answer (reference solutions are never
  sent: a student only ever sees a teacher's text);
* ``node-<i>/train.jsonl``: the private shard, categories drawn from Dirichlet(alpha), so
  each client holds a few categories; ``node-<i>/val.jsonl``: a small set with every category,
  the organisation's *target* (what it wants to be good at; see ``docs/skills.md``);
* ``oracle/probe.jsonl``: a hidden probe set only Oracle-P2P reads (never a node);
* ``manifest.json``: sizes, each client's category counts, and the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knexa_runtime.atomic import atomic_write_json
from protocol._layout import CATEGORIES

from .problems import generate

__all__ = ["SkillsSplit", "SplitSettings", "make_skills_split", "write_skills_split"]

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True, slots=True)
class SplitSettings:
    clients: int = 8
    alpha: float = 0.2
    train_per_client: int = 64
    val_per_category: int = 2
    test_per_category: int = 20
    transfer_per_category: int = 8
    probe_per_category: int = 4


@dataclass(frozen=True, slots=True)
class SkillsSplit:
    seed: int
    test: list[dict[str, str]]
    transfer: list[dict[str, str]]
    probe: list[dict[str, str]]
    #: per client: (train, val)
    nodes: list[tuple[list[dict[str, str]], list[dict[str, str]]]]
    #: per client: training problems per category
    counts: list[list[int]]


def _shard_counts(s: SplitSettings, rng: np.random.Generator) -> list[list[int]]:
    """Each client's categories ~ Dirichlet(alpha); at least one category with data."""
    out = []
    for _ in range(s.clients):
        p = rng.dirichlet(np.full(len(CATEGORIES), s.alpha))
        out.append([int(x) for x in rng.multinomial(s.train_per_client, p)])
    return out


def make_skills_split(s: SplitSettings, seed: int) -> SkillsSplit:
    """The seed's split; the same seed always gives the same problems and shards."""
    if s.clients < 2 or s.train_per_client < 1 or s.alpha <= 0:
        raise ValueError("need clients >= 2, train_per_client >= 1 and alpha > 0")
    rng = np.random.default_rng([seed, 0xD1A])
    counts = _shard_counts(s, rng)
    n = len(CATEGORIES)
    total_train = [sum(c[k] for c in counts) for k in range(n)]
    sets = generate({"test": [s.test_per_category] * n, "probe": [s.probe_per_category] * n,
                     "transfer": [s.transfer_per_category] * n,
                     "val": [s.val_per_category * s.clients] * n, "train": total_train}, seed)
    by_cat = {name: {c: [p for p in sets[name] if p["category"] == c] for c in CATEGORIES} for name in sets}
    nodes = []
    train_cursor = dict.fromkeys(CATEGORIES, 0)
    for i, cnt in enumerate(counts):
        train = []
        for k, c in enumerate(CATEGORIES):
            train += by_cat["train"][c][train_cursor[c]:train_cursor[c] + cnt[k]]
            train_cursor[c] += cnt[k]
        val = [p for c in CATEGORIES
               for p in by_cat["val"][c][i * s.val_per_category:(i + 1) * s.val_per_category]]
        order = np.random.default_rng([seed, i]).permutation(len(train))
        nodes.append(([train[j] for j in order], val))
    return SkillsSplit(seed=seed, test=sets["test"], transfer=sets["transfer"], probe=sets["probe"], nodes=nodes,
                       counts=counts)


def _rows(problems: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: p[k] for k in FIELDS} for p in problems]


def write_skills_split(split: SkillsSplit, out: Path) -> Path:
    """Write the layout in the module docstring (atomically, file by file)."""
    from knexa_node.data import write_jsonl

    out = Path(out)
    write_jsonl(out / "public" / "test.jsonl", _rows(split.test))
    write_jsonl(out / "public" / "transfer.jsonl", _rows(split.transfer))
    write_jsonl(out / "oracle" / "probe.jsonl", _rows(split.probe))
    for i, (train, val) in enumerate(split.nodes):
        write_jsonl(out / f"node-{i}" / "train.jsonl", _rows(train))
        write_jsonl(out / f"node-{i}" / "val.jsonl", _rows(val))
    atomic_write_json(out / "manifest.json", {
        "seed": split.seed, "benchmark": "skills", "categories": list(CATEGORIES),
        "sizes": {"test": len(split.test), "transfer": len(split.transfer), "probe": len(split.probe)},
        "nodes": [{"node": i, "train": len(t), "val": len(v), "counts": split.counts[i]}
                  for i, (t, v) in enumerate(split.nodes)],
    })
    return out

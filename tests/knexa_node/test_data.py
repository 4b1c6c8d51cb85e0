"""Problem loading, the seeded non-IID split, its on-disk layout, and a node's view of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knexa_node import data as data_mod
from knexa_node.categories import histogram
from knexa_node.data import (
    load_node_data,
    load_problems,
    make_split,
    normalize,
    write_jsonl,
    write_split,
)

MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 7, "text": "Use a helper, tabs for indentation.",
     "code": "import math\ndef helper(x):\n\treturn x\ndef sq(x):  # entry\n\treturn helper(x) * x",
     "test_list": ["assert sq(3) == 9", "assert sq(0) == 0"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 9, "prompt": "Sanitized MBPP uses 'prompt' and test_imports.",
     "code": "def f(a=(1, 2)) -> int:\n    return a[0]\n", "test_list": ["assert f() == 1"],
     "test_imports": ["import re"]},
]


def _ids(rows: list[dict[str, str]]) -> set[str]:
    return {r["task_id"] for r in rows}


def _prompts(rows: list[dict[str, str]]) -> set[str]:
    return {r["prompt"].strip() for r in rows}


def test_humaneval_is_embedded(problems: list[dict[str, str]]) -> None:
    assert len(problems) == 164
    assert set(problems[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert problems[0]["task_id"] == "HumanEval/0"


def test_mbpp_rows_become_runnable_humaneval_rows() -> None:
    for row in normalize(MBPP_ROWS):
        assert row["task_id"].startswith("MBPP/") and '"""' in row["prompt"]
        program = row["prompt"] + row["canonical_solution"] + "\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
        exec(compile(program, row["task_id"], "exec"), {})  # the reference solution passes its tests
    assert normalize(MBPP_ROWS)[1]["entry_point"] == "sq"  # the tested function, not the helper


def test_jsonl_and_local_hf_sources(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    assert len(load_problems(tmp_path / "mbpp.jsonl")) == 3
    import datasets

    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "challenge_test_list"} for r in MBPP_ROWS[:2]]
                               ).save_to_disk(str(tmp_path / "hf"))
    assert [p["entry_point"] for p in load_problems(tmp_path / "hf")] == ["similar_elements", "sq"]
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="neither HumanEval"):
        normalize([{"question": "?"}])


def test_split_is_disjoint_and_complete(problems: list[dict[str, str]]) -> None:
    split = make_split(problems, n_nodes=4, seed=42, test_size=24, transfer_size=16, alpha=0.1)
    parts = [split.test, split.transfer] + [rows for node in split.nodes for rows in node]
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not _ids(a) & _ids(b) and not _prompts(a) & _prompts(b)
    assert sum(len(p) for p in parts) == 164
    assert (len(split.test), len(split.transfer)) == (24, 16)
    for train, val in split.nodes:
        assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) >= 4


def test_duplicate_prompts_are_dropped(problems: list[dict[str, str]]) -> None:
    dup = dict(problems[5], task_id="Copy/5")
    split = make_split([*problems[:40], dup], n_nodes=2, seed=1, test_size=8, transfer_size=4)
    everything = split.test + split.transfer + [r for n in split.nodes for rows in n for r in rows]
    assert len(everything) == 40 and "Copy/5" not in _ids(everything)


def test_split_is_deterministic_and_seed_sensitive(problems: list[dict[str, str]]) -> None:
    a = make_split(problems, n_nodes=3, seed=42, test_fraction=0.2, transfer_size=10)
    b = make_split(problems, n_nodes=3, seed=42, test_fraction=0.2, transfer_size=10)
    c = make_split(problems, n_nodes=3, seed=43, test_fraction=0.2, transfer_size=10)
    assert a == b
    assert _ids(a.test) != _ids(c.test)
    assert len(a.test) == round(0.2 * 164)


def test_split_is_non_iid(problems: list[dict[str, str]]) -> None:
    split = make_split(problems, n_nodes=4, seed=42, test_size=24, transfer_size=16, alpha=0.1)
    hists = [histogram(p["prompt"] for p in train + val) for train, val in split.nodes]
    pairwise = [np.abs(hists[i] - hists[j]).sum() / 2 for i in range(4) for j in range(i + 1, 4)]
    assert min(pairwise) > 0.2  # total-variation distance between every pair of nodes
    iid = make_split(problems, n_nodes=4, seed=42, test_size=24, transfer_size=16, alpha=1000.0)
    iid_hists = [histogram(p["prompt"] for p in train + val) for train, val in iid.nodes]
    iid_pairwise = [np.abs(iid_hists[i] - iid_hists[j]).sum() / 2 for i in range(4) for j in range(i + 1, 4)]
    assert np.mean(iid_pairwise) < np.mean(pairwise)


def test_too_few_problems(problems: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="cannot give"):
        make_split(problems[:20], n_nodes=4, seed=0, test_size=8, transfer_size=8)


def test_layout_manifest_and_node_view(tmp_path: Path, problems: list[dict[str, str]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    split = make_split(problems, n_nodes=3, seed=5, test_size=20, transfer_size=10, alpha=0.3)
    write_split(split, tmp_path)
    for rel in ("public/test.jsonl", "public/transfer.jsonl", "node-2/train.jsonl", "node-2/val.jsonl"):
        assert (tmp_path / rel).is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["sizes"] == {"test": 20, "transfer": 10}
    assert [n["train"] for n in manifest["nodes"]] == [len(t) for t, _ in split.nodes]
    assert all(abs(sum(n["histogram"]) - 1) < 1e-3 for n in manifest["nodes"])

    opened: list[Path] = []
    real = data_mod.read_jsonl
    monkeypatch.setattr(data_mod, "read_jsonl", lambda p: opened.append(Path(p)) or real(p))
    view = load_node_data(tmp_path / "node-1")
    assert {p.parent.name for p in opened} == {"node-1", "public"}  # never another node's shard
    assert view.train == split.nodes[1][0] and view.val == split.nodes[1][1]
    assert view.test == split.test and view.transfer == split.transfer


def test_missing_val_is_carved_from_train(tmp_path: Path, problems: list[dict[str, str]]) -> None:
    write_jsonl(tmp_path / "node" / "train.jsonl", problems[:20])
    write_jsonl(tmp_path / "pub" / "test.jsonl", problems[20:25])
    write_jsonl(tmp_path / "pub" / "transfer.jsonl", problems[25:30])
    view = load_node_data(tmp_path / "node", tmp_path / "pub")
    assert (len(view.train), len(view.val)) == (17, 3)

"""`knexa-node data prepare`: an organization's own files -> a node's private data, every rejected row reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from knexa_node.cli import main as node_main
from knexa_node.data import load_node_data, read_jsonl, write_jsonl
from knexa_node.data_prepare import PrepareError, prepare

GOOD = [
    {"task_id": "acme/add", "prompt": 'def add(a, b):\n    """Add two integers and return their sum."""\n',
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
     "entry_point": "add"},
    {"task_id": "acme/rev", "prompt": 'def rev(s):\n    """Return the string s reversed, character by character."""\n',
     "canonical_solution": "    return s[::-1]\n", "test": "def check(candidate):\n    assert candidate('ab') == 'ba'\n",
     "entry_point": "rev"},
    {"task_id": "acme/evens", "prompt": 'def evens(xs):\n    """Keep only the even numbers of the list xs."""\n',
     "canonical_solution": "    return [x for x in xs if x % 2 == 0]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 4]) == [2, 4]\n", "entry_point": "evens"},
]
MBPP = {"task_id": 11, "text": "Write a function to multiply all numbers of a list together.",
        "code": "def mul_all(xs):\n    r = 1\n    for x in xs:\n        r *= x\n    return r\n",
        "test_list": ["assert mul_all([2, 3, 4]) == 24", "assert mul_all([]) == 1"]}
PUBLIC_TEST = {"task_id": "HumanEval/x", "prompt": 'def sq(n):\n    """Return the square of the integer n, n times n."""\n',
               "canonical_solution": "    return n * n\n", "test": "def check(candidate):\n    assert candidate(3) == 9\n",
               "entry_point": "sq"}


def _public(tmp: Path) -> Path:
    write_jsonl(tmp / "public" / "test.jsonl", [PUBLIC_TEST])
    write_jsonl(tmp / "public" / "transfer.jsonl", [dict(GOOD[0], task_id="X/0", prompt="def zz(a):\n    pass\n",
                                                         canonical_solution="    return a\n", entry_point="zz")])
    return tmp / "public"


def test_malformed_jsonl_is_reported_row_by_row_and_good_rows_are_kept(tmp_path: Path) -> None:
    failing = dict(GOOD[1], task_id="acme/bad", prompt='def neg(x):\n    """Negate the number x and return it."""\n',
                   canonical_solution="    return x\n", test="def check(candidate):\n    assert candidate(1) == -1\n",
                   entry_point="neg")
    lines = [
        json.dumps(GOOD[0]),                                   # 1 kept
        '{"task_id": "acme/broken", "prompt": ',               # 2 bad JSON
        json.dumps({"task_id": "acme/nofields", "prompt": "def f():\n"}),  # 3 missing fields
        json.dumps(failing),                                   # 4 reference fails its tests
        json.dumps(dict(GOOD[0], task_id="acme/add-copy")),    # 5 duplicate prompt of line 1
        "",                                                    # blank: not a row
        json.dumps(GOOD[1]),                                   # 7 kept
        json.dumps(PUBLIC_TEST | {"task_id": "acme/sq"}),      # 8 overlaps the public test set
        json.dumps(MBPP),                                      # 9 kept (MBPP shape)
        "[1, 2]",                                              # 10 not an object
    ]
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    result = prepare([src], out, public_dir=_public(tmp_path), seed=3, val_fraction=0.34)

    rejected = read_jsonl(out / "rejected.jsonl")
    by_line = {r["line"]: (r["kind"], r["reason"]) for r in rejected}
    assert set(by_line) == {2, 3, 4, 5, 8, 10}
    assert by_line[2][0] == "bad_json"
    assert by_line[3][0] == "missing_fields" and "neither HumanEval" in by_line[3][1]
    assert by_line[4][0] == "reference_fails" and "AssertionError" in by_line[4][1]
    assert by_line[5] == ("duplicate", f"duplicate of {src}:1 (same prompt)")
    assert by_line[8][0] == "public_overlap" and "public test set (HumanEval/x)" in by_line[8][1]
    assert by_line[10][0] == "not_object"
    assert all(r["file"] == str(src) for r in rejected)

    kept = read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")
    assert sorted(p["task_id"] for p in kept) == ["MBPP/11", "acme/add", "acme/rev"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["read"] == 9 == manifest["kept"] + manifest["rejected"]
    assert manifest["rejected_by_kind"]["duplicate"] == 1
    assert sum(manifest["histogram"].values()) == manifest["train"] == len(result.train)
    assert len(manifest["histogram"]) == 12
    assert manifest["public_set"]["dir"] == str(tmp_path / "public")
    view = load_node_data(out, tmp_path / "public")  # exactly what `knexa-node start --data` reads
    assert len(view.train) + len(view.val) == 3


def _one(tmp: Path) -> Path:
    write_jsonl(tmp / "one.jsonl", [GOOD[0], GOOD[0]])  # one problem and its duplicate
    return tmp / "one.jsonl"


def test_split_is_seeded_and_output_is_not_overwritten_without_force(tmp_path: Path) -> None:
    rows = [dict(GOOD[i % 3], task_id=f"t/{i}", prompt=GOOD[i % 3]["prompt"].replace('"""', f'"""Variant {i}. ', 1))
            for i in range(8)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    a = prepare([tmp_path / "a.jsonl"], tmp_path / "o1", seed=1, val_fraction=0.25)
    b = prepare([tmp_path / "a.jsonl"], tmp_path / "o2", seed=1, val_fraction=0.25)
    c = prepare([tmp_path / "a.jsonl"], tmp_path / "o3", seed=2, val_fraction=0.25)
    assert (a.train, a.val) == (b.train, b.val) and len(a.val) == 2
    assert [p["task_id"] for p in a.val] != [p["task_id"] for p in c.val] or a.train != c.train
    with pytest.raises(PrepareError, match="only 1 of 2 rows .* nothing written"):
        prepare([_one(tmp_path)], tmp_path / "o4")
    assert not (tmp_path / "o4").exists()
    before = (tmp_path / "o1" / "train.jsonl").read_bytes()
    with pytest.raises(PrepareError, match="--force"):
        prepare([tmp_path / "a.jsonl"], tmp_path / "o1", seed=9)
    assert (tmp_path / "o1" / "train.jsonl").read_bytes() == before
    prepare([tmp_path / "a.jsonl"], tmp_path / "o1", seed=9, force=True)


def test_local_datasets_folder_parquet_and_csv_are_imported(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([GOOD[0], GOOD[1]]).save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_list([{k: v for k, v in MBPP.items()}]).to_parquet(str(tmp_path / "mbpp.parquet"))
    with open(tmp_path / "more.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "question", "prompt", "canonical_solution", "test", "entry_point"])
        w.writeheader()
        w.writerow({"id": "csv/1", "question": "", **{k: GOOD[2][k] for k in ("prompt", "canonical_solution", "test",
                                                                             "entry_point")}})
        w.writerow({"id": "csv/2", "question": "", "prompt": "def g():\n", "canonical_solution": "", "test": "",
                    "entry_point": "g"})
    result = prepare([tmp_path / "hf", tmp_path / "mbpp.parquet", tmp_path / "more.csv"], tmp_path / "out",
                     mapping={"task_id": "id"}, seed=0)
    kept = sorted(p["task_id"] for p in result.train + result.val)
    assert kept == ["MBPP/11", "acme/add", "acme/rev", "csv/1"]
    (bad,) = result.rejected
    # the first data row spans lines 2-7 (quoted multi-line cells): the bad row starts on line 8
    assert (bad.file, bad.position, bad.unit, bad.kind) == (str(tmp_path / "more.csv"), 8, "line", "invalid_field")
    sources = json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]
    assert [s["rows"] for s in sources] == [2, 1, 2] and all(len(s["sha256"]) == 64 for s in sources)


def test_cli_prepare_and_start_error_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "in.jsonl", GOOD)
    assert node_main(["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "d")]) == 2
    assert "--public DIR" in capsys.readouterr().err
    assert node_main(["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "d"),
                      "--public", str(_public(tmp_path))]) == 0
    assert "kept 3 (train 2, val 1), rejected 0" in capsys.readouterr().out
    assert node_main(["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "d"),
                      "--no-public-check"]) == 20
    assert "--force" in capsys.readouterr().err
    assert node_main(["data", "prepare", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "e"),
                      "--no-public-check"]) == 20
    assert "no such file" in capsys.readouterr().err
    cpm = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
    assert node_main(["start", "--cpm", cpm, "--state-dir", str(tmp_path / "s")]) == 20
    err = capsys.readouterr().err
    assert "knexa-node data prepare" in err and "knexa-lab split" not in err

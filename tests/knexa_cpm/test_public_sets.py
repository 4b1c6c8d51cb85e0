"""`knexa-cpm public-set add/list`: versioned bundles in the CPM's state directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import protocol as P
from knexa_cpm.cli import main as cpm_main
from knexa_cpm.public_sets import PublicSetError, PublicSetStore


def problems(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"task_id": f"{prefix}/{i}", "prompt": f"def {prefix}{i}(x):\n", "canonical_solution": "    return x\n",
             "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": f"{prefix}{i}"} for i in range(n)]


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_add_versions_and_refuse_bad_or_unchanged_sets(tmp_path: Path) -> None:
    store = PublicSetStore(tmp_path / "cpm")
    assert store.current() is None
    test, transfer = write(tmp_path / "test.jsonl", problems("t", 3)), write(tmp_path / "x.jsonl", problems("x", 2))
    v1 = store.add(test, transfer)
    assert (v1.version, v1.test, v1.transfer) == (1, 3, 2)
    assert P.bundle_digest(v1.data) == v1.digest == store.current().digest
    with pytest.raises(PublicSetError, match="same problems as the current version v1"):
        store.add(test, transfer)
    with pytest.raises(PublicSetError, match="overlap"):
        store.add(test, write(tmp_path / "bad.jsonl", problems("t", 1)))
    (tmp_path / "broken.jsonl").write_text('{"task_id": 1\n')
    with pytest.raises(PublicSetError, match=r"broken.jsonl:1: bad JSON"):
        store.add(tmp_path / "broken.jsonl", transfer)
    v2 = store.add(write(tmp_path / "test2.jsonl", problems("t", 4)), transfer)
    assert v2.version == 2 and v2.digest != v1.digest and store.current().version == 2
    assert [e["version"] for e in store.index()] == [1, 2]  # the old version is kept, not replaced
    # a bundle edited on disk no longer matches the index: the CPM refuses to serve it
    path = tmp_path / "cpm" / "public-sets" / "v0002.bundle"
    path.write_bytes(path.read_bytes().replace(b"return x", b"return 0", 1))
    with pytest.raises(PublicSetError, match="does not match"):
        store.current()


def test_cli_add_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test, transfer = write(tmp_path / "test.jsonl", problems("t", 2)), write(tmp_path / "x.jsonl", problems("x", 2))
    state = str(tmp_path / "cpm")
    assert cpm_main(["public-set", "list", "--state-dir", state]) == 0
    assert "no public set published" in capsys.readouterr().out
    assert cpm_main(["public-set", "add", "--state-dir", state, "--test", str(test), "--transfer", str(transfer)]) == 0
    assert "published public set v1" in capsys.readouterr().out
    assert cpm_main(["public-set", "add", "--state-dir", state, "--test", str(test), "--transfer", str(transfer)]) == 10
    err = capsys.readouterr().err
    assert err.startswith("knexa-cpm: ") and err.count("\n") == 1
    assert cpm_main(["public-set", "list", "--state-dir", state]) == 0
    assert capsys.readouterr().out.startswith("v1  ")

"""`knexa-lab merge`: an experiment run in parts (seeds on two machines) reports as the whole run,
and parts that are not one experiment are refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import read_rows, tiny_config

pytestmark = pytest.mark.slow

METHODS = ["local-only", "random-p2p"]


def _comparable(rows):
    return {(r["method"], r["seed"], r["round"], r["client"]): {k: v for k, v in r.items() if k != "wall_s"}
            for r in rows}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, model_cache) -> dict[str, Path]:
    """The same tiny experiment three times: seed 1 alone, seed 2 alone, both seeds at once."""
    from knexa_lab.experiment.engine import run_experiment

    out = {}
    for name, seeds in (("seed1", [1]), ("seed2", [2]), ("whole", [1, 2])):
        out[name] = tmp_path_factory.mktemp(name)
        failed = run_experiment(tiny_config(methods=METHODS, seeds=seeds), out[name], cache_dir=model_cache,
                                progress=False, argv=["knexa-lab", "experiment", name])
        assert failed == []
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "data"))
    return dst


def test_parts_merge_into_the_whole_run(parts, tmp_path):
    from knexa_lab.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(out), str(parts["seed2"]), str(parts["seed1"])]) == 0
    assert _comparable(read_rows(out)) == _comparable(read_rows(parts["whole"]))
    merged, whole = (json.loads((d / "config.json").read_text()) for d in (out, parts["whole"]))
    assert merged == whole
    info = json.loads((out / "run-info.json").read_text())
    assert info["seeds"] == [1, 2]
    assert [p["runs"] for p in info["parts"]] == [{m: [2] for m in METHODS}, {m: [1] for m in METHODS}]
    assert [p["command"] for p in info["parts"]] == ["knexa-lab experiment seed2", "knexa-lab experiment seed1"]
    assert info["command"].startswith("knexa-lab merge ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    assert [m["name"] for m in summary["methods"]] == METHODS
    assert all(m["seeds"] == [1, 2] for m in summary["methods"])
    # the report (Table 4's CIs, the paired comparisons) is the whole run's
    from knexa_lab.experiment.report import write_report

    write_report(parts["whole"])
    whole_summary = json.loads((parts["whole"] / "summary.json").read_text())
    assert summary["comparisons"] == whole_summary["comparisons"]
    assert [m["metrics"]["pass_at_1"] for m in summary["methods"]] == [
        m["metrics"]["pass_at_1"] for m in whole_summary["methods"]]
    assert (out / "table4.md").is_file() and (out / "metrics.csv").is_file()


def test_parts_of_another_experiment_are_refused(parts, tmp_path):
    from knexa_lab.experiment.merge import MergeError, merge_results

    other = _copy(parts["seed2"], tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["learning"]["lr"] *= 2
    cfg["experiment"]["jobs"] = 7  # jobs alone would not matter
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"differ in learning\.lr$"):
        merge_results([parts["seed1"], other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unfinished_run_is_refused_unless_partial(parts, tmp_path):
    from knexa_lab.experiment.merge import MergeError, merge_results

    cut = _copy(parts["seed2"], tmp_path / "cut")
    rows = read_rows(cut)
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                              if not (r["method"] == "random-p2p" and r["round"] == 2)))
    with pytest.raises(MergeError, match=r"random-p2p seed 2 .* round\(s\) 2 of 2"):
        merge_results([parts["seed1"], cut], tmp_path / "out")
    info = merge_results([parts["seed1"], cut], tmp_path / "out", unfinished="keep")
    assert any(n.startswith("unfinished: random-p2p seed 2") for n in info["notes"])
    assert len(read_rows(tmp_path / "out")) == len(rows) * 2 - 3


def test_finished_runs_of_an_experiment_in_progress(parts, tmp_path, capsys):
    from knexa_lab.cli import main

    cut = _copy(parts["whole"], tmp_path / "in-progress")
    rows = read_rows(cut)
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                              if not (r["method"] == "random-p2p" and r["seed"] == 2)))
    out = tmp_path / "finished"
    assert main(["merge", "--finished-only", str(out), str(cut)]) == 0
    assert _comparable(read_rows(out)) == {k: v for k, v in _comparable(rows).items()
                                           if k[:2] != ("random-p2p", 2)}
    info = json.loads((out / "run-info.json").read_text())
    assert info["command"].startswith("knexa-lab merge --finished-only ")
    assert [n for n in info["notes"] if n.startswith("left out: ")] == []  # a run with no rows is not a run
    cut_more = _copy(cut, tmp_path / "torn")
    kept = [r for r in read_rows(cut_more) if not (r["method"] == "local-only" and r["seed"] == 2 and r["round"] == 2)]
    (cut_more / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(["merge", "--finished-only", str(tmp_path / "f2"), str(cut_more)]) == 0
    info = json.loads((tmp_path / "f2" / "run-info.json").read_text())
    assert any(n.startswith("left out: local-only seed 2") for n in info["notes"])
    assert {(r["method"], r["seed"]) for r in read_rows(tmp_path / "f2")} == {
        ("local-only", 1), ("random-p2p", 1)}
    assert "left out: local-only seed 2" in capsys.readouterr().out


def test_a_run_in_two_parts_must_have_the_same_rows(parts, tmp_path):
    from knexa_lab.experiment.merge import MergeError, merge_results

    again = _copy(parts["seed1"], tmp_path / "again")  # the same run, reproduced elsewhere
    info = merge_results([parts["seed1"], again, parts["seed2"]], tmp_path / "ok")
    assert sum(n.startswith("reproduced: ") for n in info["notes"]) == len(METHODS)
    assert _comparable(read_rows(tmp_path / "ok")) == _comparable(read_rows(parts["whole"]))

    rows = read_rows(again)
    rows[-1]["pass_at_1"] = (rows[-1]["pass_at_1"] or 0.0) + 0.5
    (again / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MergeError, match=f"{rows[-1]['method']} seed 1 is in .* with different rows"):
        merge_results([parts["seed1"], again], tmp_path / "bad")


def test_bad_invocations_fail_with_a_reason(parts, tmp_path, capsys):
    from knexa_lab.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["merge", str(tmp_path / "full"), str(parts["seed1"]), str(parts["seed2"])]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(SystemExit):  # argparse: one way to treat unfinished runs
        main(["merge", "--partial", "--finished-only", str(tmp_path / "o"), str(parts["seed1"])])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "o"), str(parts["seed1"]), str(tmp_path)]) == 2
    assert "not an experiment's results directory" in capsys.readouterr().err
    for garbage in ('{"method": "local-only", "seed": "1", "round": 1, "client": "client-0"}\n', "[1, 2]\n"):
        torn = _copy(parts["seed2"], tmp_path / f"garbage-{len(garbage)}")
        with open(torn / "metrics.jsonl", "a") as fh:
            fh.write(garbage)
        assert main(["merge", str(tmp_path / f"o-{len(garbage)}"), str(parts["seed1"]), str(torn)]) == 2
        assert "rows without method/seed/round/client or with a seed or round" in capsys.readouterr().err
    odd = _copy(parts["seed2"], tmp_path / "odd-config")
    config = json.loads((odd / "config.json").read_text())
    config["experiment"]["seeds"] = ["two"]
    (odd / "config.json").write_text(json.dumps(config))
    assert main(["merge", str(tmp_path / "o-odd"), str(parts["seed1"]), str(odd)]) == 2
    assert "experiment.seeds must be a list of integers" in capsys.readouterr().err


def test_parts_run_with_other_package_versions_are_refused_unless_mixed(parts, tmp_path):
    from knexa_lab.experiment.merge import MergeError, merge_results

    other = _copy(parts["seed2"], tmp_path / "other")
    info = json.loads((other / "run-info.json").read_text())
    info["packages"]["tokenizers"] = "0.0.1"
    info["packages"]["newly-recorded"] = "1.0"  # recorded by one part only: not a difference
    (other / "run-info.json").write_text(json.dumps(info))
    with pytest.raises(MergeError, match=r"other package versions \(tokenizers .* -> 0\.0\.1\)"):
        merge_results([parts["seed1"], other], tmp_path / "out")
    merged = merge_results([parts["seed1"], other], tmp_path / "out", mixed_versions=True)
    assert any(n.startswith("package versions differ: ") and "tokenizers" in n for n in merged["notes"])


def test_a_merged_directory_merges_again_and_keeps_its_provenance(parts, tmp_path):
    """Seeds finished in one session are merged and committed; the next session's seeds join them."""
    from knexa_lab.experiment.merge import merge_results

    first = tmp_path / "first"
    merge_results([parts["seed1"]], first, argv=["knexa-lab", "merge", "first"])
    merge_results([first, parts["seed2"]], tmp_path / "all")
    assert _comparable(read_rows(tmp_path / "all")) == _comparable(read_rows(parts["whole"]))
    info = json.loads((tmp_path / "all" / "run-info.json").read_text())
    assert info["parts"][0]["command"] == "knexa-lab merge first"
    assert info["parts"][0]["parts"][0]["command"] == "knexa-lab experiment seed1"
    assert info["parts"][1]["command"] == "knexa-lab experiment seed2"

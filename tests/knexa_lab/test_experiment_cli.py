"""`knexa-lab experiment` and `knexa-lab report`: help, one-line errors (exit 2), report dispatch."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from knexa_lab.cli import main


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def fake_report(monkeypatch):
    """Stands in for knexa_lab.experiment.report (owned by the report engineer) and records calls."""
    calls = []
    module = types.ModuleType("knexa_lab.experiment.report")

    def write_report(results_dir):
        calls.append(("write_report", results_dir))
        return [results_dir / "table4.md"]

    def format_table4(results_dir):
        calls.append(("format_table4", results_dir))
        return "| method | Pass@1 |"

    module.write_report, module.format_table4 = write_report, format_table4
    monkeypatch.setitem(sys.modules, "knexa_lab.experiment.report", module)
    return calls


def _one_line_error(capsys, code, argv, needle):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("knexa-lab: ") and needle in lines[0], err
    return lines[0]


def test_help_explains_presets_methods_and_resume(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for needle in ("tiny", "embedded", "paper", "knexa-fl-concat", "fedproxy", "--resume", "--mode", "--set"):
        assert needle in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["experiment", "--preset", "huge"], "unknown preset 'huge'"),
    (["experiment", "--preset", "tiny", "--methods", "local-only,fedsgd"], "unknown method 'fedsgd'"),
    (["experiment", "--preset", "tiny", "--set", 'experiment.models=["tiny-gpt2", "gpt-17"]'], "gpt-17"),
    (["experiment", "--preset", "tiny", "--seeds", "1,two"], "--seeds expects comma-separated integers"),
    (["experiment", "--preset", "tiny", "--set", "learning.lr"], "--set expects table.key=value"),
    (["experiment"], "choose --preset"),
    (["experiment", "--resume", "/nonexistent/results"], "no experiment in /nonexistent/results"),
    (["experiment", "--resume", "/tmp", "--preset", "tiny"], "drop --preset"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, needle):
    _one_line_error(capsys, 2, argv, needle)


def test_unknown_method_exits_2_before_building_anything(capsys, tmp_path):
    _one_line_error(capsys, 2, ["experiment", "--preset", "tiny", "--methods", "nope", "--out", str(tmp_path / "r")],
                    "unknown method 'nope'")
    assert not (tmp_path / "r").exists()


def test_report_needs_a_results_directory(capsys, tmp_path):
    _one_line_error(capsys, 2, ["report", str(tmp_path)], "no metrics.jsonl (experiment) or results.json (run)")


def test_report_on_an_experiment_directory_rebuilds_tables(capsys, tmp_path, fake_report):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 0
    assert fake_report == [("write_report", tmp_path), ("format_table4", tmp_path)]
    assert "| method | Pass@1 |" in capsys.readouterr().out


def test_report_without_the_report_module_is_an_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "knexa_lab.experiment.report", None)  # import raises ImportError
    (tmp_path / "metrics.jsonl").write_text("")
    _one_line_error(capsys, 1, ["report", str(tmp_path)], "report module unavailable")


def test_report_on_a_run_directory_prints_the_round_table(capsys, tmp_path):
    entry = {"round": 0, "node": "peer-a", "model": "tiny-gpt2", "family": "gpt2", "role": "teacher",
             "partner": "peer-b", "pass_at_1": 0.0, "val_loss": 1.0, "train_loss": 1.0}
    (tmp_path / "results.json").write_text(json.dumps({"rounds": [{"name": "node-0", **entry}], "final": []}))
    assert main(["report", str(tmp_path)]) == 0
    assert "teacher -> student" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_of_a_finished_experiment_only_rebuilds_the_report(capsys, reference_run, fake_report):
    before = (reference_run.out / "metrics.jsonl").read_text()
    assert main(["experiment", "--resume", str(reference_run.out), "--no-progress"]) == 0
    assert (reference_run.out / "metrics.jsonl").read_text() == before
    assert fake_report and "| method | Pass@1 |" in capsys.readouterr().out
    info = json.loads((reference_run.out / "run-info.json").read_text())
    assert len(info["resumed"]) >= 1


@pytest.mark.slow
def test_rerunning_with_another_config_into_the_same_directory_is_refused(capsys, reference_run):
    _one_line_error(capsys, 2, ["experiment", "--preset", "tiny", "--out", str(reference_run.out), "--no-progress"],
                    "holds an experiment with another configuration (differs in experiment.methods")


def test_an_experiment_saved_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from knexa_lab.experiment.config import config_to_dict, resolve_config
    from knexa_lab.experiment.engine import ExperimentError, _open_results

    cfg = resolve_config("skills", quick=True)
    saved = config_to_dict(cfg)
    for key in ("batch", "lr"):  # added to [skills] after experiments had been saved without them
        del saved["skills"][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "run-info.json").write_text(json.dumps({"mode": "sim"}))
    _open_results(tmp_path, cfg, "sim", None)
    info = json.loads((tmp_path / "run-info.json").read_text())
    assert len(info["resumed"]) == len(info["resumed_git"]) == 1
    assert info["resumed_git"][0] is None or len(info["resumed_git"][0]["commit"]) == 40  # the code that resumed it

    saved["skills"]["client_steps"] += 1  # a real difference is still refused, and named
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ExperimentError, match=r"differs in skills\.client_steps\)"):
        _open_results(tmp_path, cfg, "sim", None)


def test_resuming_with_other_package_versions_warns_and_is_recorded(tmp_path, caplog):
    from knexa_lab.experiment.config import config_to_dict, resolve_config
    from knexa_lab.experiment.engine import _open_results
    from knexa_lab.experiment.provenance import package_versions

    cfg = resolve_config("tiny")
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    started = {**package_versions(), "transformers": "0.0.1"}
    (tmp_path / "run-info.json").write_text(json.dumps({"mode": "sim", "packages": started}))
    with caplog.at_level("WARNING"):
        _open_results(tmp_path, cfg, "sim", None)
    assert "other package versions than it started with (transformers 0.0.1 -> " in caplog.text
    info = json.loads((tmp_path / "run-info.json").read_text())
    assert info["resumed_versions"] == [{"at": info["resumed"][0], "changed": [
        f"transformers 0.0.1 -> {package_versions()['transformers']}"]}]

    (tmp_path / "run-info.json").write_text(json.dumps({"mode": "sim", "packages": package_versions()}))
    caplog.clear()
    _open_results(tmp_path, cfg, "sim", None)  # same versions: nothing to say
    assert "package versions" not in caplog.text
    assert "resumed_versions" not in json.loads((tmp_path / "run-info.json").read_text())

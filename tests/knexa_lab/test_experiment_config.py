"""Presets load and validate; overrides apply; every mistake is reported at once."""

from __future__ import annotations

import pytest

from knexa_lab.experiment.config import (
    BUILTIN_PRESETS,
    ConfigError,
    check_models,
    config_from_dict,
    config_to_dict,
    learning_config,
    parse_overrides,
    resolve_config,
)
from knexa_lab.experiment.methods import REGISTRY


@pytest.mark.parametrize("name", BUILTIN_PRESETS)
def test_builtin_presets_are_valid_and_name_only_registered_methods(name):
    cfg = resolve_config(name)
    e = cfg.experiment
    assert e.methods and set(e.methods) <= set(REGISTRY)
    assert len(e.models) >= 2 and len(e.seeds) >= 1 and e.rounds >= 1
    assert cfg.preset == name and config_from_dict(config_to_dict(cfg)) == cfg
    lc = learning_config(cfg, e.seeds[0], 1)
    assert lc.seed == e.seeds[0] * 1000 + 1 and lc.total_rounds == e.rounds


def test_tiny_runs_every_method_with_a_same_model_pair_for_fedavg():
    e = resolve_config("tiny").experiment
    # every method but Oracle-P2P, which needs the skills benchmark's hidden probe set
    assert set(e.methods) == set(REGISTRY) - {"oracle-p2p"} and len(e.seeds) == 2 and e.rounds == 2
    assert all(m.startswith("tiny-") for m in e.models) and 3 <= len(e.models) <= 4
    assert len(set(e.models)) < len(e.models)


def test_paper_preset_is_the_papers_setup():
    cfg = resolve_config("paper")
    e = cfg.experiment
    assert e.models == ("qwen-0.5b", "cerebras-590m", "bloom-560m", "pythia-410m", "qwen-0.5b", "cerebras-590m")
    assert e.rounds == 20 and set(e.methods) == set(REGISTRY) - {"oracle-p2p"}
    lc = learning_config(cfg, 42, 0)
    assert (lc.lr, lc.kd_lr, lc.adam_beta1, lc.adam_beta2, lc.adam_eps) == (3e-5, 5e-5, 0.9, 0.98, 1e-6)
    assert (lc.effective_batch, lc.warmup_frac, lc.lora_rank, lc.lora_alpha, lc.grad_clip) == (32, 0.02, 8, 32, 1.0)
    assert lc.local_epochs == 1


def test_embedded_uses_only_the_embedded_model():
    e = resolve_config("embedded").experiment
    assert set(e.models) == {"smollm2-135m"} and len(e.models) >= 3 and len(e.seeds) == 2


def test_overrides_are_read_as_toml_and_win_over_the_preset():
    cfg = resolve_config("tiny", parse_overrides(["learning.lr=0.5", "experiment.seeds=[7, 8]",
                                                  "methods.knexa-fl.beta0=0.25"]))
    assert cfg.learning["lr"] == 0.5 and cfg.experiment.seeds == (7, 8)
    assert cfg.methods["knexa-fl"] == {"beta0": 0.25}


def test_all_mistakes_are_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny", {"experiment": {"methods": ["local-only", "fedsgd"], "bogus": 1},
                                "methods": {"fedsgdd": {}}})
    msg = str(err.value)
    assert "bogus" in msg and "fedsgd" in msg and "fedsgdd" in msg


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"learning": {"seed": 3}}, "learning.seed is set by the engine"),
    ({"learning": {"lr": -1.0}}, "lr must be >= 0"),
    ({"learning": {"nonsense": 1}}, "unknown learning settings"),
    ({"experiment": {"models": ["tiny-gpt2"]}}, "at least 2 clients"),
    ({"experiment": {"seeds": [1, 1]}}, "seeds must be distinct"),
    ({"experiment": {"passk_samples": 3}}, "passk_samples"),
    ({"experiment": {"passk_when": "sometimes"}}, "passk_when"),
    ({"experiment": {"rounds": "two"}}, "expected int"),
])
def test_bad_values_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config("tiny", overrides)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, embedded, paper"):
        resolve_config("huge")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(str(tmp_path / "mine.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve_config(str(bad))


def test_a_preset_file_works_like_a_builtin(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[experiment]\nmethods = ["local-only"]\nmodels = ["tiny-gpt2", "tiny-llama"]\nrounds = 1\n')
    cfg = resolve_config(str(path))
    assert cfg.experiment.methods == ("local-only",) and cfg.preset == str(path)


def test_models_missing_offline_are_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # even where cached
    with pytest.raises(ConfigError, match="Qwen/Qwen1.5-0.5B") as err:
        check_models(resolve_config("paper"), tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="gpt-17"):
        check_models(resolve_config("tiny", {"experiment": {"models": ["tiny-gpt2", "gpt-17"]}}), tmp_path)
    check_models(resolve_config("tiny"), tmp_path)  # tiny presets resolve without building anything


def test_skills_preset_runs_every_method_but_the_ablations_and_its_quick_variant_is_small():
    full, quick = resolve_config("skills"), resolve_config("skills", quick=True)
    # the KNEXA-FL variants that lost to knexa-fl-prior-adaptive run only when asked for (--methods)
    ablations = {"knexa-fl-hybrid", "knexa-fl-skills", "knexa-fl-compact", "knexa-fl-prior", "knexa-fl-prior-greedy"}
    assert set(full.experiment.methods) == set(REGISTRY) - ablations and full.experiment.problems == "skills"
    assert len(full.experiment.models) == 8 and full.experiment.rounds >= 20 and len(full.experiment.seeds) >= 5
    assert quick.experiment.rounds < full.experiment.rounds and len(quick.experiment.models) < 8
    assert "oracle-p2p" in quick.experiment.methods


def test_quick_needs_a_quick_table():
    with pytest.raises(ConfigError, match="no \\[quick\\] variant"):
        resolve_config("tiny", quick=True)

"""The synthetic study: a world fixed before any policy runs, and the CLI's outputs on a tiny grid."""

import argparse
import csv

import numpy as np
import pytest

from knexa_cpm.features import js_divergence
from knexa_cpm.sim_report import ci95, load_csv, summarize
from knexa_cpm.sim_world import WorldConfig, draw_federation, initial_state, profiles, step, utility
from knexa_cpm.simulate import COLUMNS, SIM_POLICIES, configure_parser, run, run_one
from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE


def test_world_is_a_function_of_the_seed():
    a, b = draw_federation(WorldConfig(n=6, het="high", rounds=5, seed=3)), \
        draw_federation(WorldConfig(n=6, het="high", rounds=5, seed=3))
    np.testing.assert_array_equal(a.reward_noise, b.reward_noise)
    np.testing.assert_array_equal(a.hist, b.hist)
    c = draw_federation(WorldConfig(n=6, het="high", rounds=5, seed=4))
    assert not np.array_equal(a.hist, c.hist)


def test_heterogeneity_controls_js():
    def mean_js(het):
        h = draw_federation(WorldConfig(n=30, het=het, rounds=1)).hist
        i, j = np.triu_indices(30, 1)
        return js_divergence(h[i], h[j]).mean()

    assert mean_js("high") > 0.5 > 0.1 > mean_js("low")


def test_profiles_look_like_real_ones():
    fed = draw_federation(WorldConfig(n=7, het="high", rounds=3))
    state = initial_state(fed)
    for t in range(3):
        p = profiles(fed, state)
        assert p.shape == (7, 32)
        assert (p[:, FAMILY_SLICE].sum(1) == 1).all()
        assert np.allclose(p[:, HIST_SLICE].sum(1), 1, atol=0.07)
        perf = p[:, PERF_SLICE]
        assert (perf[:, [0, 1, 2]] >= 0).all() and (perf[:, [0, 1, 2]] <= 1).all()
        assert np.array_equal(np.round(p, 2), p)
        state = step(fed, state, [(0, 1), (2, 3)], t)


def test_utility_and_dynamics():
    fed = draw_federation(WorldConfig(n=5, het="high", rounds=2))
    s0 = initial_state(fed)
    u = utility(fed, s0)
    assert u.shape == (5, 5) and np.isneginf(np.diag(u)).all()
    s1 = step(fed, s0, [(0, 1)], 0)
    # the student moves toward its teacher where the teacher is better, then everyone trains locally
    gap = np.maximum(s0.skill[0] - s0.skill[1], 0)
    expect = s0.skill[1] + fed.cfg.eta * fed.compat[0, 1] * gap
    expect += fed.cfg.rho * (fed.level[1] - expect)
    np.testing.assert_allclose(s1.skill[1], expect)
    # the expected reward is the student's validation gain minus the package cost
    gain = fed.cfg.eta * fed.compat[0, 1] * (fed.weights[1] * gap).sum()
    assert u[0, 1] == pytest.approx(fed.cfg.gain_scale * gain - fed.cfg.kb_cost * fed.kb[0])


def test_every_policy_sees_the_same_draws():
    rows = run_one(WorldConfig(n=6, het="high", rounds=8, seed=1), ["oracle", "oracle"])
    first, second = rows[:8], rows[8:]
    assert first == second  # same world, same noise, same seedless oracle choices
    assert all(r[COLUMNS.index("regret")] == 0.0 for r in rows)


def test_ci95():
    mean, half = ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == 3.0 and half == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    assert np.isnan(ci95(np.array([1.0]))[1])


def test_cli_tiny_grid_writes_outputs(tmp_path):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "sim"
    args = parser.parse_args(["--out", str(out), "--nodes", "8", "--het", "high", "--rounds", "12",
                              "--seeds", "2", "--quiet"])
    assert run(args) == 0
    for name in ("rounds.csv", "table.md", "cpm_cum_reward.png", "cpm_regret.png", "cpm_gain.png", "cpm_js.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "rounds.csv").open() as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == COLUMNS
    rows = load_csv(out / "rounds.csv")
    assert len(rows) == len(SIM_POLICIES) * 2 * 12
    mean_reward = {pol: np.mean([r[5] for r in rows if r[0] == pol]) for pol in SIM_POLICIES}
    assert all(mean_reward["oracle"] >= v for v in mean_reward.values())
    table = (out / "table.md").read_text()
    assert "knexa-cpm simulate --nodes 8 --het high --rounds 12 --seeds 2" in table
    assert table.count("| high | 8 |") == len(SIM_POLICIES)
    recs = {r["policy"]: r for r in summarize(rows)}
    assert recs["random"]["gain"] == 0.0 and recs["oracle"]["frac"] == 1.0


def test_cli_rejects_bad_grid(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args(["--out", str(tmp_path), "--nodes", "1", "--quiet"])) == 2
    assert run(parser.parse_args(["--out", str(tmp_path), "--cap-range", "0.9", "0.1", "--quiet"])) == 2
    assert "knexa-cpm simulate" in capsys.readouterr().err

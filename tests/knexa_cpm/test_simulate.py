"""The synthetic study: a world fixed before any policy runs, and the CLI's outputs on a tiny grid."""

import argparse
import csv

import numpy as np
import pytest

from knexa_cpm.features import js_divergence
from knexa_cpm.sim_report import ci95, load_csv, summarize
from knexa_cpm.sim_world import (
    WORLDS,
    WorldConfig,
    draw_federation,
    initial_state,
    poisoners,
    profiles,
    step,
    utility,
)
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


def test_two_different_policies_see_identical_draws():
    cfg = WorldConfig(n=6, het="high", rounds=20, seed=1, world="tokenizer")
    fed = draw_federation(cfg)
    seen: dict[str, dict] = {"random": {}, "linucb-interaction": {}}

    def trace(policy, t, prof, pairs, noise):
        seen[policy][t] = (prof.copy(), {p: float(z) for p, z in zip(pairs, noise, strict=True)})

    rows = run_one(cfg, ["random", "linucb-interaction"], trace=trace)
    a, b = seen["random"], seen["linucb-interaction"]
    np.testing.assert_array_equal(a[0][0], b[0][0])  # the same federation before anyone acts
    common = [(t, p) for t in range(20) for p in a[t][1] if p in b[t][1]]
    assert common, "the two policies never chose the same pair in the same round"
    for t, p in common:
        assert a[t][1][p] == b[t][1][p] == fed.reward_noise[t, p[0], p[1]]
    assert a[5][1] != b[5][1] or a[9][1] != b[9][1]  # they are different policies
    # running a policy alone or after another one changes nothing: no shared random stream
    alone = run_one(cfg, ["linucb-interaction"])
    assert alone == [r for r in rows if r[0] == "linucb-interaction"]


def test_regret_is_against_the_best_matching_so_the_oracle_has_some():
    rows = run_one(WorldConfig(n=12, het="high", rounds=15, seed=2), ["oracle", "oracle-exact", "best-fixed", "random"])
    regret = {pol: [r[COLUMNS.index("regret")] for r in rows if r[0] == pol] for pol in ("oracle", "oracle-exact",
                                                                                          "best-fixed", "random")}
    assert all(v >= -1e-9 for vals in regret.values() for v in vals)
    assert sum(regret["oracle"]) > 0.0
    assert sum(regret["oracle"]) < sum(regret["best-fixed"]) and sum(regret["oracle"]) < sum(regret["random"])


def test_best_fixed_plays_one_matching_in_every_round():
    cfg = WorldConfig(n=8, het="high", rounds=6, seed=0)
    played = []
    run_one(cfg, ["best-fixed"], trace=lambda pol, t, prof, pairs, noise: played.append(sorted(pairs)))
    # two hindsight candidates are played out, each the same pairs in all six rounds
    assert len(played) == 12 and played[0]
    assert all(p == played[0] for p in played[:6]) and all(p == played[6] for p in played[6:])


def test_worlds_share_draws_and_differ_in_compat():
    base = draw_federation(WorldConfig(n=16, het="high", rounds=3, seed=5))
    worlds = {w: draw_federation(WorldConfig(n=16, het="high", rounds=3, seed=5, world=w)) for w in WORLDS}
    for fed in worlds.values():
        np.testing.assert_array_equal(fed.hist, base.hist)
        np.testing.assert_array_equal(fed.reward_noise, base.reward_noise)
    same = base.family[:, None] == base.family[None, :]
    aff = worlds["affinity"].compat
    assert np.allclose(aff, aff.T) and aff.min() >= 0.25 and aff.max() <= 1.0
    assert len(np.unique(np.round(aff[same], 6))) > 3  # not a function of the family
    tok = worlds["tokenizer"].compat
    assert (tok[same] == 1.0).all() and not np.allclose(tok, tok.T)
    fam = base.family
    for i, j, k, m in [(0, 1, 2, 3), (4, 5, 6, 7)]:
        if fam[i] == fam[k] and fam[j] == fam[m]:
            assert tok[i, j] == tok[k, m]  # one cost per ordered family pair
    wrong = worlds["wrong"]
    bad = np.flatnonzero(wrong.harmful.any(1))
    assert len(bad) == 4 and (wrong.harmful[bad].sum(1) == 3).all()
    for i in bad:  # wrong where it looks strongest: its three largest data categories
        assert set(np.flatnonzero(wrong.harmful[i])) == set(np.argsort(-wrong.hist[i])[:3])


def test_a_poisoner_always_hurts_its_student():
    fed = draw_federation(WorldConfig(n=16, het="high", rounds=3, seed=1, world="poison"))
    bad = poisoners(fed)
    assert len(bad) == 2 and (fed.cap[bad] == fed.cfg.cap_high).all()
    state = initial_state(fed)
    u = utility(fed, state)
    assert (u[bad][:, [j for j in range(16) if j not in bad]] < 0).all()
    student = next(j for j in range(16) if j not in bad)
    taught, alone = step(fed, state, [(int(bad[0]), student)], 0), step(fed, state, [], 0)
    assert (taught.skill[student] < alone.skill[student]).all()


def test_ci95():
    mean, half = ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == 3.0 and half == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    assert np.isnan(ci95(np.array([1.0]))[1])


def test_cli_tiny_grid_writes_outputs(tmp_path):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "sim"
    args = parser.parse_args(["--out", str(out), "--nodes", "8", "--het", "high", "--rounds", "12",
                              "--seeds", "2", "--quiet", "--world", "family", "poison", "--policies", *SIM_POLICIES,
                              "hybrid+trust"])
    assert run(args) == 0
    for name in ("rounds.csv", "table.md", "cpm_cum_reward.png", "cpm_regret.png", "cpm_gain.png", "cpm_js.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "rounds.csv").open() as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == COLUMNS
    rows = load_csv(out / "rounds.csv")
    n_pol = len(SIM_POLICIES) + 1
    assert len(rows) == n_pol * 2 * 2 * 12
    family = [r for r in rows if r[1] == "family"]
    mean_reward = {pol: np.mean([r[6] for r in family if r[0] == pol]) for pol in SIM_POLICIES}
    assert all(mean_reward["oracle-exact"] + 1e-9 >= v for p, v in mean_reward.items() if p != "oracle-exact")
    table = (out / "table.md").read_text()
    assert "knexa-cpm simulate --world family poison --nodes 8 --het high --rounds 12 --seeds 2" in table
    assert "| high | 8 | hybrid+trust |" in table and "Harmful teachers in `poison`" in table
    assert table.count("| high | 8 |") == 3 * n_pol + n_pol  # side by side, two world tables, trust table
    recs = {(r["world"], r["policy"]): r for r in summarize(rows)}
    assert recs[("family", "random")]["gain"] == 0.0 and recs[("poison", "oracle")]["frac"] == 1.0
    assert recs[("poison", "oracle")]["bad_last"] == 0.0 < recs[("poison", "random")]["bad_last"]


def test_cli_rejects_bad_grid(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args(["--out", str(tmp_path), "--nodes", "1", "--quiet"])) == 2
    assert run(parser.parse_args(["--out", str(tmp_path), "--cap-range", "0.9", "0.1", "--quiet"])) == 2
    assert run(parser.parse_args(["--out", str(tmp_path), "--cross-family", "1.5", "--quiet"])) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--policies", "random+trust"])
    assert "knexa-cpm simulate" in capsys.readouterr().err


def test_mimics_publish_an_honest_agents_profile():
    fed = draw_federation(WorldConfig(n=16, het="high", rounds=2, seed=1, world="mimic"))
    bad = poisoners(fed)
    prof = profiles(fed, initial_state(fed))
    target = fed.shown_as[bad[0]]
    assert target not in bad and (fed.shown_as[bad] == target).all()
    for i in bad:
        np.testing.assert_array_equal(prof[i], prof[target])
    honest = [i for i in range(16) if i not in bad]
    assert (fed.shown_as[honest] == honest).all()

"""Outputs of `knexa-cpm simulate`: the per-round CSV, the paper-style table and the plots.

Statistics are over seeds: a 95% confidence interval is mean +- t_{0.975, k-1} * sd / sqrt(k) for
k seeds (Student t, since k is 5). Gains are computed per seed (paired: same federation draw and
same noise for every policy) and then averaged:

- gain vs random = 100 * (R_policy - R_random) / |R_random|, R = cumulative reward after T rounds;
- fraction of oracle gain = (R_policy - R_random) / (R_oracle - R_random).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ci95", "load_csv", "series", "summarize", "write_csv", "write_plots", "write_table"]

_COLUMNS = ("policy", "world", "n", "het", "seed", "round", "reward", "cum_reward", "regret", "cum_regret",
            "mean_js", "pairs", "bad_pairs", "mean_score")
_SEED, _ROUND = _COLUMNS.index("seed"), _COLUMNS.index("round")
# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)
_COLORS = {"random": "#7f7f7f", "heuristic": "#ff7f0e", "linucb-concat": "#1f77b4",
           "linucb-interaction": "#2ca02c", "oracle": "#000000", "round_robin": "#9467bd", "hybrid": "#d62728",
           "oracle-exact": "#444444", "best-fixed": "#8c564b"}
Row = tuple[Any, ...]


def ci95(values: Sequence[float] | np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, half-width of the 95% CI) along `axis`; half-width is NaN for a single value."""
    v = np.asarray(values, dtype=np.float64)
    k = v.shape[axis]
    mean = v.mean(axis=axis)
    if k < 2:
        return mean, np.full_like(mean, np.nan)
    t = _T975[k - 2] if k - 1 <= len(_T975) else 1.96
    return mean, t * v.std(axis=axis, ddof=1) / math.sqrt(k)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_COLUMNS)
        for r in rows:
            w.writerow([f"{x:.6g}" if isinstance(x, float) else x for x in r])
    return path


def load_csv(path: Path) -> list[Row]:
    """Rows back from `write_csv` (for re-plotting without re-running)."""
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return [(d["policy"], d["world"], int(d["n"]), d["het"], int(d["seed"]), int(d["round"]),
                 *(float(d[c]) for c in _COLUMNS[6:11]), int(d["pairs"]), int(d["bad_pairs"]),
                 float(d["mean_score"])) for d in reader]


Key = tuple[str, str, int, str]  # (policy, world, n, het)


def series(rows: Sequence[Row], column: str) -> dict[Key, np.ndarray]:
    """{(policy, world, n, het): (seeds, rounds) array of `column`}, seeds in ascending order."""
    ci = _COLUMNS.index(column)
    acc: dict[Key, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[(r[0], r[1], r[2], r[3])][r[_SEED]][r[_ROUND]] = float(r[ci])
    out = {}
    for key, by_seed in acc.items():
        out[key] = np.array([[by_round[t] for t in sorted(by_round)] for _, by_round in sorted(by_seed.items())])
    return out


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One dict per (world, het, n, policy): totals, gains, JS and teacher shares with 95% CIs."""
    cum = series(rows, "cum_reward")
    reg = series(rows, "cum_regret")
    inst = series(rows, "regret")
    js = series(rows, "mean_js")
    bad, pairs, score = series(rows, "bad_pairs"), series(rows, "pairs"), series(rows, "mean_score")
    out = []
    worlds = list(dict.fromkeys(r[1] for r in rows))
    configs = sorted({(k[1], k[3], k[2]) for k in cum}, key=lambda c: (worlds.index(c[0]), c[1] != "high", c[2]))
    policies = list(dict.fromkeys(r[0] for r in rows))
    for world, het, n in configs:
        base = cum.get(("random", world, n, het))
        orac = cum.get(("oracle", world, n, het))
        for pol in policies:
            key = (pol, world, n, het)
            if key not in cum:
                continue
            total = cum[key][:, -1]
            rec: dict[str, Any] = {"world": world, "het": het, "n": n, "policy": pol, "seeds": total.size}
            rec["reward"], rec["reward_ci"] = map(float, ci95(total))
            rec["regret"], rec["regret_ci"] = map(float, ci95(reg[key][:, -1]))
            # mean per-round regret in the first and second half: sub-linear growth <=> h2 < h1
            half = inst[key].shape[1] // 2
            rec["regret_h1"] = float(inst[key][:, :half].mean()) if half else math.nan
            rec["regret_h2"] = float(inst[key][:, half:].mean())
            rec["js"] = float(js[key].mean())
            # share of the matches whose teacher harms (poison / wrong worlds), first 10 rounds vs last half
            n_pairs = np.maximum(pairs[key], 1)
            rec["bad_first"] = float((bad[key][:, :10].sum(1) / n_pairs[:, :10].sum(1)).mean())
            rec["bad_last"] = float((bad[key][:, half:].sum(1) / n_pairs[:, half:].sum(1)).mean())
            rec["score"], rec["score_ci"] = map(float, ci95(score[key][:, -1]))
            rec["gain"] = rec["gain_ci"] = rec["frac"] = rec["frac_ci"] = math.nan
            if base is not None:
                r0 = base[:, -1]
                rec["gain"], rec["gain_ci"] = map(float, ci95(100.0 * (total - r0) / np.abs(r0)))
                rec["diff"], rec["diff_ci"] = map(float, ci95(total - r0))
                if orac is not None:
                    denom = orac[:, -1] - r0
                    frac = np.where(np.abs(denom) > 1e-12, (total - r0) / np.where(denom == 0, 1, denom), np.nan)
                    rec["frac"], rec["frac_ci"] = map(float, ci95(frac))
            out.append(rec)
    return out


def _pm(mean: float, half: float, fmt: str) -> str:
    if math.isnan(mean):
        return "n/a"
    return format(mean, fmt) if math.isnan(half) else f"{format(mean, fmt)} ± {format(half, fmt.lstrip('+'))}"


def write_table(rows: Sequence[Row], path: Path, command: str | None = None) -> str:
    """Markdown: the worlds side by side (fraction of oracle gain), one full table per world, and
    the trust table where a world has harmful teachers; also returned as a string."""
    recs = summarize(rows)
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    worlds = list(dict.fromkeys(r["world"] for r in recs))
    lines += ["Fraction of the oracle's gain over random, by world:", "",
              "| het | N | policy | " + " | ".join(worlds) + " |", "|---|---|---|" + "---|" * len(worlds)]
    by = {(r["world"], r["het"], r["n"], r["policy"]): r for r in recs}
    keys = list(dict.fromkeys((r["het"], r["n"], r["policy"]) for r in recs))
    keys.sort(key=lambda k: (k[0] != "high", k[1]))
    for het, n, pol in keys:
        cells = [_pm(by[(w, het, n, pol)]["frac"], by[(w, het, n, pol)]["frac_ci"], ".2f")
                 if (w, het, n, pol) in by else "" for w in worlds]
        lines.append(f"| {het} | {n} | {pol} | " + " | ".join(cells) + " |")
    for world in worlds:
        lines += ["", f"World `{world}`:", "",
                  "| het | N | policy | cum. reward | gain vs random (%) | vs random (points) | fraction of oracle gain "
                  "| cum. regret | regret/round 1st → 2nd half | mean JS |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in recs if r["world"] == world):
            lines.append(
                f"| {r['het']} | {r['n']} | {r['policy']} | {_pm(r['reward'], r['reward_ci'], '.1f')} | "
                f"{_pm(r['gain'], r['gain_ci'], '+.1f')} | {_pm(r.get('diff', math.nan), r.get('diff_ci', math.nan), '+.1f')} | "
                f"{_pm(r['frac'], r['frac_ci'], '.2f')} | "
                f"{_pm(r['regret'], r['regret_ci'], '.1f')} | {r['regret_h1']:.2f} → {r['regret_h2']:.2f} | "
                f"{r['js']:.3f} |")
        harmful = [r for r in recs if r["world"] == world and world in ("poison", "mimic", "wrong")]
        if harmful:
            lines += ["", f"Harmful teachers in `{world}`: share of matches they teach, and the agents' mean "
                      "validation score after the last round:", "",
                      "| het | N | policy | share rounds 1-10 | share 2nd half | final mean score |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['het']} | {r['n']} | {r['policy']} | {r['bad_first']:.3f} | {r['bad_last']:.3f} | "
                      f"{_pm(r['score'], r['score_ci'], '.4f')} |" for r in harmful]
    seeds = sorted({r["seeds"] for r in recs})
    lines += ["", f"Mean ± 95% CI half-width over {'/'.join(map(str, seeds))} seeds (Student t); gains "
              "are paired per seed (same federation and noise for every policy). Regret is measured against an "
              "upper bound on each round's best matching, so the oracle's regret is > 0."]
    shaky = [f"{r['world']}/{r['het']}/{r['n']}" for r in recs
             if r["policy"] == "random" and not abs(r["reward"]) > (0.0 if math.isnan(r["reward_ci"]) else r["reward_ci"])]
    if shaky:
        lines += [f"Random's cumulative reward is within its CI of 0 for {', '.join(shaky)}: there the "
                  "percentage gain divides by ~0; read the fraction of oracle gain instead."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _grid_axes(plt: Any, hets: list[str], nodes: list[int]) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(len(hets), len(nodes), figsize=(3.0 * len(nodes), 2.5 * len(hets)),
                             squeeze=False, sharex=True)
    return fig, axes


def _band_plot(plt: Any, data: dict[Key, np.ndarray], title: str, path: Path) -> Path:
    world = next(iter(data))[1]
    data = {(k[0], k[2], k[3]): v for k, v in data.items() if k[1] == world}  # type: ignore[misc]
    title = f"{title}, world {world}"
    hets = sorted({k[2] for k in data}, key=lambda h: h != "high")
    nodes = sorted({k[1] for k in data})
    policies = list(dict.fromkeys(k[0] for k in data))
    fig, axes = _grid_axes(plt, hets, nodes)
    for a, het in enumerate(hets):
        for b, n in enumerate(nodes):
            ax = axes[a, b]
            for pol in policies:
                if (pol, n, het) not in data:
                    continue
                mean, half = ci95(data[(pol, n, het)])
                x = np.arange(1, mean.size + 1)
                ax.plot(x, mean, color=_COLORS.get(pol), label=pol, lw=1.2)
                if not np.isnan(half).all():
                    ax.fill_between(x, mean - half, mean + half, color=_COLORS.get(pol), alpha=0.2, lw=0)
            ax.set_title(f"N={n}, {het} het.", fontsize=9)
            ax.tick_params(labelsize=7)
            if a == len(hets) - 1:
                ax.set_xlabel("round", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """cumulative reward, cumulative regret, gain vs random by N, mean JS of selected pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [
        _band_plot(plt, series(rows, "cum_reward"), "cumulative reward (mean, 95% CI over seeds)",
                   out / "cpm_cum_reward.png"),
        _band_plot(plt, {k: v for k, v in series(rows, "cum_regret").items() if k[0] != "oracle"},
                   "cumulative regret vs oracle (mean, 95% CI over seeds)", out / "cpm_regret.png"),
    ]
    first_world = rows[0][1]
    recs = [r for r in summarize(rows) if r["world"] == first_world]
    hets = sorted({r["het"] for r in recs}, key=lambda h: h != "high")
    policies = [p for p in dict.fromkeys(r["policy"] for r in recs) if p != "random"]
    fig, axes = plt.subplots(1, len(hets), figsize=(4.2 * len(hets), 3.0), squeeze=False, sharey=True)
    for ax, het in zip(axes[0], hets, strict=True):
        for pol in policies:
            sel = [r for r in recs if r["het"] == het and r["policy"] == pol]
            if not sel or all(math.isnan(r["gain"]) for r in sel):
                continue
            ns = [r["n"] for r in sel]
            ax.errorbar(ns, [r["gain"] for r in sel], yerr=[np.nan_to_num(r["gain_ci"]) for r in sel],
                        marker="o", ms=3, capsize=2, color=_COLORS.get(pol), label=pol)
        ax.axhline(0.0, color="#7f7f7f", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{het} heterogeneity", fontsize=9)
        ax.set_xlabel("agents N", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("gain vs random (%)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cpm_gain.png", dpi=80)
    plt.close(fig)
    paths.append(out / "cpm_gain.png")

    all_pol = list(dict.fromkeys(r["policy"] for r in recs))
    fig, ax = plt.subplots(figsize=(5.0, 2.8))
    width = 0.8 / max(len(hets), 1)
    for h, het in enumerate(hets):
        vals = [np.mean([r["js"] for r in recs if r["het"] == het and r["policy"] == p]) for p in all_pol]
        ax.bar(np.arange(len(all_pol)) + h * width, vals, width, label=f"{het} het.")
    ax.set_xticks(np.arange(len(all_pol)) + width * (len(hets) - 1) / 2)
    ax.set_xticklabels(all_pol, fontsize=7, rotation=15)
    ax.set_ylabel("mean JS of selected pairs", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cpm_js.png", dpi=80)
    plt.close(fig)
    paths.append(out / "cpm_js.png")
    return paths

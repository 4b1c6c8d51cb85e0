"""The skills benchmark's part of the report: skill matrices, pair quality, the oracle fraction.

Only where the rows carry per-category Pass@1 (``categories``; the skills benchmark), so a
HumanEval report is unchanged. Everything is computed from ``metrics.jsonl``:

- *skill matrix*: clients x categories Pass@1 on the test set, after round 1 and at the final
  round, mean over seeds (clients are positions: each seed has its own shards);
- *pair quality*: for each student row, what its teacher could teach it, ``sum_c max(0,
  skill[t, c] - skill[s, c])`` from both clients' test skills of the round before (round 1 uses
  round 1), averaged over a method's pairs: how close a matchmaker's choices are to the oracle's;
- *oracle fraction*: how much of Oracle-P2P's gain over Random-P2P KNEXA-FL reaches,
  ``mean_s(K - R) / mean_s(O - R)`` over seeds, for final Pass@1 and for the Pass@1 AUC;
- *reward signal*: per seed, the Spearman correlation between the reward each student reported
  and the change of its test Pass@1 in that round, over a method's student rows: whether what the
  matchmaker learns from tracks what it should maximise, as the run went (the reward study,
  ``knexa_lab.skills.reward_study``, asks the same of all teachers of one student in one state).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol._layout import CATEGORIES

from . import tables
from .methods import P2P_METHODS
from .stats import mean_ci, paired_difference

if TYPE_CHECKING:
    from .report import Experiment

__all__ = ["category_skills", "has_skills", "oracle_fraction", "pair_quality", "reward_signal", "skill_matrix", "skills_markdown",
           "skills_plots", "skills_summary"]

SKILLS_MD = "skills.md"
_SHORT = {c: c.split("_")[0][:6] for c in CATEGORIES}


def has_skills(exp: Experiment) -> bool:
    return any(r.get("categories") for r in exp.rows)


def category_skills(row: dict[str, Any]) -> np.ndarray:
    """A metrics row's test Pass@1 per category, in protocol.CATEGORIES order (0 where absent)."""
    cats = row.get("categories") or {}
    return np.array([float(cats.get(c, 0.0)) for c in CATEGORIES])


def skill_matrix(exp: Experiment, method: str, round_no: int | None = None) -> np.ndarray | None:
    """(clients, categories) mean over seeds at ``round_no`` (default: the method's last round)."""
    rows = [r for r in exp.rows if r["method"] == method and r.get("categories")]
    if not rows:
        return None
    rnd = max(r["round"] for r in rows) if round_no is None else round_no
    acc: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        if r["round"] == rnd:
            acc[r["client"]].append(category_skills(r))
    if not acc:
        return None
    return np.array([np.mean(acc[c], axis=0) if acc.get(c) else np.full(len(CATEGORIES), np.nan)
                     for c in exp.clients])


def pair_quality(exp: Experiment, method: str) -> dict[int, float]:
    """seed -> mean teachable gain of the method's (teacher, student) pairs (see module doc)."""
    rows = [r for r in exp.rows if r["method"] == method and r.get("categories")]
    by_key = {(r["seed"], r["round"], r["client"]): r for r in rows}
    gains: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("role") != "student" or not r.get("partner"):
            continue
        prev = max(r["round"] - 1, 1)
        t, s = by_key.get((r["seed"], prev, r["partner"])), by_key.get((r["seed"], prev, r["client"]))
        if t is None or s is None:
            continue
        gains[r["seed"]].append(float(np.clip(category_skills(t) - category_skills(s), 0.0, None).sum()))
    return {seed: float(np.mean(g)) for seed, g in gains.items()}


def reward_signal(exp: Experiment, method: str) -> dict[int, float]:
    """seed -> Spearman(reward, the student's test Pass@1 change that round) over its student rows.

    Seeds with fewer than 3 rewarded rows, or where either side is constant, are left out.
    """
    from scipy.stats import spearmanr

    rows = [r for r in exp.rows if r["method"] == method]
    by_key = {(r["seed"], r["round"], r["client"]): r for r in rows}
    pairs: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        before = by_key.get((r["seed"], r["round"] - 1, r["client"]))
        if r.get("role") != "student" or r.get("reward") is None or before is None:
            continue
        pairs[r["seed"]].append((float(r["reward"]), float(r["pass_at_1"]) - float(before["pass_at_1"])))
    out = {}
    for seed, xy in sorted(pairs.items()):
        x, y = zip(*xy, strict=True)
        if len(xy) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
            out[seed] = float(spearmanr(x, y).statistic)
    return out


def oracle_fraction(results: Sequence[tables.MethodResult], method: str = "knexa-fl",
                    metric: str = "pass_at_1") -> dict[str, Any] | None:
    """The fraction of Oracle-P2P's gain over Random-P2P that ``method`` reaches, paired by seed."""
    by = {r.name: r for r in results}
    if not all(m in by for m in (method, "random-p2p", "oracle-p2p")):
        return None
    k, rnd, o = (by[m].per_seed[metric] for m in (method, "random-p2p", "oracle-p2p"))
    gain_k = paired_difference(k, rnd)
    gain_o = paired_difference(o, rnd)
    if gain_k.ci.mean is None or gain_o.ci.mean is None:
        return None
    frac = gain_k.ci.mean / gain_o.ci.mean if gain_o.ci.mean > 0 else None
    return {"method": method, "metric": metric, "fraction": frac,
            "method_gain": gain_k.ci.to_dict(), "oracle_gain": gain_o.ci.to_dict(),
            "note": None if gain_o.ci.mean > 0 else "Oracle-P2P did not beat Random-P2P: no fraction"}


#: every matcher measured against the oracle: the P2P methods but the baseline, heuristic last
_FRACTION_METHODS = (*(m for m in P2P_METHODS if m not in ("random-p2p", "heuristic-p2p")), "heuristic-p2p")


def skills_summary(exp: Experiment, results: Sequence[tables.MethodResult]) -> dict[str, Any]:
    methods = [r.name for r in results]
    quality = {m: pair_quality(exp, m) for m in methods}
    signal = {m: reward_signal(exp, m) for m in methods}
    return {
        "categories": list(CATEGORIES),
        "skill_matrix": {m: {"after_round_1": _list(skill_matrix(exp, m, 1)), "final": _list(skill_matrix(exp, m))}
                         for m in methods},
        "pair_quality": {m: {**mean_ci(list(q.values())).to_dict(), "per_seed": q} for m, q in quality.items() if q},
        "reward_signal": {m: {**mean_ci(list(q.values())).to_dict(), "per_seed": q} for m, q in signal.items() if q},
        "oracle_fraction": [f for f in (oracle_fraction(results, m, metric)
                                        for m in _FRACTION_METHODS
                                        for metric in ("pass_at_1", "auc_pass_at_1")) if f],
    }


def _list(a: np.ndarray | None) -> list[list[float]] | None:
    return None if a is None else np.round(a, 4).tolist()


def _matrix_md(exp: Experiment, grid: np.ndarray) -> list[str]:
    head = "| client | model | " + " | ".join(_SHORT[c] for c in CATEGORIES) + " | mean |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 3)]
    for client, row in zip(exp.clients, grid, strict=True):
        cells = " | ".join("—" if np.isnan(v) else f"{100 * v:.0f}" for v in row)
        lines.append(f"| {client} | {exp.models.get(client, '')} | {cells} | {100 * np.nanmean(row):.1f} |")
    return lines


def skills_markdown(exp: Experiment, results: Sequence[tables.MethodResult], summary: dict[str, Any]) -> str:
    out = [f"# Skills benchmark: who learned what ({exp.directory.name})", "",
           "Pass@1 (%) per client and category on the global test set, mean over seeds. Clients are "
           "positions: every seed draws its own shards, so a row mixes different shards.", ""]
    first = next((m for m in ("local-only", *[r.name for r in results]) if skill_matrix(exp, m, 1) is not None), None)
    if first is not None:
        out += [f"## After round 1 ({tables.label(first)}; every method starts from the same models)", ""]
        out += _matrix_md(exp, skill_matrix(exp, first, 1)) + [""]
    for r in results:
        grid = skill_matrix(exp, r.name)
        if grid is not None:
            out += [f"## {r.label}: final round", ""] + _matrix_md(exp, grid) + [""]
    out += _per_method(summary.get("pair_quality", {}), "Pair quality",
                       "What a method's teacher could teach its student (sum over categories of the teacher's "
                       "skill above the student's, from the round before), mean over pairs; 95% t interval over "
                       "seeds.", "teachable gain per pair", ".3f")
    out += _per_method(summary.get("reward_signal", {}), "Does the reward track the student's real gain?",
                       "Spearman correlation, per seed, between the reward each student reported and the change "
                       "of its test Pass@1 in that round; mean and 95% t interval over seeds. Near 0: the "
                       "matchmaker learns from noise.", "Spearman(reward, ΔPass@1)", "+.2f")
    fractions = summary.get("oracle_fraction", [])
    if fractions:
        out += ["## Fraction of Oracle-P2P's gain over Random-P2P", "",
                "| method | metric | method − Random | Oracle − Random | fraction |", "|---|---|---|---|---|"]
        for f in fractions:
            mg, og = f["method_gain"], f["oracle_gain"]
            frac = "—" if f["fraction"] is None else f"{f['fraction']:.2f}"
            out.append(f"| {tables.label(f['method'])} | {f['metric']} | {_ci(mg)} | {_ci(og)} | {frac} |")
        out.append("")
    return "\n".join(out)


def _per_method(stats: dict[str, Any], title: str, intro: str, column: str, fmt: str) -> list[str]:
    """A section with one row per method of a per-seed statistic's mean and 95% half-width."""
    if not stats:
        return []
    out = [f"## {title}", "", intro, "", f"| method | {column} | n |", "|---|---|---|"]
    for m, q in stats.items():
        hw = f" ± {q['half_width']:{fmt.lstrip('+')}}" if q.get("half_width") is not None else ""
        out.append(f"| {tables.label(m)} | {q['mean']:{fmt}}{hw} | {q['n']} |")
    return out + [""]


def _ci(d: dict[str, Any]) -> str:
    if d.get("mean") is None:
        return "—"
    hw = d.get("half_width")
    return f"{100 * d['mean']:+.2f}" + (f" ± {100 * hw:.2f}" if hw is not None else "") + " pp"


def skills_plots(exp: Experiment, results: Sequence[tables.MethodResult], out: Path) -> list[Path]:
    """Skill heatmaps (round 1 and final per method) and match heatmaps side by side with Oracle's."""
    from .plots import _figure, _save

    paths = []
    names = [r.name for r in results if skill_matrix(exp, r.name) is not None]
    if names:
        panels = [("after round 1", skill_matrix(exp, names[0], 1))] + [
            (tables.label(m), skill_matrix(exp, m)) for m in names]
        fig = _figure((3.2 * len(panels), 0.35 * len(exp.clients) + 2.5))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, grid) in zip(axes, panels, strict=True):
            ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_title(title, fontsize="small")
            ax.set_xticks(range(len(CATEGORIES)), [_SHORT[c] for c in CATEGORIES], rotation=90, fontsize=6)
            ax.set_yticks(range(len(exp.clients)), exp.clients, fontsize=6)
        fig.suptitle("Pass@1 per client (rows) and category (columns), mean over seeds")
        paths.append(_save(fig, out / "skills_matrix.png"))
    shown = [m for m in ("random-p2p", "knexa-fl", "oracle-p2p") if any(any(c) for c in tables.match_counts(exp, m)[2])]
    if len(shown) >= 2:
        fig = _figure((4.5 * len(shown), 4.5))
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        for ax, m in zip(axes, shown, strict=True):
            teachers, students, counts = tables.match_counts(exp, m)
            ax.imshow(np.asarray(counts), cmap="Blues", vmin=0)
            ax.set_title(tables.label(m), fontsize="small")
            ax.set_xticks(range(len(students)), [s.split("-")[-1] for s in students])
            ax.set_yticks(range(len(teachers)), [t.split("-")[-1] for t in teachers])
            ax.set(xlabel="student", ylabel="teacher")
        fig.suptitle("teacher → student matches, all rounds and seeds")
        paths.append(_save(fig, out / "match_heatmaps_vs_oracle.png"))
    return paths

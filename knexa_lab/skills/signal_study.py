"""Which profile signal tells a matchmaker who can teach whom? (issue 13, docs/skills.md)

From a finished skills experiment (``metrics.jsonl`` and ``config.json``; no model is run), for
every ordered pair of clients (t, s) in every round r >= 2 of one method's runs (Random-P2P by
default: its pairs are drawn blind, so every pair's state is as likely as any other), it
correlates candidate signals with the ground truth:

- ground truth: the *teachable gain* ``sum_c max(0, k_t[c] - k_s[c])`` with k the clients' test
  Pass@1 per category at the end of round r - 1 (what Oracle-P2P maximises, and what the skills
  report's pair quality averages);
- ``js``: the Jensen-Shannon divergence of the two clients' data histograms, the term every
  profile carries (histograms rebuilt from the seed's split exactly as a node builds them);
- ``pass_gap``: ``max(0, pass_t - pass_s)`` of the clients' test Pass@1, the profile's
  performance term at its best (the profile only carries the node's own evaluation);
- ``skill_gap@k``: the same gap from *validation* Pass@1 per category, drawn as k validation
  problems per category would measure it (k outcomes ~ Bernoulli(test skill), so no model runs):
  what `Profile.skills` carries with k = ``skills.val_per_category``, and with twice as many.

It prints, per signal, the Spearman correlation with the teachable gain over all pairs of a
seed, averaged over seeds (and, for the drawn ones, over ``--draws`` draws), and writes them as
JSON with ``--out``.

    python -m knexa_lab.skills.signal_study docs/results/skills-ablations [--method random-p2p] [--out F]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from knexa_lab.experiment.skills_report import category_skills
from knexa_lab.skills.reward_study import spearman

__all__ = ["main", "pair_table", "study"]


def _histograms(config: dict[str, Any], seed: int) -> np.ndarray:
    """(clients, 12) data histograms of the seed's shards, as `TorchBackend.category_histogram`."""
    from knexa_lab.experiment.config import SkillsSection
    from knexa_lab.skills.split import make_skills_split
    from knexa_node.categories import histogram

    known = SkillsSection.__dataclass_fields__
    section = SkillsSection(**{k: v for k, v in config.get("skills", {}).items() if k in known})
    split = make_skills_split(section.split_settings(len(config["experiment"]["models"])), seed)
    return np.array([histogram(p["prompt"] for p in train) for train, _ in split.nodes])


def _validation_draw(pairs: list[dict[str, Any]], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) validation skills per pair as n problems per category would measure
    them: one measurement per client and round, shared by all of its pairs."""
    drawn: dict[tuple[str, int], np.ndarray] = {}

    def measured(name: str, rnd: int, skill: np.ndarray) -> np.ndarray:
        if (name, rnd) not in drawn:
            drawn[(name, rnd)] = rng.binomial(n, np.clip(skill, 0.0, 1.0)) / n
        return drawn[(name, rnd)]

    return (np.array([measured(p["teacher"], p["round"], p["k_t"]) for p in pairs]),
            np.array([measured(p["student"], p["round"], p["k_s"]) for p in pairs]))


def pair_table(rows: list[dict[str, Any]], method: str) -> dict[int, list[dict[str, Any]]]:
    """seed -> one entry per ordered pair (t, s) and round r >= 2: both clients' test skills and
    Pass@1 at the end of round r - 1, and their teachable gain."""
    mine = [r for r in rows if r["method"] == method and r.get("categories")]
    by_key: dict[tuple[int, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in mine:
        by_key[(r["seed"], r["round"])][r["client"]] = r
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (seed, rnd), clients in sorted(by_key.items()):
        if (seed, rnd + 1) not in by_key:
            continue  # the last round: no round after it for the pair to act in
        names = sorted(clients)
        for t in names:
            for s in names:
                if t == s:
                    continue
                kt, ks = category_skills(clients[t]), category_skills(clients[s])
                out[seed].append({"round": rnd + 1, "teacher": t, "student": s, "k_t": kt, "k_s": ks,
                                  "pass_t": float(clients[t]["pass_at_1"]), "pass_s": float(clients[s]["pass_at_1"]),
                                  "gain": float(np.maximum(kt - ks, 0.0).sum())})
    return dict(out)


def study(results: Path, method: str = "random-p2p", draws: int = 50, seed: int = 0) -> dict[str, Any]:
    """The correlations described in the module docstring, per seed and averaged over seeds.

    Raises:
        ValueError: no skills rows of ``method`` in ``results``.
    """
    from knexa_cpm.features import js_divergence

    results = Path(results)
    config = json.loads((results / "config.json").read_text())
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines() if line.strip()]
    table = pair_table(rows, method)
    if not table:
        raise ValueError(f"{results}: no skills rows of method {method!r} with two consecutive rounds")
    clients = sorted({r["client"] for r in rows})
    k = int(config.get("skills", {}).get("val_per_category", 2))
    rng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(clients)}
    per_seed: dict[str, dict[int, float]] = defaultdict(dict)
    for s, pairs in sorted(table.items()):
        hist = _histograms(config, s)
        gain = np.array([p["gain"] for p in pairs])
        ht = np.array([hist[index[p["teacher"]]] for p in pairs])
        hs = np.array([hist[index[p["student"]]] for p in pairs])
        per_seed["js"][s] = spearman(js_divergence(ht, hs), gain)
        per_seed["pass_gap"][s] = spearman(np.array([max(p["pass_t"] - p["pass_s"], 0.0) for p in pairs]), gain)
        for n in (k, 2 * k):
            rhos = []
            for _ in range(draws):
                vt, vs = _validation_draw(pairs, n, rng)
                rhos.append(spearman(np.maximum(vt - vs, 0.0).sum(axis=1), gain))
            per_seed[f"skill_gap@{n}"][s] = float(np.nanmean(rhos))
    mean = {name: float(np.nanmean(list(v.values()))) for name, v in per_seed.items()}
    return {"method": method, "val_per_category": k, "draws": draws, "pairs": sum(map(len, table.values())),
            "spearman_mean": mean, "spearman_per_seed": {n: dict(v) for n, v in per_seed.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knexa_lab.skills.signal_study",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("results", type=Path, help="a skills experiment's results directory")
    ap.add_argument("--method", default="random-p2p", help="whose runs' pairs to use (default random-p2p)")
    ap.add_argument("--draws", type=int, default=50, help="validation draws per seed (default 50)")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        res = study(args.results, args.method, args.draws)
    except (OSError, ValueError) as e:
        ap.exit(2, f"signal_study: {e}\n")
    print(f"Spearman with the teachable gain, {res['pairs']} ordered pairs of {res['method']} (mean over seeds):")
    for name, rho in res["spearman_mean"].items():
        print(f"  {name:14s} {rho:+.2f}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

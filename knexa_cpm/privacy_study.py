"""`knexa-cpm privacy-study`: matching quality against the profile noise's epsilon.

The node adds Laplace noise of scale ``17 / epsilon`` to the 24 dynamic profile dims
(``knexa_node.profile``); the bandit only ever sees those noised vectors. This study measures what
that costs on the synthetic federation of ``knexa-cpm simulate`` (``sim_world``): for each epsilon,
LinUCB (the service's default policy and context) plays the same worlds, with the same reward
noise, on profiles sanitized exactly as a node sanitizes them (``sanitize_profile``, rounded to 2
decimals, one fresh release per node per round). ``--budget`` additionally applies the node's
``PrivacyAccountant``, so profiles freeze once the budget is spent.

Quality is the *fraction of the oracle's gain*: ``(R - R_random) / (R_oracle - R_random)`` with R
the cumulative realised reward over the run, the oracle greedy on the true utility (it ignores
profiles, so its gain does not depend on epsilon) and random the floor. 1 = as good as the oracle,
0 = no better than random. The noise here comes from a seeded generator (reproducible study);
nodes draw theirs from the OS CSPRNG.

Outputs under --out: ``privacy.csv`` (one row per epsilon x world x N x het x seed) and
``privacy.md`` (mean fraction of oracle gain per epsilon, with a 95% t interval over draws).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .policies import OraclePolicy, Policy, make_policy
from .sim_world import WorldConfig, draw_federation, initial_state, profiles, step

__all__ = ["DEFAULT_EPSILONS", "configure_parser", "oracle_fraction", "run", "run_study"]

#: "inf" = no noise (profiles only rounded), the reference the curve is read against
DEFAULT_EPSILONS: tuple[float, ...] = (math.inf, 200.0, 100.0, 50.0, 20.0, 10.0, 5.0, 1.0)
_COLUMNS = ("epsilon", "budget", "world", "n", "het", "seed", "cum_linucb", "cum_random", "cum_oracle",
            "oracle_fraction", "frozen_rounds")


def _play(cfg: WorldConfig, choose: str, epsilon: float, budget: float, seed: int) -> tuple[float, int]:
    """Cumulative realised reward of one policy on one world; and rounds played on frozen profiles."""
    from knexa_node.profile import PrivacyAccountant

    fed = draw_federation(cfg)
    state = initial_state(fed)
    noise_rng = np.random.default_rng([seed, 0xD1FF])
    policy: Policy = OraclePolicy(10_000 + cfg.seed) if choose == "oracle" else \
        make_policy(choose, seed=10_000 + cfg.seed)
    eps = 0.0 if math.isinf(epsilon) else epsilon
    accountants = [PrivacyAccountant(eps, budget) for _ in range(cfg.n)]
    total = 0.0
    frozen = 0
    from .sim_world import utility

    for t in range(cfg.rounds):
        raw = profiles(fed, state)
        if choose == "linucb":
            frozen += int(accountants[0].exhausted)
            seen = np.stack([acc.release(raw[i], rng=noise_rng) for i, acc in enumerate(accountants)])
        else:
            seen = raw
        u = utility(fed, state)
        if isinstance(policy, OraclePolicy):
            policy.set_utility(u)
        pairs = policy.select(seen, t)
        if pairs:
            te = np.array([p[0] for p in pairs], dtype=np.int64)
            st = np.array([p[1] for p in pairs], dtype=np.int64)
            realised = u[te, st] + fed.reward_noise[t, te, st]
            policy.observe_batch(seen[te], seen[st], realised)
            total += float(realised.sum())
        state = step(fed, state, pairs, t)
    return total, frozen


def oracle_fraction(linucb: float, random: float, oracle: float) -> float:
    """(R - R_random) / (R_oracle - R_random); nan when the oracle gains nothing over random."""
    gap = oracle - random
    return (linucb - random) / gap if gap > 1e-12 else math.nan


def run_study(epsilons: Sequence[float], *, nodes: Sequence[int], hets: Sequence[str], seeds: Sequence[int],
              rounds: int, worlds: Sequence[str], budget: float = math.inf,
              progress: bool = True) -> list[dict[str, float | int | str]]:
    """One row per (epsilon, world, N, het, seed); see the module docstring."""
    rows: list[dict[str, float | int | str]] = []
    grid = [(w, n, h, s) for w in worlds for n in nodes for h in hets for s in seeds]
    for i, (world, n, het, seed) in enumerate(grid):
        cfg = WorldConfig(n=n, het=het, rounds=rounds, seed=seed, world=world)
        base_random = _play(cfg, "random", math.inf, math.inf, seed)[0]
        base_oracle = _play(cfg, "oracle", math.inf, math.inf, seed)[0]
        for eps in epsilons:
            got, frozen = _play(cfg, "linucb", eps, budget, seed)
            rows.append({"epsilon": eps, "budget": budget, "world": world, "n": n, "het": het, "seed": seed,
                         "cum_linucb": got, "cum_random": base_random, "cum_oracle": base_oracle,
                         "oracle_fraction": oracle_fraction(got, base_random, base_oracle),
                         "frozen_rounds": frozen})
        if progress:
            print(f"privacy-study: {i + 1}/{len(grid)} draws", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, float | int | str]]) -> str:
    from scipy import stats

    lines = ["| epsilon per round | fraction of oracle gain | 95% CI | draws |", "|---|---|---|---|"]
    for eps in dict.fromkeys(float(r["epsilon"]) for r in rows):
        vals = np.array([float(r["oracle_fraction"]) for r in rows if float(r["epsilon"]) == eps])
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        mean = float(vals.mean())
        half = float(stats.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size)) \
            if vals.size > 1 else math.nan
        label = "no noise" if math.isinf(eps) else f"{eps:g}"
        lines.append(f"| {label} | {mean:.3f} | [{mean - half:.3f}, {mean + half:.3f}] | {vals.size} |")
    return "\n".join(lines) + "\n"


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Flags of `knexa-cpm privacy-study`."""
    p.add_argument("--out", type=Path, default=Path("results/privacy-study"), help="output directory")
    p.add_argument("--epsilon", type=float, nargs="+", default=list(DEFAULT_EPSILONS),
                   help="per-round epsilons to try ('inf' = no noise)")
    p.add_argument("--budget", type=float, default=math.inf,
                   help="total epsilon budget per node (default: none, i.e. fresh noise every round)")
    p.add_argument("--nodes", type=int, nargs="+", default=[16], metavar="N")
    p.add_argument("--het", nargs="+", default=["low", "high"], choices=["low", "high"])
    p.add_argument("--seeds", type=int, default=5, help="world draws per grid point")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--world", nargs="+", default=["family", "affinity"], help="sim_world worlds")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    """Run the study, write privacy.csv and privacy.md, print the table."""
    bad = [e for e in args.epsilon if not (e > 0)]
    if bad or args.seeds < 1 or args.rounds < 1:
        print("knexa-cpm privacy-study: epsilons must be > 0, seeds and rounds >= 1", file=sys.stderr)
        return 2
    rows = run_study(args.epsilon, nodes=args.nodes, hets=args.het, seeds=range(args.seeds), rounds=args.rounds,
                     worlds=args.world, budget=args.budget, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "privacy.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = _table(rows)
    (args.out / "privacy.md").write_text(table)
    print(table)
    return 0

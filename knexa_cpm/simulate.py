"""`knexa-cpm simulate`: the synthetic matchmaker study (paper Fig. 2) on the pure CPM cores.

For every grid point (N agents, heterogeneity, seed) one federation is drawn (`sim_world`) and
every policy plays the same 100 rounds on its own copy of it, with the same reward and
evaluation noise. Each round a policy sees only profiles, selects disjoint ordered pairs, and the
students' raw rewards are fed back through `observe` exactly as the service does.

Regret is per round and measured against the oracle *in the policy's own state*: the expected
reward of the oracle's greedy matching on the true utility, minus the expected reward of the
pairs the policy chose. The oracle is greedy (like every policy here), not an exact maximum-weight
matching, so its own regret is 0 by definition and another policy's can dip slightly below 0.

Outputs under --out: `rounds.csv` (one row per policy x N x het x seed x round), `table.md`
(gain vs random, fraction of the oracle's gain, 95% CI over seeds) and PNG plots (`sim_report`).
The lead's `knexa-cpm` CLI calls `configure_parser` and `run`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .features import js_divergence
from .matching import greedy_disjoint
from .policies import LinUCBPolicy, OraclePolicy, Policy, make_policy
from .sim_world import (
    HETEROGENEITY,
    WorldConfig,
    draw_federation,
    initial_state,
    profiles,
    step,
    utility,
)

__all__ = ["COLUMNS", "SIM_POLICIES", "command_line", "configure_parser", "make_sim_policy", "run", "run_grid",
           "run_one"]

SIM_POLICIES: tuple[str, ...] = ("random", "heuristic", "linucb-concat", "linucb-interaction", "oracle")
COLUMNS: tuple[str, ...] = ("policy", "n", "het", "seed", "round", "reward", "cum_reward", "regret",
                            "cum_regret", "mean_js", "pairs")


@dataclass(frozen=True)
class PolicySettings:
    """LinUCB settings for the study (the service's defaults unless overridden)."""

    lam: float = 0.01
    beta0: float = 1.0
    beta_decay: float = 0.05
    beta_schedule: str = "inv_sqrt"


def make_sim_policy(name: str, seed: int, settings: PolicySettings = PolicySettings()) -> Policy:
    """A policy by study name: "linucb-<context>", "oracle", or any `make_policy` name."""
    if name == "oracle":
        return OraclePolicy(seed)
    if name.startswith("linucb-"):
        return LinUCBPolicy(context=name.removeprefix("linucb-"), lam=settings.lam,
                            beta0=settings.beta0, beta_decay=settings.beta_decay,
                            beta_schedule=settings.beta_schedule, seed=seed)
    return make_policy(name, seed=seed)


def run_one(cfg: WorldConfig, policies: Sequence[str],
            settings: PolicySettings = PolicySettings()) -> list[tuple[Any, ...]]:
    """All policies on one federation draw; rows in `COLUMNS` order."""
    fed = draw_federation(cfg)
    rows: list[tuple[Any, ...]] = []
    for name in policies:
        # policy seeds differ from the world seed, and are the same across policies
        policy = make_sim_policy(name, seed=10_000 + cfg.seed, settings=settings)
        state = initial_state(fed)
        oracle_rng = np.random.default_rng(cfg.seed)
        cum_r = cum_reg = 0.0
        for t in range(cfg.rounds):
            prof = profiles(fed, state)
            u = utility(fed, state)
            if isinstance(policy, OraclePolicy):
                policy.set_utility(u)
            pairs = policy.select(prof, t)
            te = np.array([p[0] for p in pairs], dtype=np.int64)
            st = np.array([p[1] for p in pairs], dtype=np.int64)
            realised = u[te, st] + fed.reward_noise[t, te, st]
            # one batched update per round: same A, b and reward statistics as observe() per pair
            policy.observe_batch(prof[te], prof[st], realised, teacher_ids=[str(i) for i in te.tolist()])
            if isinstance(policy, OraclePolicy):
                regret = 0.0
            else:
                best = greedy_disjoint(u, None, oracle_rng)
                regret = float(sum(u[i, j] for i, j in best) - u[te, st].sum())
            js = float(js_divergence(fed.hist[te], fed.hist[st]).mean()) if pairs else 0.0
            reward = float(realised.sum())
            cum_r += reward
            cum_reg += regret
            rows.append((name, cfg.n, cfg.het, cfg.seed, t, reward, cum_r, regret, cum_reg, js, len(pairs)))
            state = step(fed, state, pairs, t)
    return rows


def run_grid(nodes: Iterable[int], hets: Iterable[str], seeds: Iterable[int], rounds: int,
             policies: Sequence[str], *, world: dict[str, Any] | None = None,
             settings: PolicySettings = PolicySettings(), progress: bool = True) -> list[tuple[Any, ...]]:
    """Every (N, het, seed) grid point; rows in `COLUMNS` order."""
    grid = list(itertools.product(list(nodes), list(hets), list(seeds)))
    rows: list[tuple[Any, ...]] = []
    from tqdm import tqdm

    bar = tqdm(grid, desc="cpm simulate", unit="draw", disable=not progress, file=sys.stderr)
    for n, het, seed in bar:
        bar.set_postfix(n=n, het=het, seed=seed)
        cfg = replace(WorldConfig(n=n, het=het, rounds=rounds, seed=seed), **(world or {}))
        rows += run_one(cfg, policies, settings)
    return rows


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Flags of `knexa-cpm simulate` (defaults: the full grid of the paper's Fig. 2)."""
    p.add_argument("--out", type=Path, default=Path("results/cpm-sim"), help="output directory")
    p.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32, 64], metavar="N",
                   help="federation sizes (default: 8 16 32 64)")
    p.add_argument("--het", nargs="+", choices=HETEROGENEITY, default=list(HETEROGENEITY),
                   help="heterogeneity: low = Dirichlet alpha 10, high = alpha 0.1")
    p.add_argument("--rounds", type=int, default=100, help="rounds per run (default 100)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    p.add_argument("--seed0", type=int, default=0, help="first seed (seeds are seed0 .. seed0+seeds-1)")
    p.add_argument("--policies", nargs="+", choices=SIM_POLICIES, default=list(SIM_POLICIES),
                   help="policies to compare (random and oracle are needed for the table)")
    p.add_argument("--noise", type=float, default=WorldConfig.noise, help="reward noise sd (points)")
    p.add_argument("--cap-range", type=float, nargs=2, default=[WorldConfig.cap_low, WorldConfig.cap_high],
                   metavar=("LO", "HI"), help="agents' capacity ~ U(LO, HI); equal values = same capacity")
    p.add_argument("--lam", type=float, default=PolicySettings.lam, help="LinUCB ridge lambda")
    p.add_argument("--beta0", type=float, default=PolicySettings.beta0, help="LinUCB initial exploration")
    p.add_argument("--beta-decay", type=float, default=PolicySettings.beta_decay,
                   help="beta_t = beta0 / sqrt(1 + decay * t)")
    p.add_argument("--no-plots", action="store_true", help="write CSV and table only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the grid, write CSV, table and plots under args.out; returns an exit code."""
    from .sim_report import write_csv, write_plots, write_table

    if args.rounds < 1 or args.seeds < 1 or any(n < 2 for n in args.nodes):
        print("knexa-cpm simulate: need rounds >= 1, seeds >= 1 and every N >= 2", file=sys.stderr)
        return 2
    lo, hi = args.cap_range
    if not 0.0 <= lo <= hi <= 1.0:
        print("knexa-cpm simulate: --cap-range needs 0 <= LO <= HI <= 1", file=sys.stderr)
        return 2
    settings = PolicySettings(lam=args.lam, beta0=args.beta0, beta_decay=args.beta_decay)
    started = time.perf_counter()
    rows = run_grid(args.nodes, args.het, range(args.seed0, args.seed0 + args.seeds), args.rounds,
                    args.policies, world={"noise": args.noise, "cap_low": args.cap_range[0],
                                                "cap_high": args.cap_range[1]}, settings=settings,
                    progress=not args.quiet)
    elapsed = time.perf_counter() - started
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(rows, out / "rounds.csv")]
    table = write_table(rows, out / "table.md", command=command_line(args))
    written.append(out / "table.md")
    if not args.no_plots:
        written += write_plots(rows, out)
    print(table)
    print(f"{len(rows)} rows in {elapsed:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (recorded in table.md)."""
    parts = ["knexa-cpm simulate", "--nodes", *map(str, args.nodes), "--het", *args.het,
             "--rounds", str(args.rounds), "--seeds", str(args.seeds), "--seed0", str(args.seed0),
             "--policies", *args.policies, "--noise", str(args.noise),
             "--cap-range", *map(str, args.cap_range), "--lam", str(args.lam),
             "--beta0", str(args.beta0), "--beta-decay", str(args.beta_decay), "--out", str(args.out)]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m knexa_cpm.simulate`), same flags as the subcommand."""
    parser = argparse.ArgumentParser(prog="knexa-cpm simulate", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`knexa-cpm simulate`: the synthetic matchmaker study (paper Fig. 2) on the pure CPM cores.

For every grid point (N agents, heterogeneity, seed) one federation is drawn (`sim_world`) and
every policy plays the same 100 rounds on its own copy of it, with the same reward and
evaluation noise. Each round a policy sees only profiles, selects disjoint ordered pairs, and the
students' raw rewards are fed back through `observe` exactly as the service does.

Worlds (`--world`, see `sim_world`) decide what makes a pair compatible; each is reported in
its own table and side by side.

Regret is per round and measured *in the policy's own state*: the best any matchmaker could
expect this round, minus the expected reward of the pairs the policy chose. "The best" is the
assignment relaxation's bound on the maximum-weight matching of the true utility
(`matching.matching_upper_bound`): exact whenever the relaxation is integral, otherwise at most
slightly above the optimum (the exact integer programme takes up to a second per round at 64
agents, too slow for the grid), so regrets are upper bounds. The greedy oracle has a regret of
its own. Reference rows:

- `oracle`: greedy on the true expected utility (the paper's kind of oracle, and the denominator
  of "fraction of oracle gain");
- `oracle-exact`: whole-round matching (`matching.round_matching`) on the true utility;
- `best-fixed`: the best fixed matching in hindsight, played every round. Finding the truly best
  fixed matching would mean simulating every matching, so it is the better (by realised
  cumulative reward) of two hindsight candidates: the whole-round matching on the initial
  utility, and on the utility summed over the oracle's whole trajectory. It is a lower bound on
  the best fixed matching.

A "+trust" suffix (e.g. `linucb-interaction+trust`) turns the policy's trust scores on with
`--trust-weight`; ids are passed as the service passes peer ids.

Outputs under --out: `rounds.csv` (one row per policy x N x het x seed x round), `table.md`
(gain vs random, fraction of the oracle's gain, 95% CI over seeds) and PNG plots (`sim_report`).
The lead's `knexa-cpm` CLI calls `configure_parser` and `run`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .features import js_divergence
from .hybrid import HybridPolicy
from .matching import matching_upper_bound, round_matching
from .policies import LinUCBPolicy, OraclePolicy, Policy, make_policy
from .sim_world import (
    HETEROGENEITY,
    WORLDS,
    Federation,
    SimState,
    WorldConfig,
    draw_federation,
    initial_state,
    profiles,
    step,
    utility,
)

__all__ = ["COLUMNS", "DEFAULT_WORLDS", "SIM_POLICIES", "command_line", "configure_parser", "make_sim_policy",
           "run", "run_grid", "run_one"]

SIM_POLICIES: tuple[str, ...] = ("random", "heuristic", "linucb-concat", "linucb-interaction", "hybrid",
                                 "oracle", "oracle-exact", "best-fixed")
#: the worlds of the main study; "poison" is the trust study's world
DEFAULT_WORLDS: tuple[str, ...] = ("family", "affinity", "tokenizer", "wrong")
_REFERENCE = ("oracle", "oracle-exact", "best-fixed")
COLUMNS: tuple[str, ...] = ("policy", "world", "n", "het", "seed", "round", "reward", "cum_reward", "regret",
                            "cum_regret", "mean_js", "pairs", "bad_pairs", "mean_score")
#: trace(policy, round, profiles, pairs, noise of those pairs): what a policy was shown and drew
Trace = Callable[[str, int, np.ndarray, list[tuple[int, int]], np.ndarray], None]


@dataclass(frozen=True)
class PolicySettings:
    """LinUCB settings for the study (the service's defaults unless overridden)."""

    lam: float = 0.01
    beta0: float = 1.0
    beta_decay: float = 0.05
    beta_schedule: str = "inv_sqrt"
    trust_weight: float = 1.0


def check_policy_name(name: str) -> str:
    """`name` if the study knows it (a `SIM_POLICIES` entry, learning ones optionally "+trust")."""
    base = name.removesuffix("+trust")
    if base not in SIM_POLICIES or (base != name and base in ("random", "heuristic", *_REFERENCE)):
        raise argparse.ArgumentTypeError(f"unknown policy {name!r}; choose from {', '.join(SIM_POLICIES)} "
                                         "(learning policies also as NAME+trust)")
    return name


def make_sim_policy(name: str, seed: int, settings: PolicySettings = PolicySettings()) -> Policy:
    """A policy by study name: "linucb-<context>", "hybrid", "oracle", "oracle-exact", or any
    `make_policy` name; "+trust" turns trust scores on with `settings.trust_weight`."""
    trust = settings.trust_weight if name.endswith("+trust") else 0.0
    name = name.removesuffix("+trust")
    if name in ("oracle", "oracle-exact"):
        return OraclePolicy(seed, exact=name == "oracle-exact")
    if name.startswith("linucb-"):
        return LinUCBPolicy(context=name.removeprefix("linucb-"), lam=settings.lam,
                            beta0=settings.beta0, beta_decay=settings.beta_decay,
                            beta_schedule=settings.beta_schedule, seed=seed, trust_weight=trust)
    if name == "hybrid":
        return HybridPolicy(seed=seed, trust_weight=trust)
    return make_policy(name, seed=seed)


def _fixed_chooser(pairs: list[tuple[int, int]]) -> Callable[[int, np.ndarray, np.ndarray], list[tuple[int, int]]]:
    return lambda t, prof, u: list(pairs)


def _play(fed: Federation, name: str, choose: Callable[[int, np.ndarray, np.ndarray], list[tuple[int, int]]],
          learn: Policy | None, trace: Trace | None) -> tuple[list[tuple[Any, ...]], list[np.ndarray]]:
    """One policy's run on its own copy of the world; rows and the true utility of every round."""
    cfg = fed.cfg
    state: SimState = initial_state(fed)
    bad = fed.harmful.any(axis=1)
    ids = [f"agent-{i}" for i in range(cfg.n)]
    cum_r = cum_reg = 0.0
    rows: list[tuple[Any, ...]] = []
    utilities: list[np.ndarray] = []
    for t in range(cfg.rounds):
        prof = profiles(fed, state)
        u = utility(fed, state)
        utilities.append(u)
        pairs = choose(t, prof, u)
        te = np.array([p[0] for p in pairs], dtype=np.int64)
        st = np.array([p[1] for p in pairs], dtype=np.int64)
        noise = fed.reward_noise[t, te, st]
        if trace is not None:
            trace(name, t, prof, pairs, noise)
        realised = u[te, st] + noise
        if learn is not None:
            # one batched update per round: same state as observe() per pair, in order
            learn.observe_batch(prof[te], prof[st], realised, teacher_ids=[ids[i] for i in te.tolist()],
                                student_ids=[ids[i] for i in st.tolist()])
        regret = matching_upper_bound(u) - float(u[te, st].sum())
        js = float(js_divergence(fed.hist[te], fed.hist[st]).mean()) if pairs else 0.0
        reward = float(realised.sum())
        cum_r += reward
        cum_reg += regret
        state = step(fed, state, pairs, t)
        score = float((fed.weights * state.skill).sum(axis=1).mean())
        rows.append((name, cfg.world, cfg.n, cfg.het, cfg.seed, t, reward, cum_r, regret, cum_reg, js, len(pairs),
                     int(bad[te].sum()), score))
    return rows, utilities


def run_one(cfg: WorldConfig, policies: Sequence[str], settings: PolicySettings = PolicySettings(),
            trace: Trace | None = None) -> list[tuple[Any, ...]]:
    """All policies on one federation draw; rows in `COLUMNS` order.

    `trace`, if given, is called with what each policy saw and drew every round (tests use it to
    show that two policies get identical draws).
    """
    fed = draw_federation(cfg)
    rows: list[tuple[Any, ...]] = []
    oracle_utilities: list[np.ndarray] | None = None
    for name in policies:
        if name == "best-fixed":
            if oracle_utilities is None:
                greedy = OraclePolicy(10_000 + cfg.seed)
                oracle_utilities = _play(fed, "oracle", _oracle_chooser(greedy), None, None)[1]
            candidates = [round_matching(oracle_utilities[0]), round_matching(np.sum(oracle_utilities, axis=0))]
            runs = [_play(fed, name, _fixed_chooser(c), None, trace)[0] for c in candidates]
            rows += max(runs, key=lambda r: r[-1][COLUMNS.index("cum_reward")])
            continue
        # policy seeds differ from the world seed, and are the same across policies
        policy = make_sim_policy(name, seed=10_000 + cfg.seed, settings=settings)
        if isinstance(policy, OraclePolicy):
            got, utilities = _play(fed, name, _oracle_chooser(policy), None, trace)
            if not policy.exact:
                oracle_utilities = utilities
        else:
            ids = [f"agent-{i}" for i in range(cfg.n)]
            got = _play(fed, name, lambda t, prof, u, p=policy, ids=ids: p.select(prof, t, peer_ids=ids), policy,
                        trace)[0]
        rows += got
    return rows


def _oracle_chooser(policy: OraclePolicy) -> Callable[[int, np.ndarray, np.ndarray], list[tuple[int, int]]]:
    def choose(t: int, prof: np.ndarray, u: np.ndarray) -> list[tuple[int, int]]:
        policy.set_utility(u)
        return policy.select(prof, t)
    return choose


def run_grid(nodes: Iterable[int], hets: Iterable[str], seeds: Iterable[int], rounds: int,
             policies: Sequence[str], *, world: dict[str, Any] | None = None,
             settings: PolicySettings = PolicySettings(), progress: bool = True,
             worlds: Iterable[str] = ("family",)) -> list[tuple[Any, ...]]:
    """Every (world, N, het, seed) grid point; rows in `COLUMNS` order."""
    grid = list(itertools.product(list(worlds), list(nodes), list(hets), list(seeds)))
    rows: list[tuple[Any, ...]] = []
    from tqdm import tqdm

    bar = tqdm(grid, desc="cpm simulate", unit="draw", disable=not progress, file=sys.stderr)
    for name, n, het, seed in bar:
        bar.set_postfix(world=name, n=n, het=het, seed=seed)
        cfg = replace(WorldConfig(n=n, het=het, rounds=rounds, seed=seed, world=name), **(world or {}))
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
    p.add_argument("--world", nargs="+", choices=WORLDS, default=list(DEFAULT_WORLDS),
                   help="what makes a pair compatible (default: family affinity tokenizer wrong; "
                   "poison is the trust study)")
    p.add_argument("--policies", nargs="+", type=check_policy_name, default=list(SIM_POLICIES), metavar="POLICY",
                   help=f"policies to compare, from {', '.join(SIM_POLICIES)}; learning ones also as NAME+trust "
                   "(random and oracle are needed for the table)")
    p.add_argument("--cross-family", type=float, default=WorldConfig.cross_family,
                   help="compat across backbone families in the family world (1.0 = no family effect)")
    p.add_argument("--trust-weight", type=float, default=PolicySettings.trust_weight,
                   help="trust weight of the NAME+trust policies")
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
    if not 0.0 <= args.cross_family <= 1.0 or args.trust_weight < 0:
        print("knexa-cpm simulate: --cross-family needs 0..1 and --trust-weight >= 0", file=sys.stderr)
        return 2
    settings = PolicySettings(lam=args.lam, beta0=args.beta0, beta_decay=args.beta_decay,
                              trust_weight=args.trust_weight)
    started = time.perf_counter()
    rows = run_grid(args.nodes, args.het, range(args.seed0, args.seed0 + args.seeds), args.rounds,
                    args.policies, world={"noise": args.noise, "cap_low": args.cap_range[0],
                                          "cap_high": args.cap_range[1], "cross_family": args.cross_family},
                    settings=settings, progress=not args.quiet, worlds=args.world)
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
    parts = ["knexa-cpm simulate", "--world", *args.world, "--nodes", *map(str, args.nodes), "--het", *args.het,
             "--rounds", str(args.rounds), "--seeds", str(args.seeds), "--seed0", str(args.seed0),
             "--policies", *args.policies, "--noise", str(args.noise),
             "--cap-range", *map(str, args.cap_range), "--cross-family", str(args.cross_family),
             "--trust-weight", str(args.trust_weight), "--lam", str(args.lam),
             "--beta0", str(args.beta0), "--beta-decay", str(args.beta_decay), "--out", str(args.out)]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m knexa_cpm.simulate`), same flags as the subcommand."""
    parser = argparse.ArgumentParser(prog="knexa-cpm simulate", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

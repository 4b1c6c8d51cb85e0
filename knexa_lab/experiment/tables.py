"""The numbers behind Table 4 and the per-client table, and their markdown.

Definitions (the header of ``table4.md`` repeats them, so a reader need not open this file):

- A (method, seed) run's *final round* is the last round it completed. A method's final round is
  the latest any of its seeds reached; seeds that stopped earlier are left out of its row (and
  named under the table) rather than averaged with a different round.
- Pass@k, CodeBLEU and val loss of one seed: the mean over clients at the method's final round.
- Mean reward of one seed: the mean of every reward logged (Eq. 3, one per student and round).
- MB exchanged: bytes sent + received by one client over the whole run, mean over clients; what
  a client's link carried, so P2P (one side sends) and server methods (both ways) compare.
- Pass@1 AUC: the mean over rounds of the clients' mean Pass@1 (area under the curve, in %).
- Budget (per client, whole run): optimizer steps on local data (local epochs and every Eq. 2
  step), steps that included a teacher's text, tokens trained on, tokens generated for teaching.
- Wall time: the run's rounds summed; a round is the sum of its clients' shares in simulation
  (they run one after another) and the slowest client with ``--mode daemons`` (in parallel).
- Each cell: mean over seeds with the 95% Student's t half-width (:mod:`.stats`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .stats import CONFIDENCE, MeanCI, finite, mean_ci

if TYPE_CHECKING:
    from .report import Experiment

__all__ = [
    "COMPARISONS", "LABELS", "METRICS", "MethodResult", "Metric", "format_comparisons",
    "format_per_client", "format_table4", "label", "match_counts", "method_note", "per_seed_curves",
    "summarize", "verdict",
]

#: the paper's names for the registry's methods (a method not listed shows its own name)
LABELS: dict[str, str] = {
    "local-only": "LocalOnly", "random-p2p": "Random-P2P", "heuristic-p2p": "Heuristic-P2P",
    "knexa-fl": "KNEXA-FL", "knexa-fl-concat": "KNEXA-FL (concat)",
    "knexa-fl-hybrid": "KNEXA-FL (hybrid)", "knexa-fl-skills": "KNEXA-FL (hybrid + skills)",
    "knexa-fl-compact": "KNEXA-FL (compact + skills)",
    "knexa-fl-prior": "KNEXA-FL (compact + skills + prior)",
    "knexa-fl-prior-greedy": "KNEXA-FL (prior, greedy)",
    "knexa-fl-prior-adaptive": "KNEXA-FL (prior, adaptive)", "skill-gap-p2p": "Skill-gap P2P",
    "fedavg": "FedAvg",
    "central-kd": "Central-KD", "fedid-centralkd": "FedID-CentralKD", "fedproxy": "FedProxy",
    "oracle-p2p": "Oracle-P2P",
}
#: the paired comparisons table4.md states when both methods are present (the README's claims)
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("knexa-fl", "random-p2p"), ("knexa-fl", "local-only"), ("knexa-fl-concat", "random-p2p"),
    ("knexa-fl-hybrid", "random-p2p"), ("knexa-fl-skills", "random-p2p"), ("knexa-fl-skills", "knexa-fl-hybrid"),
    ("knexa-fl-compact", "random-p2p"), ("knexa-fl-prior", "random-p2p"), ("knexa-fl-prior", "skill-gap-p2p"),
    ("knexa-fl-prior-greedy", "random-p2p"), ("knexa-fl-prior-greedy", "skill-gap-p2p"),
    ("knexa-fl-prior-adaptive", "random-p2p"), ("knexa-fl-prior-adaptive", "skill-gap-p2p"),
    ("skill-gap-p2p", "random-p2p"),
    ("random-p2p", "local-only"), ("oracle-p2p", "random-p2p"), ("oracle-p2p", "knexa-fl"))


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    header: str
    #: shown value = raw value * scale (Pass@k fractions are shown in % like the paper)
    scale: float = 1.0
    digits: int = 3
    #: True: one value per client at the final round; False: a whole-run quantity
    final: bool = True


METRICS: tuple[Metric, ...] = (
    Metric("pass_at_1", "Pass@1 (%)", 100.0, 2), Metric("pass_at_5", "Pass@5 (%)", 100.0, 2),
    Metric("pass_at_10", "Pass@10 (%)", 100.0, 2), Metric("codebleu", "CodeBLEU", 1.0, 3),
    Metric("val_loss", "Val loss", 1.0, 3), Metric("reward", "Mean reward", 1.0, 3, final=False),
    Metric("mb_exchanged", "MB exchanged/client", 1.0, 3, final=False),
    Metric("wall_s", "Wall (s)", 1.0, 1, final=False),
    Metric("auc_pass_at_1", "Pass@1 AUC (%)", 100.0, 2, final=False),
    Metric("local_steps", "Local steps/client", 1.0, 1, final=False),
    Metric("kd_steps", "KD steps/client", 1.0, 1, final=False),
    Metric("tokens_trained", "Tokens trained/client", 1.0, 0, final=False),
    Metric("tokens_generated", "Tokens generated/client", 1.0, 0, final=False),
)
#: the whole-run budget columns (sums over rounds, mean over clients)
BUDGET_KEYS: tuple[str, ...] = ("local_steps", "kd_steps", "tokens_trained", "tokens_generated")
_BY_KEY = {m.key: m for m in METRICS}
_FINAL_KEYS = tuple(m.key for m in METRICS if m.final)


def label(method: str) -> str:
    return LABELS.get(method, method)


@dataclass(frozen=True)
class MethodResult:
    """One method's row of Table 4 and its per-client table, with what is missing."""

    name: str
    #: the latest round any seed completed (None: no rows)
    final_round: int | None
    expected_rounds: int
    #: seeds in the row (reached final_round), and seeds expected but without any row
    seeds: tuple[int, ...]
    missing_seeds: tuple[int, ...]
    #: seed -> its last round, for seeds that stopped before final_round (left out)
    short_seeds: dict[int, int]
    #: metric -> seed -> value (None: not measured)
    per_seed: dict[str, dict[int, float | None]]
    cis: dict[str, MeanCI]
    #: client -> metric -> mean over seeds of the client's final-round value
    per_client: dict[str, dict[str, MeanCI]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return label(self.name)

    @property
    def partial(self) -> bool:
        return bool(self.missing_seeds or self.short_seeds or self.final_round is None
                    or self.final_round < self.expected_rounds)


def _by(rows: Sequence[dict[str, Any]], *keys: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]].append(r)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    return mean_ci(values).mean


def _run_values(rows: Sequence[dict[str, Any]], final_round: int, parallel: bool) -> dict[str, float | None]:
    """One (method, seed) run's values of every metric (rows: all its rows)."""
    last = [r for r in rows if r["round"] == final_round]
    out: dict[str, float | None] = {k: _mean([r.get(k) for r in last]) for k in _FINAL_KEYS}
    rewards = finite(r.get("reward") for r in rows)
    out["reward"] = sum(rewards) / len(rewards) if rewards else None
    clients = {r["client"] for r in rows}
    traffic = sum(sum(finite([r.get("bytes_sent"), r.get("bytes_received")])) for r in rows)
    out["mb_exchanged"] = traffic / len(clients) / 1e6
    per_round = [finite(r.get("wall_s") for r in rs) for rs in _by(rows, "round").values()]
    walls = [(max(w) if parallel else sum(w)) for w in per_round if w]
    out["wall_s"] = sum(walls) if walls else None
    # area under the Pass@1-vs-round curve, normalised to [0, 1]: the mean over rounds of the
    # clients' mean Pass@1 (rewards learning early, not only where a run ends)
    curve = [_mean([r.get("pass_at_1") for r in rs]) for _, rs in sorted(_by(rows, "round").items())]
    curve = [c for c in curve if c is not None]
    out["auc_pass_at_1"] = sum(curve) / len(curve) if curve else None
    for key in BUDGET_KEYS:
        spent = finite(r.get(key) for r in rows)
        out[key] = sum(spent) / len(clients) if spent else None
    return out


def _method_result(exp: Experiment, name: str) -> MethodResult:
    rows = [r for r in exp.rows if r["method"] == name]
    runs = _by(rows, "seed")
    last = {seed: max(r["round"] for r in rs) for seed, rs in runs.items()}
    final = max(last.values(), default=None)
    seeds = tuple(sorted(s for s, n in last.items() if n == final))
    per_seed: dict[str, dict[int, float | None]] = {m.key: {} for m in METRICS}
    for seed in seeds:
        for key, value in _run_values(runs[seed], final, exp.mode == "daemons").items():
            per_seed[key][seed] = value
    per_client: dict[str, dict[str, MeanCI]] = {}
    if final is not None:
        at_final = _by([r for r in rows if r["round"] == final and r["seed"] in seeds], "client")
        for client in exp.clients:
            if client in at_final:
                per_client[client] = {k: mean_ci([r.get(k) for r in at_final[client]]) for k in _FINAL_KEYS}
    return MethodResult(
        name=name, final_round=final, expected_rounds=exp.rounds, seeds=seeds,
        missing_seeds=tuple(s for s in exp.seeds if s not in runs),
        short_seeds={s: n for s, n in sorted(last.items()) if n != final},
        per_seed=per_seed, cis={k: mean_ci(v.values()) for k, v in per_seed.items()},
        per_client=per_client)


def summarize(exp: Experiment) -> list[MethodResult]:
    """Every method of the experiment in report order (those without rows included)."""
    return [_method_result(exp, m) for m in exp.methods]


def match_counts(exp: Experiment, method: str) -> tuple[list[str], list[str], list[list[int]]]:
    """(teachers, students, counts[teacher][student]) of ``method``'s student rows with a
    partner, over every round and seed; clients first in order, then other partners (a server)."""
    pairs = [(r["partner"], r["client"]) for r in exp.rows
             if r["method"] == method and r.get("role") == "student" and r.get("partner")]
    extra = sorted({t for t, _ in pairs} - set(exp.clients))
    teachers, students = [*exp.clients, *extra], list(exp.clients)
    counts = [[0] * len(students) for _ in teachers]
    for t, s in pairs:
        counts[teachers.index(t)][students.index(s)] += 1
    return teachers, students, counts


def per_seed_curves(exp: Experiment, method: str, key: str, *, cumulative: bool = False,
                    missing: float | None = None) -> dict[int, dict[int, float]]:
    """seed -> round -> mean over that round's rows of ``key`` (``missing``, if given, stands
    for a round with no value; ``cumulative`` sums the rounds up to each one)."""
    out: dict[int, dict[int, float]] = {}
    for seed, rows in sorted(_by([r for r in exp.rows if r["method"] == method], "seed").items()):
        curve, total = {}, 0.0
        for rnd, rs in sorted(_by(rows, "round").items()):
            value = _mean([r.get(key) for r in rs])
            value = missing if value is None else value
            if value is None:
                continue
            total += value
            curve[rnd] = total if cumulative else value
        if curve:
            out[seed] = curve
    return out


# ---- markdown -----------------------------------------------------------------------------------

def _cell(ci: MeanCI, metric: Metric, n_row: int) -> str:
    if ci.mean is None:
        return "—"
    s, d = metric.scale, metric.digits
    text = f"{ci.mean * s:.{d}f}"
    if ci.half_width is None:
        return f"{text} (n=1)"
    text += f" ± {ci.half_width * s:.{d}f}"
    return text if ci.n == n_row else f"{text} (n={ci.n})"


#: metric -> (threshold in raw units, header, scale, digits), largest first: a column's unit is
#: the first whose threshold its largest mean reaches, so tiny runs do not show "0.000 MB"
_UNITS: dict[str, tuple[tuple[float, str, float, int], ...]] = {
    "wall_s": ((600.0, "Wall (min)", 1 / 60, 2), (0.0, "Wall (s)", 1.0, 1)),
    "mb_exchanged": ((1.0, "MB exchanged/client", 1.0, 3), (1e-3, "kB exchanged/client", 1e3, 2),
                     (0.0, "bytes exchanged/client", 1e6, 0)),
}


def _displayed(results: Sequence[MethodResult]) -> list[Metric]:
    """METRICS with the unit of each whole-run column chosen for this table's values."""
    out = []
    for m in METRICS:
        if m.key in _UNITS:
            means = [abs(r.cis[m.key].mean) for r in results if r.cis[m.key].mean is not None]
            top = max(means, default=0.0)
            _, header, scale, digits = next(u for u in _UNITS[m.key] if top >= u[0])
            m = Metric(m.key, header, scale, digits, final=False)
        out.append(m)
    return out


def _seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds) or "none"


def method_note(r: MethodResult) -> str:
    """One line: the seeds behind a method's row and what is missing."""
    head = f"- {r.label} (`{r.name}`): "
    if r.final_round is None:
        return head + f"no rows yet (0 of {len(r.missing_seeds)} seeds) — not run"
    text = (f"n={len(r.seeds)} seed{'s' if len(r.seeds) != 1 else ''} ({_seeds_text(r.seeds)}), "
            f"final round {r.final_round} of {r.expected_rounds}")
    gaps = []
    if r.final_round < r.expected_rounds:
        gaps.append(f"stopped after round {r.final_round} of {r.expected_rounds}")
    if r.missing_seeds:
        gaps.append(f"no rows for seed{'s' if len(r.missing_seeds) > 1 else ''} {_seeds_text(r.missing_seeds)}")
    gaps += [f"seed {s} stopped at round {n} (left out)" for s, n in r.short_seeds.items()]
    return head + text + (f" — **partial**: {'; '.join(gaps)}" if gaps else "")


def format_table4(exp: Experiment, results: Sequence[MethodResult], comparisons: Sequence[dict[str, Any]]) -> str:
    models = ", ".join(f"{c}={exp.models.get(c, '?')}" for c in exp.clients)
    prov = [f"preset `{exp.preset}`" if exp.preset else "", f"mode {exp.mode}",
            f"commit {exp.commit}" if exp.commit else ""]
    lines = [f"# Table 4 — {exp.directory.name}", "",
             f"**{exp.rounds} rounds · {len(exp.clients)} clients · {len(exp.seeds)} seeds "
             f"({_seeds_text(exp.seeds)})** — {', '.join(p for p in prov if p)}", "",
             f"Clients: {models}.", ""]
    if exp.notes:
        lines += [*(f"> {note}" for note in exp.notes), ""]
    lines += [
        f"Each cell: mean ± {CONFIDENCE:.0%} CI half-width over seeds (Student's t, n−1 d.o.f.; "
        "n=1: no interval). Per seed: the mean over clients at the method's final round (Pass@k "
        "in %), the mean of all rewards logged, bytes sent + received per client over the run, and "
        "the run's wall time. — : not measured (Pass@5/10 need `experiment.passk_samples`).", ""]
    metrics = _displayed(results)
    lines.append("| method | " + " | ".join(m.header for m in metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for r in results:
        if r.final_round is None:
            continue
        name = r.label + (" (partial)" if r.partial else "")
        lines.append(f"| {name} | " + " | ".join(_cell(r.cis[m.key], m, len(r.seeds)) for m in metrics) + " |")
    lines += ["", "Seeds per method:", *[method_note(r) for r in results]]
    if comparisons:
        lines += ["", format_comparisons(comparisons)]
    lines += ["", f"From `{exp.directory / 'metrics.jsonl'}`; regenerate with `knexa-lab report "
                  f"{exp.directory}`."]
    return "\n".join(lines) + "\n"


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    """The paired a − b differences as a markdown table with a plain verdict per line."""
    lines = [f"Paired differences over seeds (a − b per seed, mean and {CONFIDENCE:.0%} t-interval; "
             "Pass@k in percentage points):", "",
             "| a − b | metric | mean | 95% CI | n | verdict |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        m = _BY_KEY[c["metric"]]
        s, d = m.scale, m.digits
        mean = "—" if c["mean"] is None else f"{c['mean'] * s:+.{d}f}"
        ci = ("—" if c["ci_low"] is None else f"[{c['ci_low'] * s:+.{d}f}, {c['ci_high'] * s:+.{d}f}]")
        lines.append(f"| {label(c['a'])} − {label(c['b'])} | {m.header} | {mean} | {ci} | {c['n']} | "
                     f"{verdict(c)} |")
    return "\n".join(lines)


def verdict(c: dict[str, Any]) -> str:
    """What a comparison says, in words. It names the method with the *higher* value rather than
    a winner, because for a loss lower is better; table4.md compares only Pass@1 and CodeBLEU."""
    if c["n"] == 0:
        return "no seeds in common"
    if c["excludes_zero"] is None:
        return f"n={c['n']}: no interval, cannot tell"
    if not c["excludes_zero"]:
        return "no significant difference (CI includes 0)"
    higher = c["a"] if c["mean"] > 0 else c["b"]
    return f"{label(higher)} higher (CI excludes 0)"


def format_per_client(exp: Experiment, results: Sequence[MethodResult]) -> str:
    shown = [r for r in results if r.per_client]
    lines = [f"# Final-round metrics per client — {exp.directory.name}", "",
             "Each cell: the client's value at its method's final round, mean ± 95% CI over seeds "
             "(Pass@k in %).", "", "## Pass@1 (%)", "",
             "| client | model | " + " | ".join(r.label for r in shown) + " |",
             "|---|---" + "|---" * len(shown) + "|"]
    p1 = _BY_KEY["pass_at_1"]
    for c in exp.clients:
        cells = [_cell(r.per_client[c]["pass_at_1"], p1, len(r.seeds)) if c in r.per_client else "—"
                 for r in shown]
        lines.append(f"| {c} | {exp.models.get(c, '?')} | " + " | ".join(cells) + " |")
    final = [_BY_KEY[k] for k in _FINAL_KEYS]
    for r in shown:
        lines += ["", f"## {r.label}" + (" (partial)" if r.partial else "")
                  + f" — round {r.final_round}, seed{'s' if len(r.seeds) != 1 else ''} {_seeds_text(r.seeds)}",
                  "",
                  "| client | model | " + " | ".join(m.header for m in final) + " |",
                  "|---|---" + "|---" * len(final) + "|"]
        for c, cis in r.per_client.items():
            lines.append(f"| {c} | {exp.models.get(c, '?')} | "
                         + " | ".join(_cell(cis[m.key], m, len(r.seeds)) for m in final) + " |")
    return "\n".join(lines) + "\n"

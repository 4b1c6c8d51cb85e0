"""The experiment report: Table 4, per-client tables, plots and ``summary.json`` from saved metrics.

Reads only the results directory (``metrics.jsonl``, and ``config.json`` / ``run-info.json`` when
present), so ``knexa-lab report DIR`` rebuilds everything without re-running, and a report of a
run still in progress or cut short shows what is there and marks what is not.

- :func:`write_report`: every file; :func:`format_table4`: the table as text;
  :func:`compare`: a paired a − b difference over seeds (what the README's claims rest on).
- ``tables.py``: the numbers and the markdown; ``plots.py``: the figures; ``stats.py``: the
  t intervals.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knexa_runtime.atomic import atomic_write_json, atomic_write_text

from . import plots, skills_report, tables
from .metrics import METRICS_JSONL, read_rows
from .stats import CONFIDENCE, paired_difference

__all__ = ["Experiment", "compare", "format_table4", "load_experiment", "write_report"]

logger = logging.getLogger(__name__)
TABLE4 = "table4.md"
PER_CLIENT = "per_client.md"
SUMMARY = "summary.json"
PLOTS_DIR = "plots"
#: the metrics each default comparison in table4.md states
COMPARED_METRICS: tuple[str, ...] = ("pass_at_1", "codebleu")


@dataclass(frozen=True)
class Experiment:
    """A results directory as the report reads it."""

    directory: Path
    #: valid rows, one per (method, seed, round, client) (a repeated key: the last line wins)
    rows: tuple[dict[str, Any], ...]
    #: report order: ``experiment.methods`` of the config, then any other method in the rows
    methods: tuple[str, ...]
    #: planned rounds (config), else the most any run completed
    rounds: int
    #: planned seeds (config, else run-info) and any other seed in the rows
    seeds: tuple[int, ...]
    clients: tuple[str, ...]
    #: client -> model alias
    models: dict[str, str]
    #: "sim" or "daemons" (run-info; decides how per-client wall times add up)
    mode: str = "sim"
    preset: str = ""
    commit: str | None = None
    #: what the report had to guess (shown at the top of table4.md)
    notes: tuple[str, ...] = ()


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} missing: planned rounds, seeds and methods are taken from the rows.")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name} unreadable ({type(exc).__name__}); using the rows instead.")
        return {}
    return data if isinstance(data, dict) else {}


def _valid(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row with int seed/round, or None when it cannot be placed in any table."""
    try:
        seed, rnd = int(row["seed"]), int(row["round"])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(row.get("method"), str) or not isinstance(row.get("client"), str) or rnd < 1:
        return None
    return {**row, "seed": seed, "round": rnd}


def _client_key(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def _method_order(planned: list[str], rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """Config order; without a config, the registry's order; then methods only the rows name."""
    if not planned:
        from .methods import REGISTRY

        seen = {r["method"] for r in rows}
        planned = [m for m in REGISTRY if m in seen]
    return tuple(dict.fromkeys([*planned, *(r["method"] for r in rows)]))


def _commit(git: Any) -> str | None:
    if not isinstance(git, dict) or not git.get("commit"):
        return None
    return str(git["commit"])[:12] + (" (dirty)" if git.get("dirty") else "")


def load_experiment(results_dir: Path) -> Experiment:
    """Read a results directory, tolerating a missing config/run-info and odd rows.

    Raises:
        FileNotFoundError: ``results_dir`` has no ``metrics.jsonl``.
    """
    results_dir = Path(results_dir)
    path = results_dir / METRICS_JSONL
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_JSONL} in {results_dir}")
    notes: list[str] = []
    raw = read_rows(path)
    unique = {}
    for row in raw:
        v = _valid(row) if isinstance(row, dict) else None
        if v is not None:
            unique[(v["method"], v["seed"], v["round"], v["client"])] = v
    if len(unique) < len(raw):
        notes.append(f"{len(raw) - len(unique)} of {len(raw)} rows skipped (repeated or without "
                     "method/seed/round/client).")
    rows = list(unique.values())
    cfg = _read_json(results_dir / "config.json", notes)
    info = _read_json(results_dir / "run-info.json", notes)
    e = cfg.get("experiment") if isinstance(cfg.get("experiment"), dict) else {}
    planned_seeds = e.get("seeds") or info.get("seeds") or []
    seeds = sorted({int(s) for s in planned_seeds} | {r["seed"] for r in rows})
    done = max((r["round"] for r in rows), default=0)
    rounds = int(e.get("rounds") or done)
    config_models = [str(m) for m in e.get("models") or []]
    models = {f"client-{i}": m for i, m in enumerate(config_models)}
    for r in rows:  # the configured name wins: a skills row holds its per-seed model's cache path
        if r.get("model"):
            models.setdefault(r["client"], str(r["model"]))
    clients = tuple(sorted({*models, *(r["client"] for r in rows)}, key=_client_key))
    commit = _commit(info.get("git"))
    if isinstance(info.get("parts"), list):  # `knexa-lab merge`: each part ran from its own checkout
        commit = " + ".join(dict.fromkeys(_commit(p.get("git")) or "?" for p in info["parts"] if isinstance(p, dict)))
    return Experiment(
        directory=results_dir, rows=tuple(rows), methods=_method_order(list(e.get("methods") or []), rows),
        rounds=rounds, seeds=tuple(seeds), clients=clients, models=models,
        mode=str(info.get("mode") or "sim"), preset=str(cfg.get("preset") or info.get("preset") or ""),
        commit=commit, notes=tuple(notes))


def _compare(exp: Experiment, results: list[tables.MethodResult], a: str, b: str, metric: str) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    for m in (a, b):
        if m not in by_name:
            raise ValueError(f"method {m!r} is not in {exp.directory} (methods: {', '.join(exp.methods)})")
    keys = [m.key for m in tables.METRICS]
    if metric not in keys:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(keys)}")
    va, vb = by_name[a].per_seed[metric], by_name[b].per_seed[metric]
    d = paired_difference(va, vb)
    ci = d.ci
    return {
        "a": a, "b": b, "metric": metric, "confidence": CONFIDENCE,
        "seeds": list(d.seeds), "differences": list(d.differences), "n": ci.n,
        "mean": ci.mean, "half_width": ci.half_width, "ci_low": ci.low, "ci_high": ci.high,
        "excludes_zero": ci.excludes_zero,
        "a_mean": _avg([va[s] for s in d.seeds]), "b_mean": _avg([vb[s] for s in d.seeds]),
        "a_final_round": by_name[a].final_round, "b_final_round": by_name[b].final_round,
    }


def _avg(values: list[Any]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(results_dir: Path, a: str, b: str, metric: str = "pass_at_1") -> dict[str, Any]:
    """Paired difference ``a − b`` of ``metric`` over the seeds both methods measured.

    Each seed's value is the one in Table 4 (for Pass@k and CodeBLEU: the mean over clients at
    the method's final round), in raw units (Pass@k as a fraction, not %).

    Returns:
        ``a``, ``b``, ``metric``, ``seeds`` and per-seed ``differences``, ``n``, ``mean``,
        ``half_width``, ``ci_low``/``ci_high`` (95% Student's t; None when n < 2),
        ``excludes_zero`` (None when n < 2), ``a_mean``/``b_mean`` over those seeds and each
        method's final round.

    Raises:
        ValueError: a method with no rows, or an unknown metric.
        FileNotFoundError: no ``metrics.jsonl``.
    """
    exp = load_experiment(results_dir)
    return _compare(exp, tables.summarize(exp), a, b, metric)


def _default_comparisons(exp: Experiment, results: list[tables.MethodResult]) -> list[dict[str, Any]]:
    present = {r.name for r in results if r.final_round is not None}
    return [_compare(exp, results, a, b, m) for a, b in tables.COMPARISONS
            if a in present and b in present for m in COMPARED_METRICS]


def format_table4(results_dir: Path) -> str:
    """``table4.md`` as text: Table 4, seeds per method, and the default paired comparisons."""
    exp = load_experiment(results_dir)
    results = tables.summarize(exp)
    return tables.format_table4(exp, results, _default_comparisons(exp, results))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _summary(exp: Experiment, results: list[tables.MethodResult], comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    methods = []
    for r in results:
        matches = tables.match_counts(exp, r.name)
        methods.append({
            "name": r.name, "label": r.label, "final_round": r.final_round, "partial": r.partial,
            "seeds": list(r.seeds), "missing_seeds": list(r.missing_seeds), "short_seeds": r.short_seeds,
            "metrics": {k: {**ci.to_dict(), "per_seed": r.per_seed[k]} for k, ci in r.cis.items()},
            "per_client": {c: {k: ci.to_dict() for k, ci in m.items()} for c, m in r.per_client.items()},
            "matches": {"teachers": matches[0], "students": matches[1], "counts": matches[2]}
            if any(map(any, matches[2])) else None,
        })
    return _json_safe({
        "directory": str(exp.directory), "rounds": exp.rounds, "seeds": list(exp.seeds),
        "clients": {c: exp.models.get(c) for c in exp.clients}, "mode": exp.mode,
        "preset": exp.preset, "commit": exp.commit, "confidence": CONFIDENCE, "notes": list(exp.notes),
        "units": {"pass_at_1": "fraction", "pass_at_5": "fraction", "pass_at_10": "fraction",
                  "codebleu": "fraction", "val_loss": "nats/token", "reward": "Eq. 3",
                  "mb_exchanged": "MB (1e6 bytes) sent + received per client, whole run",
                  "wall_s": "seconds, whole run", "auc_pass_at_1": "fraction (mean over rounds)",
                  "local_steps": "optimizer steps per client, whole run", "kd_steps": "optimizer steps per client",
                  "tokens_trained": "tokens per client", "tokens_generated": "tokens per client (teaching)"},
        "methods": methods, "comparisons": comparisons,
    })


def write_report(results_dir: Path) -> list[Path]:
    """Write table4.md, per_client.md, summary.json and the plots; return their paths.

    A plot with nothing to show (no rewards, no student rows with partners) is not written.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``results_dir``.
    """
    exp = load_experiment(results_dir)
    results = tables.summarize(exp)
    comparisons = _default_comparisons(exp, results)
    out = Path(results_dir)
    written = []
    for name, text in ((TABLE4, tables.format_table4(exp, results, comparisons)),
                       (PER_CLIENT, tables.format_per_client(exp, results))):
        atomic_write_text(out / name, text)
        written.append(out / name)
    written += plots.write_plots(exp, results, out / PLOTS_DIR)
    summary = _summary(exp, results, comparisons)
    if skills_report.has_skills(exp):
        summary["skills"] = _json_safe(skills_report.skills_summary(exp, results))
        atomic_write_text(out / skills_report.SKILLS_MD, skills_report.skills_markdown(exp, results, summary["skills"]))
        written.append(out / skills_report.SKILLS_MD)
        written += skills_report.skills_plots(exp, results, out / PLOTS_DIR)
    atomic_write_json(out / SUMMARY, summary)
    written.append(out / SUMMARY)
    logger.info("report of %s: %d files", out, len(written))
    return written

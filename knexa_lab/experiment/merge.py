"""One experiment from results directories that ran it in parts (``knexa-lab merge``).

Every (method, seed) run is independent of the others (its own split, models and seeds), so a
preset that takes hours can run its seeds on several machines, or across sessions, and be
reported as one. Merging is only honest if the parts are the same experiment: their
configurations must agree on everything but which methods and seeds they ran (and ``jobs``,
which does not change results), each run must be complete, and a run present in two parts must
have the same rows (it was reproduced, not re-rolled). Anything else is refused with the reason.
The merged ``run-info.json`` keeps each part's provenance (command, commits, resumes).
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from knexa_runtime.atomic import atomic_write_json

from .engine import CONFIG_FILE, RUN_INFO_FILE, ExperimentError, _differences, _with_defaults
from .metrics import METRICS_CSV, METRICS_JSONL, append_rows, read_rows, write_csv

__all__ = ["MergeError", "Part", "Unfinished", "merge_results"]

#: fields that legitimately differ between two executions of the same run: the wall clock, and
#: the model's cache path (a skills client model is rebuilt bit for bit under another cache dir)
_VOLATILE = ("wall_s", "model")
#: config keys a part may differ in
_PER_PART = ("methods", "seeds", "jobs")


Unfinished = Literal["refuse", "keep", "drop"]


class MergeError(ExperimentError):
    """The parts are not one experiment, or a part is unfinished; the message says which and why."""


@dataclass(frozen=True)
class Part:
    """One results directory, read."""

    path: Path
    config: dict[str, Any]
    info: dict[str, Any]
    #: rows by (method, seed), in file order (round by round, as the engine appends them)
    runs: dict[tuple[str, int], list[dict[str, Any]]]


def _read_part(path: Path) -> Part:
    path = Path(path)
    for name in (CONFIG_FILE, METRICS_JSONL):
        if not (path / name).is_file():
            raise MergeError(f"{path} is not an experiment's results directory ({name} missing)")
    try:
        config = _with_defaults(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
        info_path = path / RUN_INFO_FILE
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: unreadable config.json or run-info.json ({exc})") from exc
    seeds = config.get("experiment", {}).get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise MergeError(f"{path}/{CONFIG_FILE}: experiment.seeds must be a list of integers, not {seeds!r}")
    rows = read_rows(path / METRICS_JSONL)
    bad = [r for r in rows if not isinstance(r, dict) or not {"method", "seed", "round", "client"} <= r.keys()
           or not all(isinstance(r[k], int) and not isinstance(r[k], bool) for k in ("seed", "round"))]
    if bad:
        raise MergeError(f"{path}/{METRICS_JSONL}: {len(bad)} rows without method/seed/round/client "
                         "or with a seed or round that is not an integer")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        runs[(r["method"], r["seed"])].append(r)
    return Part(path, config, info, dict(runs))


def _shared(config: dict[str, Any]) -> dict[str, Any]:
    """What every part must agree on."""
    exp = {k: v for k, v in config.get("experiment", {}).items() if k not in _PER_PART}
    return {**config, "experiment": exp}


def _check_same_experiment(parts: Sequence[Part], mixed_versions: bool) -> list[str]:
    """Refuse parts that are not one experiment; return notes on package versions that differ
    (refused unless ``mixed_versions``: another tokenizers or transformers can change numbers)."""
    from .provenance import version_differences

    first, notes = parts[0], []
    for other in parts[1:]:
        changed = version_differences(first.info.get("packages"), other.info.get("packages"))
        if changed and not mixed_versions:
            raise MergeError(f"{first.path} and {other.path} ran with other package versions ({', '.join(changed)}), "
                             "which can change results; rerun one in the other's environment (scripts/bootstrap.sh "
                             "installs constraints.txt), or pass --mixed-versions to merge them anyway (noted)")
        notes += [f"package versions differ: {first.path} -> {other.path}: {', '.join(changed)}"] if changed else []
        diff = _differences(_shared(first.config), _shared(other.config))
        if diff:
            raise MergeError(f"{other.path} is another experiment than {first.path}: their configurations "
                             f"differ in {', '.join(diff)}")
        modes = first.info.get("mode", "sim"), other.info.get("mode", "sim")
        if modes[0] != modes[1]:
            raise MergeError(f"{first.path} ran --mode {modes[0]}, {other.path} --mode {modes[1]}")
    return notes


def _unfinished(part: Part, rounds: int) -> dict[tuple[str, int], str]:
    """The runs of ``part`` that lack rows, each with what it lacks."""
    problems = {}
    for (method, seed), rows in sorted(part.runs.items()):
        by_round: dict[int, set[str]] = defaultdict(set)
        for r in rows:
            by_round[r["round"]].add(str(r["client"]))
        clients = by_round.get(1, set())
        missing = [r for r in range(1, rounds + 1) if by_round.get(r) != clients or not clients]
        if missing:
            problems[(method, seed)] = (f"{method} seed {seed} in {part.path} lacks rows for round(s) "
                                        f"{', '.join(map(str, missing))} of {rounds}")
    return problems


def _comparable(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(r["round"], r["client"]): {k: v for k, v in r.items() if k not in _VOLATILE} for r in rows}


def merge_results(parts: Sequence[Path], out: Path, *, unfinished: Unfinished = "refuse",
                  mixed_versions: bool = False, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``out`` (config.json, run-info.json, metrics.jsonl/.csv) as one experiment holding
    every run of ``parts``; return its run-info. The caller writes the report.

    Args:
        unfinished: what to do with a run that lacks rows: "refuse" it, "keep" it as it is (the
            report marks it partial), or "drop" it (one part then extracts the finished runs of
            an experiment still in progress). Kept and dropped runs are listed in the notes.
        mixed_versions: accept parts whose recorded package versions differ (noted).
    Raises:
        MergeError: no parts, ``out`` not empty, configurations that differ beyond
            methods/seeds/jobs or in package versions (unless ``mixed_versions``), an unfinished
            run (when refused), or a run in two parts whose rows differ.
    """
    if not parts:
        raise MergeError("merge needs at least one results directory")
    if unfinished not in ("refuse", "keep", "drop"):
        raise ValueError(f"unfinished must be refuse, keep or drop, not {unfinished!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} is not empty; merge into a new directory")
    read = [_read_part(p) for p in parts]
    version_notes = _check_same_experiment(read, mixed_versions)
    rounds = int(read[0].config.get("experiment", {}).get("rounds") or 0)
    lacking = {(part.path, key): why for part in read for key, why in _unfinished(part, rounds).items()}
    if lacking and unfinished == "refuse":
        raise MergeError("unfinished runs (finish them with knexa-lab experiment --resume DIR, or pass "
                         "--partial to report them as they are, or --finished-only to leave them out): "
                         + "; ".join(lacking.values()))

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    source: dict[tuple[str, int], Path] = {}
    reproduced = []
    for part in read:
        for key, rows in part.runs.items():
            if unfinished == "drop" and (part.path, key) in lacking:
                continue
            if key not in runs:
                runs[key], source[key] = rows, part.path
                continue
            if _comparable(rows) != _comparable(runs[key]):
                raise MergeError(f"{key[0]} seed {key[1]} is in {source[key]} and {part.path} with different "
                                 "rows: the same run must give the same rows; keep one of them")
            reproduced.append(f"{key[0]} seed {key[1]} ({source[key]} and {part.path}: same rows)")

    if not runs:
        raise MergeError("no finished run to merge")
    methods = dict.fromkeys([m for part in read for m in part.config["experiment"].get("methods", [])]
                            + [m for m, _ in runs])
    seeds = sorted({s for part in read for s in part.config["experiment"].get("seeds", [])} | {s for _, s in runs})
    config = copy.deepcopy(read[0].config)
    config["experiment"]["methods"] = [m for m in methods if any(k[0] == m for k in runs)]
    config["experiment"]["seeds"] = [s for s in seeds if any(k[1] == s for k in runs)]

    info = {k: v for k, v in read[0].info.items() if k not in ("command", "started", "resumed", "resumed_git", "notes")}
    info.update({
        "seeds": config["experiment"]["seeds"],
        "command": " ".join(argv) if argv is not None else None,
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": [{
            "directory": str(part.path),
            "runs": {m: sorted(s for (mm, s) in part.runs if mm == m) for m in dict.fromkeys(m for m, _ in part.runs)},
            # a part that is itself a merge keeps its own parts: provenance nests, nothing is lost
            **{k: part.info[k] for k in ("command", "started", "git", "resumed", "resumed_git", "packages", "machine",
                                          "notes", "merged", "parts") if k in part.info},
        } for part in read],
    })
    commits = set((p.info.get("git") or {}).get("commit") for p in read)
    if len(commits) > 1:
        info["git"] = None  # no single commit produced these rows; each part's is under "parts"
    notes = [f"merged from {len(read)} results director{'y' if len(read) == 1 else 'ies'} with `knexa-lab merge`"]
    notes += version_notes
    notes += [f"reproduced: {r}" for r in reproduced]
    notes += [f"{'left out' if unfinished == 'drop' else 'unfinished'}: {why}" for why in lacking.values()]
    info["notes"] = notes

    out.mkdir(parents=True, exist_ok=True)
    key_order = {m: i for i, m in enumerate(config["experiment"]["methods"])}
    ordered_keys = sorted(runs, key=lambda k: (k[1], key_order[k[0]]))
    append_rows(out / METRICS_JSONL, [r for k in ordered_keys for r in runs[k]])
    write_csv(out / METRICS_JSONL, out / METRICS_CSV)
    atomic_write_json(out / CONFIG_FILE, config)
    atomic_write_json(out / RUN_INFO_FILE, info)
    return info

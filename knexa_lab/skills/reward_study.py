"""Which reward measure tracks what a teacher actually teaches? (issue 13, docs/skills.md)

On one seed of the skills benchmark, after the round-0 local epoch, every client is the student
of every other client once, from the same saved state: the round's Eq. 2 steps without a teacher
(the counterfactual) and with each teacher's package. For each ordered pair it records

- the candidate rewards: the drop of validation loss (the paper's dL) and the drop of validation
  error (1 - Pass@1 on the same validation problems, executed),
- the ground truth: the change of the student's Pass@1 on the 240 global test problems that the
  package caused, and the oracle's teachable gain (probe skills of the teacher above the student).

It prints, per measure, the Spearman correlation with the ground truth within each student (the
bandit ranks teachers for a student) and pooled, and writes every pair to ``pairs.jsonl``.

    python -m knexa_lab.skills.reward_study --out docs/results/skills-reward-study --seed 1 \
        [--set learning.teach_min_skill=0.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_study", "spearman", "summarize"]

logger = logging.getLogger(__name__)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _measure(b: Any) -> tuple[float, float, float]:
    """(validation loss, validation error, test Pass@1) of a backend's current state."""
    ev = b.evaluate(0)  # its report holds the validation loss too
    return ev.val_loss, b.validation_error(), ev.pass_at_1


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman correlations of each candidate reward with the ground truth (within each student,
    then averaged; and pooled), and the packages' mean test effect and best-teacher effect."""
    students = sorted({r["student"] for r in rows})
    by_student = {s: [r for r in rows if r["student"] == s] for s in students}
    result: dict[str, Any] = {"pairs": len(rows), "measures": {}}
    for m in ("d_val_loss", "d_val_error"):
        within = np.array([[spearman([r[m] for r in mine], [r[g] for r in mine]) for g in ("d_test_pass", "teachable")]
                           for mine in by_student.values()])
        result["measures"][m] = {
            "within_student_vs_test_gain": float(np.nanmean(within[:, 0])),
            "within_student_vs_teachable": float(np.nanmean(within[:, 1])),
            "pooled_vs_test_gain": spearman([r[m] for r in rows], [r["d_test_pass"] for r in rows]),
            "pooled_vs_teachable": spearman([r[m] for r in rows], [r["teachable"] for r in rows]),
        }
    result["teachable_vs_test_gain_within_student"] = float(np.nanmean(
        [spearman([r["teachable"] for r in mine], [r["d_test_pass"] for r in mine]) for mine in by_student.values()]))
    result["mean_test_effect"] = float(np.mean([r["d_test_pass"] for r in rows]))
    result["best_teacher_test_effect"] = float(np.mean([max(r["d_test_pass"] for r in mine)
                                                        for mine in by_student.values()]))
    return result


def run_study(out: Path, seed: int, cache_dir: Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from knexa_lab.experiment.config import resolve_config
    from knexa_lab.experiment.engine import build_clients, prepare_split
    from knexa_lab.experiment.methods.oracle import skill_gain_scores
    from knexa_node.data import read_jsonl
    from protocol._layout import CATEGORIES

    cfg = resolve_config("skills", overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_split(cfg, seed, out / "data" / f"seed-{seed}")
    clients = build_clients(cfg, seed, data_dir, cache_dir)
    probe = read_jsonl(data_dir / "oracle" / "probe.jsonl")
    for c in clients:
        c.backend.train_local_epoch(0)
    skills = np.array([[c.backend.pass_by_category(probe).get(k, 0.0) for k in CATEGORIES] for c in clients])
    teachable = skill_gain_scores(skills)  # (teacher, student)
    prompts = clients[0].backend.transfer_prompts()
    packages = [c.backend.generate_answers(prompts) for c in clients]
    rows: list[dict[str, Any]] = []
    total = cfg.experiment.rounds
    for s, student in enumerate(clients):
        b = student.backend
        snap = b.trainer.snapshot()
        b.integrate_local(0, total)  # the counterfactual branch
        base = _measure(b)
        b.trainer.restore(snap)
        for t in range(len(clients)):
            if t == s:
                continue
            t0 = time.perf_counter()
            b.kd_steps(packages[t], 0, total)
            got = _measure(b)
            b.trainer.restore(snap)
            rows.append({"teacher": t, "student": s, "items": len(packages[t]), "d_val_loss": base[0] - got[0],
                         "d_val_error": base[1] - got[1], "d_test_pass": got[2] - base[2],
                         "teachable": float(teachable[t, s]), "seconds": round(time.perf_counter() - t0, 2)})
            logger.info("pair %d -> %d: %s", t, s, rows[-1])
    with open(out / f"pairs-seed{seed}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    result = {"seed": seed, **summarize(rows)}
    (out / f"summary-seed{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where the split, pairs and summary go")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a skills preset value, as knexa-lab experiment --set")
    parser.add_argument("--pairs", type=Path, default=None,
                        help="only summarize an earlier run's pairs-*.jsonl (no models; prints the summary)")
    args = parser.parse_args(argv)
    if args.pairs is not None:
        try:
            rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
            summary = summarize(rows)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"cannot summarize {args.pairs}: {type(exc).__name__}: {exc}")
        print(json.dumps(summary, indent=2))
        return 0
    if args.out is None:
        parser.error("--out is required (unless --pairs summarizes an earlier run)")
    from knexa_lab.experiment.config import parse_overrides

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_study(args.out, args.seed, args.cache_dir, parse_overrides(args.set)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Turn the nodes' round logs into a per-round table, CSV/JSON files and a final summary."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["collect", "format_round_table", "format_summary", "write_results"]


def _short(peer: str | None) -> str:
    return peer[-6:] if peer else "-"


def collect(node_dirs: Iterable[tuple[str, Path]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read every node's rounds.jsonl and final.json; entries get a `name` (node-0, ...)."""
    rounds: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    for name, d in node_dirs:
        path = d / "rounds.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    rounds.append({"name": name, **json.loads(line)})
        final = d / "final.json"
        if final.exists():
            finals.append({"name": name, **json.loads(final.read_text())})
    rounds.sort(key=lambda e: (e["round"], e["name"]))
    return rounds, finals


def _names(rounds: list[dict[str, Any]]) -> dict[str, str]:
    return {e["node"]: e["name"] for e in rounds}


def format_round_table(rounds: list[dict[str, Any]]) -> str:
    """One line per match: teacher -> student, reward, student's val loss before/after, Pass@1."""
    names = _names(rounds)
    pass1 = {(e["round"], e["name"]): e["pass_at_1"] for e in rounds}
    header = f"{'round':>5}  {'teacher -> student':<24} {'reward':>9} {'val loss before':>15} {'after':>8} {'Pass@1 T/S':>12}"
    lines = [header, "-" * len(header)]
    for e in rounds:
        if e.get("role") != "student":
            continue
        teacher = names.get(e["partner"], _short(e["partner"]))
        if "reward" in e:
            reward, pre, post = f"{e['reward']:+.4f}", f"{e['val_loss_pre']:.4f}", f"{e['val_loss_post']:.4f}"
        else:
            reward, pre, post = "failed", "-", "-"
        p_t = pass1.get((e["round"], teacher), float("nan"))
        lines.append(f"{e['round']:>5}  {teacher + ' -> ' + e['name']:<24} {reward:>9} {pre:>15} {post:>8} "
                     f"{p_t:>5.2f}/{e['pass_at_1']:<5.2f}")
    idle = sorted({(e["round"], e["name"]) for e in rounds if e.get("role") in ("idle", "no_directive")})
    if idle:
        lines.append("unmatched: " + ", ".join(f"r{r}:{n}" for r, n in idle))
    return "\n".join(lines)


def format_summary(rounds: list[dict[str, Any]], finals: list[dict[str, Any]]) -> str:
    by_node: dict[str, list[dict[str, Any]]] = {}
    for e in rounds:
        by_node.setdefault(e["name"], []).append(e)
    final = {f["name"]: f for f in finals}
    header = f"{'node':<8} {'model':<16} {'rounds':>6} {'taught':>6} {'learned':>7} {'mean reward':>11} {'Pass@1 first':>12} {'final':>6} {'val loss first':>14} {'final':>7}"
    lines = [header, "-" * len(header)]
    for name in sorted(by_node):
        es = by_node[name]
        rewards = [e["reward"] for e in es if "reward" in e]
        f = final.get(name, {})
        lines.append(
            f"{name:<8} {es[0]['model'][:16]:<16} {len(es):>6} {sum(e['role'] == 'teacher' for e in es):>6} "
            f"{len(rewards):>7} {(sum(rewards) / len(rewards) if rewards else float('nan')):>11.4f} "
            f"{es[0]['pass_at_1']:>12.3f} {f.get('pass_at_1', float('nan')):>6.3f} "
            f"{es[0]['val_loss']:>14.4f} {f.get('val_loss', float('nan')):>7.4f}"
        )
    return "\n".join(lines)


def write_results(out: Path, rounds: list[dict[str, Any]], finals: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rounds": rounds, "final": finals}, indent=2))
    cols = ["round", "name", "model", "role", "partner", "train_loss", "val_loss", "pass_at_1", "codebleu",
            "val_loss_pre", "val_loss_post", "reward", "package_bytes", "directive_source", "seconds"]
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rounds)

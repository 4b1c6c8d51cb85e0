"""``metrics.jsonl`` (the record) and ``metrics.csv`` (a copy for spreadsheets).

One JSON object per (method, seed, round, client) with exactly :data:`base.METRIC_FIELDS`. Rows
of a round are appended together and fsynced before that round's checkpoint is written, so after
a crash the file may hold rows *beyond* the last checkpoint (dropped on resume by
:func:`drop_rows`) or one torn last line (skipped by :func:`read_rows`), never a gap.
Non-finite floats are written as null: JSON has no NaN, and a diverged model's loss is "unknown".
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from knexa_runtime.atomic import atomic_write_text

from .methods.base import METRIC_FIELDS

__all__ = ["METRICS_CSV", "METRICS_JSONL", "append_rows", "drop_rows", "read_rows", "write_csv"]

logger = logging.getLogger(__name__)
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in METRIC_FIELDS if k not in row]
    extra = [k for k in row if k not in METRIC_FIELDS]
    if missing or extra:
        raise ValueError(f"metrics row fields: missing {missing}, unexpected {extra}")
    out = {}
    for k in METRIC_FIELDS:
        v = row[k]
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def append_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows (validated against METRIC_FIELDS) and fsync, under an exclusive lock so
    parallel runs never interleave their lines."""
    text = "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete row; a torn line (a crash mid-append) is skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping a torn line", path, n)
    return rows


def drop_rows(path: Path, drop: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite ``path`` atomically without the rows where ``drop(row)`` (and without torn lines);
    returns how many rows went."""
    rows = read_rows(path)
    kept = [r for r in rows if not drop(r)]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if path.exists() and path.read_text(encoding="utf-8") != text:  # also clears a torn last line
        atomic_write_text(path, text)
    return len(rows) - len(kept)


def write_csv(jsonl: Path, out: Path) -> None:
    """``metrics.csv`` from ``metrics.jsonl`` (None -> empty cell), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in read_rows(jsonl):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    atomic_write_text(out, buf.getvalue())

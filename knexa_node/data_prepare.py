"""`knexa-node data prepare`: turn an organization's own problem files into a node's private data.

An organization joins a federation to improve its model on *its* problems, which come in many
shapes. This module reads them, row by row, and keeps a record of every row it does not keep:

* **formats**: HumanEval-style jsonl (``prompt, canonical_solution, test, entry_point``,
  optional ``task_id``), MBPP-style jsonl (``text|prompt, code, test_list``), local Hugging Face
  ``datasets`` folders (``save_to_disk``) and files (``.json`` as an array or JSON lines,
  ``.jsonl``, ``.parquet``), and CSV with a header naming the same columns (an MBPP
  ``test_list`` cell is a JSON array or one ``assert`` per line). ``--map field=column``
  renames columns of any format.
* **checks, in order**: the row parses and has the fields of one of the two shapes; it is not a
  duplicate (same task id or same prompt up to whitespace) of a row already kept; it does not
  overlap the federation's public sets (same prompt, same problem text, or same reference
  solution as a public test or transfer problem: a private row equal to a public test problem
  would leak the test into training); and its reference solution passes its own tests, run in
  the same sandbox as Pass@k (:func:`knexa_node.evaluation.build_program` +
  :func:`knexa_node.sandbox.run_program`).
* **output** (the layout :func:`knexa_node.data.load_node_data` reads as ``--data``):
  ``train.jsonl``/``val.jsonl`` (seeded split), ``rejected.jsonl`` (file, line or row, task id,
  kind, reason for every row not kept), ``manifest.json`` (sources with their sha256, counts,
  seed, the 12-bin category histogram of the train split, the public set checked against).
  Every row read is either kept or in ``rejected.jsonl``: ``read == kept + rejected`` is checked
  before anything is written. Existing output is replaced only with ``force=True``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knexa_runtime.atomic import atomic_write_json

from .categories import classify, histogram, problem_text
from .data import FIELDS, normalize, read_jsonl, write_jsonl

__all__ = ["OUTPUT_FILES", "PrepareError", "PrepareResult", "Rejected", "SourceRow", "format_summary", "prepare",
           "read_source"]

#: what `prepare` writes into the output folder (and refuses to overwrite without force)
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "rejected.jsonl", "manifest.json")
#: a prompt, solution or test longer than this is not a coding problem we can train on
MAX_FIELD_CHARS = 64_000
_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


class PrepareError(Exception):
    """The whole preparation cannot go on (missing input, nothing valid, output exists)."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One row as read from a source: where it came from, and the row or why it did not parse."""

    file: str
    #: 1-based line for line-based files (jsonl, csv); 1-based row number otherwise
    position: int
    unit: str  # "line" or "row"
    row: dict[str, Any] | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Rejected:
    file: str
    position: int
    unit: str
    kind: str
    reason: str
    task_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, self.unit: self.position, "task_id": self.task_id, "kind": self.kind,
                "reason": self.reason}


@dataclass
class PrepareResult:
    out_dir: Path
    read: int
    train: list[dict[str, str]]
    val: list[dict[str, str]]
    rejected: list[Rejected]
    histogram: dict[str, int]
    manifest: dict[str, Any] = field(default_factory=dict)


# ---- reading --------------------------------------------------------------------------------------

def _jsonl_rows(path: Path, label: str) -> Iterator[SourceRow]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceRow(label, lineno, "line", None, f"bad JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(row, dict):
                yield SourceRow(label, lineno, "line", None, f"not a JSON object but {type(row).__name__}")
                continue
            yield SourceRow(label, lineno, "line", row)


def _json_rows(path: Path, label: str) -> Iterator[SourceRow]:
    """A ``.json`` file is either one JSON array of objects or JSON lines (both are what HF writes)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(path, label)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}); no row can be read") from exc
    for i, row in enumerate(rows, start=1):
        if isinstance(row, dict):
            yield SourceRow(label, i, "row", row)
        else:
            yield SourceRow(label, i, "row", None, f"not a JSON object but {type(row).__name__}")


def _csv_rows(path: Path, label: str) -> Iterator[SourceRow]:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise PrepareError(f"{label}: CSV without a header row naming its columns")
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                yield SourceRow(label, start, "line", None,
                                f"{len(row[None]) + len(reader.fieldnames)} cells for {len(reader.fieldnames)} columns")
            else:
                yield SourceRow(label, start, "line", dict(row))
            start = reader.line_num + 1


def _arrow_rows(rows: Sequence[Mapping[str, Any]], label: str) -> Iterator[SourceRow]:
    for i, row in enumerate(rows, start=1):
        yield SourceRow(label, i, "row", dict(row))


def _dataset_dir_rows(path: Path, label: str) -> Iterator[SourceRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, part in parts:
        yield from _arrow_rows(part.to_list(), f"{label}[{split}]" if split else label)


def read_source(path: Path) -> Iterator[SourceRow]:
    """Every row of one source (a file, a ``save_to_disk`` folder, or a folder of data files).

    Raises:
        PrepareError: the source is missing, of an unknown kind, or unreadable as a whole.
    """
    path = Path(path).expanduser()
    label = str(path)
    if not path.exists():
        raise PrepareError(f"{label}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            yield from _dataset_dir_rows(path, label)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise PrepareError(f"{label}: a folder with no {'/'.join(_SUFFIXES)} files and no saved dataset")
        for f in files:
            yield from read_source(f)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path, label)
    elif suffix == ".json":
        yield from _json_rows(path, label)
    elif suffix == ".csv":
        yield from _csv_rows(path, label)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a broken file
            raise PrepareError(f"{label}: not a readable parquet file ({exc})") from exc
        yield from _arrow_rows(table.to_pylist(), label)
    elif suffix == ".arrow":
        import datasets

        yield from _arrow_rows(datasets.Dataset.from_file(str(path)).to_list(), label)
    else:
        raise PrepareError(f"{label}: unknown format {suffix or '(no suffix)'}; use one of {', '.join(_SUFFIXES)}")


# ---- one row --------------------------------------------------------------------------------------

def _coerce(row: dict[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``--map`` renames and undo what CSV does to MBPP's list column."""
    out = dict(row)
    for target, column in mapping.items():
        if column in row:
            out[target] = row[column]
    tests = out.get("test_list")
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped.startswith("["):
            try:
                out["test_list"] = json.loads(stripped)
            except json.JSONDecodeError:
                out["test_list"] = [line for line in stripped.splitlines() if line.strip()]
        else:
            out["test_list"] = [line for line in stripped.splitlines() if line.strip()]
    for key in ("test_list", "test_imports"):
        if out.get(key) is not None and not isinstance(out[key], list):
            out[key] = list(out[key])  # numpy arrays / tuples from arrow
    return out


def _to_problem(src: SourceRow, mapping: Mapping[str, str], default_id: str) -> tuple[dict[str, str] | None, str, str]:
    """The row as a HumanEval-style problem, or (None, kind, reason)."""
    assert src.row is not None
    row = _coerce(src.row, mapping)
    if row.get("task_id") in (None, ""):
        row["task_id"] = default_id
    try:
        (problem,) = normalize([row])
    except ValueError as exc:
        return None, "missing_fields", str(exc).removeprefix("row 0: ")
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        return None, "invalid_field", f"cannot read as a problem: {type(exc).__name__}: {exc}"
    for key in FIELDS:
        value = problem[key]
        if not value.strip() and key != "canonical_solution":
            return None, "invalid_field", f"{key} is empty"
        if len(value) > MAX_FIELD_CHARS:
            return None, "invalid_field", f"{key} is longer than {MAX_FIELD_CHARS} characters"
    if not problem["canonical_solution"].strip():
        return None, "invalid_field", "canonical_solution is empty"
    if not _IDENT.match(problem["entry_point"]):
        return None, "invalid_field", f"entry_point {problem['entry_point'][:40]!r} is not a Python identifier"
    if "def check" not in problem["test"]:
        return None, "invalid_field", "test defines no check(candidate) function"
    return problem, "", ""


def _ws(text: str) -> str:
    return " ".join(text.split())


def _keys(problem: Mapping[str, str]) -> list[tuple[str, str]]:
    """What makes two problems "the same" for overlap with the public sets."""
    keys = [("same prompt", _ws(problem["prompt"]))]
    prose = _ws(problem_text(problem["prompt"]).split("\n", 1)[-1])
    if len(prose) >= 40:  # short docstrings ("add two numbers") collide by chance
        keys.append(("same problem text", prose))
    solution = _ws(problem["canonical_solution"])
    if len(solution) >= 40:
        keys.append(("same reference solution", solution))
    return keys


def _load_public(public_dir: Path) -> tuple[dict[tuple[str, str], str], dict[str, Any]]:
    index: dict[tuple[str, str], str] = {}
    for name in ("test", "transfer"):
        path = public_dir / f"{name}.jsonl"
        if not path.is_file():
            raise PrepareError(f"--public {public_dir}: no {name}.jsonl there (a public-set folder holds "
                               "test.jsonl and transfer.jsonl)")
        try:
            rows = normalize(read_jsonl(path))
        except (ValueError, KeyError) as exc:
            raise PrepareError(f"{path}: not a public set ({exc})") from exc
        for p in rows:
            for what, key in _keys(p):
                index.setdefault((what, key), f"public {name} set ({p['task_id']})")
    info: dict[str, Any] = {"dir": str(public_dir)}
    bundle = public_dir / "bundle.json"
    if bundle.is_file():
        meta = json.loads(bundle.read_text())
        info.update(version=meta.get("version"), digest=meta.get("digest"))
    return index, info


def _validate(problems: Sequence[dict[str, str]], *, timeout_s: float, workers: int) -> list[tuple[str, str]]:
    """Run each reference solution against its own tests in the Pass@k sandbox: (status, detail)."""
    from .evaluation import build_program
    from .sandbox import run_program

    def one(p: dict[str, str]) -> tuple[str, str]:
        result = run_program(build_program(p, p["canonical_solution"]), timeout_s=timeout_s)
        return result.status, result.detail

    if workers <= 1 or len(problems) <= 1:
        return [one(p) for p in problems]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="knexa-prepare") as pool:
        return list(pool.map(one, problems))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---- the pipeline ---------------------------------------------------------------------------------

def prepare(sources: Sequence[Path], out_dir: Path, *, public_dir: Path | None = None, seed: int = 0,
            val_fraction: float = 0.15, mapping: Mapping[str, str] | None = None, force: bool = False,
            timeout_s: float = 10.0, workers: int = 2) -> PrepareResult:
    """Read, check, dedupe, validate and split an organization's problems into ``out_dir``.

    Args:
        sources: files or folders (see the module docstring for formats).
        out_dir: the node's private data folder (``--data`` of ``knexa-node start``).
        public_dir: the federation's public set (test.jsonl, transfer.jsonl); rows overlapping it
            are rejected. None skips that check, and the manifest says so.
        seed: the train/val split's only source of randomness.
        val_fraction: share of kept problems held out for validation (at least one).
        mapping: ``{field: column}`` renames applied to every row before anything else.
        force: replace existing output files.
        timeout_s / workers: sandbox wall-clock limit per reference solution; parallel sandboxes.

    Raises:
        PrepareError: no sources, unreadable source, output exists without force, or fewer
            than two valid problems (a node needs one to train and one to validate).
    """
    if not sources:
        raise PrepareError("no input files: pass one or more files or folders")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"val fraction must be in (0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise PrepareError(f"{out_dir} already holds {', '.join(existing)}; pass --force to replace them")
    mapping = dict(mapping or {})
    public_index, public_info = _load_public(Path(public_dir)) if public_dir is not None else ({}, None)

    rows: list[SourceRow] = []
    source_info = []
    for src in sources:
        before = len(rows)
        rows.extend(read_source(Path(src)))
        source_info.append({"path": str(src), "sha256": _sha256(Path(src).expanduser()), "rows": len(rows) - before})

    rejected: list[Rejected] = []
    candidates: list[tuple[SourceRow, dict[str, str]]] = []
    seen: dict[tuple[str, str], str] = {}
    for src in rows:
        where = f"{src.file}:{src.position}" if src.unit == "line" else f"{src.file} row {src.position}"
        if src.row is None:
            rejected.append(Rejected(src.file, src.position, src.unit, "bad_json" if src.error.startswith("bad JSON")
                                     else "not_object" if src.error.startswith("not a JSON") else "malformed", src.error))
            continue
        default_id = f"{Path(src.file).stem}/{src.position}"
        problem, kind, reason = _to_problem(src, mapping, default_id)
        if problem is None:
            task = src.row.get("task_id", "")
            rejected.append(Rejected(src.file, src.position, src.unit, kind, reason, str(task) if task else ""))
            continue
        keys = [("same task id", problem["task_id"]), ("same prompt", _ws(problem["prompt"]))]
        dup = next(((what, seen[(what, key)]) for what, key in keys if (what, key) in seen), None)
        if dup is not None:
            rejected.append(Rejected(src.file, src.position, src.unit, "duplicate",
                                     f"duplicate of {dup[1]} ({dup[0]})", problem["task_id"]))
            continue
        overlap = next(((what, public_index[(what, key)]) for what, key in _keys(problem)
                        if (what, key) in public_index), None)
        if overlap is not None:
            rejected.append(Rejected(src.file, src.position, src.unit, "public_overlap",
                                     f"overlaps the {overlap[1]}: {overlap[0]}", problem["task_id"]))
            continue
        for what, key in keys:
            seen[(what, key)] = where
        candidates.append((src, problem))

    outcomes = _validate([p for _, p in candidates], timeout_s=timeout_s, workers=workers)
    kept: list[dict[str, str]] = []
    for (src, problem), (status, detail) in zip(candidates, outcomes, strict=True):
        if status == "passed":
            kept.append(problem)
        elif status == "error":
            rejected.append(Rejected(src.file, src.position, src.unit, "sandbox_error",
                                     f"the sandbox could not run it (not the row's fault): {detail}", problem["task_id"]))
        else:
            rejected.append(Rejected(src.file, src.position, src.unit, "reference_fails",
                                     f"reference solution does not pass its own tests ({status}"
                                     f"{': ' + detail if detail else ''})", problem["task_id"]))
    if len(kept) + len(rejected) != len(rows):  # nothing may vanish between reading and writing
        raise AssertionError(f"{len(rows)} rows read but {len(kept)} kept + {len(rejected)} rejected")
    if len(kept) < 2:  # nothing is written; the first reasons say why
        first = "; ".join(f"{r.file}:{r.position} {r.reason}" for r in rejected[:3])
        raise PrepareError(f"only {len(kept)} of {len(rows)} rows are valid problems; a node needs at least 2 "
                           f"(one to train, one to validate); nothing written. {first}")

    rng = np.random.default_rng(seed)
    order = [kept[i] for i in rng.permutation(len(kept))]
    n_val = max(1, int(round(val_fraction * len(order))))
    val, train = order[:n_val], order[n_val:]
    from protocol import CATEGORIES

    counts = Counter(CATEGORIES[classify(p["prompt"])] for p in train)
    hist = {name: counts.get(name, 0) for name in CATEGORIES}
    from .sandbox import sandbox_backend

    manifest: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed, "val_fraction": val_fraction,
        "fields": list(FIELDS), "sources": source_info, "mapping": mapping,
        "read": len(rows), "kept": len(kept), "train": len(train), "val": len(val), "rejected": len(rejected),
        "rejected_by_kind": dict(Counter(r.kind for r in rejected)),
        "histogram": hist, "histogram_normalised": [round(float(x), 4) for x in histogram(p["prompt"] for p in train)],
        "public_set": public_info, "sandbox": sandbox_backend(), "sandbox_timeout_s": timeout_s,
    }
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "val.jsonl", val)
    _write_rejected(out_dir, rejected)
    atomic_write_json(out_dir / "manifest.json", manifest)
    return PrepareResult(out_dir, len(rows), train, val, rejected, hist, manifest)


def _write_rejected(out_dir: Path, rejected: Sequence[Rejected]) -> None:
    write_jsonl(out_dir / "rejected.jsonl", [r.as_dict() for r in rejected])


def format_summary(result: PrepareResult) -> str:
    """What the CLI prints: counts, rejections by kind, the histogram, where the report is."""
    m = result.manifest
    lines = [f"read {result.read} rows: kept {m['kept']} (train {m['train']}, val {m['val']}), "
             f"rejected {m['rejected']}"]
    for kind, n in sorted(m["rejected_by_kind"].items()):
        lines.append(f"  rejected {kind}: {n}")
    if m["rejected"]:
        lines.append(f"every rejected row (file, line, reason): {result.out_dir / 'rejected.jsonl'}")
    if m["public_set"] is None:
        lines.append("public-set overlap NOT checked (no --public folder given)")
    lines.append("train categories: " + ", ".join(f"{k}={v}" for k, v in result.histogram.items() if v))
    lines.append(f"wrote {result.out_dir}/train.jsonl, val.jsonl, manifest.json")
    return "\n".join(lines)

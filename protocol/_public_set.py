"""The federation's public-set bundle: canonical bytes, content digest, strict parsing. No I/O.

Every member must answer and evaluate on the *same* transfer set X_u and test set, so the CPM
publishes them as one versioned bundle and nodes fetch it from the CPM. The bundle is one
canonical JSON document (sorted keys, no whitespace, UTF-8)::

    {"format": "knexa-public-set/1", "version": N, "test": [problem...], "transfer": [problem...]}

where a problem has exactly the HumanEval fields. Its SHA-256 is the bundle's identity: the CPM
announces it (signed), a node checks the fetched bytes against it, and recomputes it from the
files it actually reads before every start, so a stale or edited copy is noticed. Canonical
means one encoding per content: :func:`decode_bundle` re-encodes and refuses bytes that differ,
so two bundles with the same digest are the same bundle. The version is inside the digest:
publishing the same problems again is a new version with a new digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import DecodeError, LocalProtocolError
from ._limits import MAX_BUNDLE_BYTES, MAX_TASK_ID_LEN, ROUND_MAX

__all__ = [
    "BUNDLE_FORMAT",
    "DIGEST_LEN",
    "MAX_BUNDLE_PROBLEMS",
    "PROBLEM_FIELDS",
    "PUBLIC_SET_PROTOCOL",
    "PublicSetBundle",
    "bundle_digest",
    "decode_bundle",
    "encode_bundle",
]

#: Node <-> CPM stream: announce query, and the chunked bundle download.
PUBLIC_SET_PROTOCOL = "/knexa/public-set/1.0.0"
BUNDLE_FORMAT = "knexa-public-set/1"
DIGEST_LEN = 32
MAX_BUNDLE_PROBLEMS = 65_536
PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True, slots=True)
class PublicSetBundle:
    """A parsed, valid bundle (construct it through :func:`decode_bundle` or validate with
    :func:`encode_bundle`)."""

    version: int
    test: tuple[dict[str, str], ...]
    transfer: tuple[dict[str, str], ...]


def _problems(rows: Any, name: str, err: type[Exception]) -> list[dict[str, str]]:
    if not isinstance(rows, list) or not rows:
        raise err(f"public set: {name} must be a non-empty list of problems")
    if len(rows) > MAX_BUNDLE_PROBLEMS:
        raise err(f"public set: {name} has more than {MAX_BUNDLE_PROBLEMS} problems")
    out = []
    ids: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or set(row) != set(PROBLEM_FIELDS):
            got = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise err(f"public set: {name}[{i}] must have exactly the fields {PROBLEM_FIELDS}, got {got}")
        if not all(isinstance(row[k], str) for k in PROBLEM_FIELDS):
            raise err(f"public set: {name}[{i}] has a field that is not a string")
        if not 0 < len(row["task_id"]) <= MAX_TASK_ID_LEN or not row["prompt"] or not row["entry_point"]:
            raise err(f"public set: {name}[{i}] has an empty or too long task_id, prompt or entry_point")
        if row["task_id"] in ids:
            raise err(f"public set: {name} repeats task_id {row['task_id']!r}")
        ids.add(row["task_id"])
        out.append({k: row[k] for k in PROBLEM_FIELDS})
    return out


def _canonical(version: int, test: list[dict[str, str]], transfer: list[dict[str, str]]) -> bytes:
    doc = {"format": BUNDLE_FORMAT, "version": version, "test": test, "transfer": transfer}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check(version: Any, test: Any, transfer: Any, err: type[Exception]) -> tuple[list, list]:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= ROUND_MAX:
        raise err(f"public set: version must be an int in 1..{ROUND_MAX}, got {version!r}")
    t, x = _problems(test, "test", err), _problems(transfer, "transfer", err)
    shared = {p["task_id"] for p in t} & {p["task_id"] for p in x}
    same_prompt = {p["prompt"].strip() for p in t} & {p["prompt"].strip() for p in x}
    if shared or same_prompt:
        what = sorted(shared)[:3] if shared else ["(same prompt)"]
        raise err(f"public set: test and transfer sets overlap: {', '.join(what)}")
    return t, x


def encode_bundle(version: int, test: Sequence[Mapping[str, Any]], transfer: Sequence[Mapping[str, Any]]) -> bytes:
    """The canonical bytes of a bundle.

    Raises:
        LocalProtocolError: a problem lacks a field, ids repeat, the sets overlap or are empty,
            or the encoding exceeds ``MAX_BUNDLE_BYTES``.
    """
    t, x = _check(version, list(test), list(transfer), LocalProtocolError)
    data = _canonical(version, t, x)
    if len(data) > MAX_BUNDLE_BYTES:
        raise LocalProtocolError(f"public set: {len(data)} bytes exceeds the {MAX_BUNDLE_BYTES}-byte cap")
    return data


def bundle_digest(data: bytes) -> bytes:
    """SHA-256 of the canonical bytes: the bundle's identity."""
    return hashlib.sha256(data).digest()


def decode_bundle(data: bytes, *, digest: bytes | None = None) -> PublicSetBundle:
    """Parse bundle bytes from a peer (or disk), checking the digest first when given.

    Raises:
        DecodeError: oversize, digest mismatch, not canonical JSON, or an invalid bundle.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise DecodeError(f"public set: {len(data)} bytes exceeds the {MAX_BUNDLE_BYTES}-byte cap")
    if digest is not None and bundle_digest(data) != digest:
        raise DecodeError("public set: content does not match the announced digest")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"public set: not UTF-8 JSON ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or set(doc) != {"format", "version", "test", "transfer"}:
        raise DecodeError("public set: not a bundle document")
    if doc["format"] != BUNDLE_FORMAT:
        raise DecodeError(f"public set: unknown format {str(doc['format'])[:40]!r}")
    t, x = _check(doc["version"], doc["test"], doc["transfer"], DecodeError)
    if _canonical(doc["version"], t, x) != data:
        raise DecodeError("public set: not in canonical form")
    return PublicSetBundle(version=doc["version"], test=tuple(t), transfer=tuple(x))

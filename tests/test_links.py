"""Every link to a repository file in README.md and docs/ resolves.

Two kinds of reference are checked, both as a newcomer would follow them:

* markdown links ``[text](target)`` with a relative target (resolved against the linking file;
  ``#anchors`` and URLs are skipped);
* paths in backticks such as ``docs/method.md`` or ``knexa_node/models.py`` whose first segment is a
  top-level entry of the repository (resolved against the repository root; ``*`` globs must match
  something).

Existence is checked against what git tracks (a fresh clone), so a file present only in this
working tree does not count. Paths that git ignores are outputs a command creates (``results/``,
``benchmarks/results/``, ``docs/results/cpm/``) and are skipped.
"""

from __future__ import annotations

import re
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("results/", "benchmarks/results/", ".venv/")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_TICK = re.compile(r"`([^`\s]+)`")
_PATHLIKE = re.compile(r"^[\w.-]+(/[\w.*@-]+)+/?$")


def _tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts}
    return {f for f in out.decode().split("\0") if f}


TRACKED = _tracked()
DIRS = {str(Path(f).parents[i]) for f in TRACKED for i in range(len(Path(f).parents) - 1)}
TOP = {f.split("/", 1)[0] for f in TRACKED}


def _exists(rel: str) -> bool:
    rel = rel.rstrip("/")
    if "*" in rel:
        return any(fnmatch(f, rel) or fnmatch(f, rel + "/*") for f in TRACKED)
    return rel in TRACKED or rel in DIRS


def _ignored(rel: str) -> bool:
    """git ignores it: an output some command writes, not a file a clone should have."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=ROOT).returncode == 0
    except OSError:
        return False


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _references(doc: Path) -> list[tuple[int, str, str]]:
    """(line number, reference as written, path relative to the root) for every repo reference."""
    refs = []
    in_code = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in _LINK.findall(line):
            target = target.split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue
            resolved = (doc.parent / target).resolve()
            try:
                refs.append((n, target, str(resolved.relative_to(ROOT))))
            except ValueError:
                refs.append((n, target, "<outside the repository>"))
        for token in _TICK.findall(line):
            token = token.rstrip(".,:;")
            if _PATHLIKE.match(token) and token.split("/", 1)[0] in TOP:
                refs.append((n, token, token))
    return [r for r in refs if not r[2].startswith(GENERATED)]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_repo_references_resolve(doc: Path) -> None:
    broken = [f"{doc.relative_to(ROOT)}:{n}: {written}" for n, written, rel in _references(doc)
              if not _exists(rel) and not _ignored(rel)]
    assert not broken, "broken references:\n" + "\n".join(broken)


def test_the_checker_sees_links_and_paths(tmp_path: Path) -> None:
    """The scanner finds both kinds of reference (so an empty pass above means something)."""
    refs = _references(ROOT / "docs" / "method.md")
    assert any(w == "../knexa_node/models.py" for _, w, _ in refs)
    assert any(rel == "knexa_node/training.py" for _, _, rel in refs)
    assert not _exists("docs/no-such-file.md") and _exists("docs/method.md") and _exists("knexa_node")
    assert _ignored("results/run-1/results.json") and not _ignored("docs/no-such-file.md")

"""Regenerate the measured tables of docs/cpm.md with one command: `python -m knexa_cpm.cpm_docs`.

It runs the two studies below with `knexa-cpm simulate` (same code, same flags), writes their
outputs under docs/results/cpm/, and replaces the text between `<!-- cpm:NAME -->` and
`<!-- /cpm:NAME -->` in docs/cpm.md with each study's generated table.md. Prose around the
tables is written by hand from those numbers and must be re-read when they change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .simulate import main as simulate

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cpm.md"
OUT = ROOT / "docs" / "results" / "cpm"

#: study name -> `knexa-cpm simulate` flags (--out is added)
STUDIES: dict[str, list[str]] = {
    "worlds": ["--world", "family", "affinity", "tokenizer", "wrong", "--nodes", "8", "32", "--het", "high",
               "--seeds", "10", "--policies", "random", "heuristic", "linucb-concat", "linucb-interaction",
               "hybrid", "oracle", "oracle-exact", "best-fixed", "--no-plots", "--quiet"],
    "fig2": ["--world", "family", "--nodes", "8", "16", "32", "64", "--het", "high", "low", "--seeds", "5",
             "--policies", "random", "heuristic", "linucb-concat", "linucb-interaction", "hybrid", "oracle",
             "--no-plots", "--quiet"],
    "poison": ["--world", "poison", "mimic", "--nodes", "16", "32", "--het", "high", "--seeds", "10", "--policies",
               "random", "linucb-interaction", "linucb-interaction+trust", "hybrid", "hybrid+trust", "oracle",
               "--no-plots", "--quiet"],
}


def splice(doc: str, name: str, table: str) -> str:
    """`doc` with the block between the study's markers replaced by `table`.

    Raises:
        ValueError: the markers are missing.
    """
    pattern = re.compile(rf"(<!-- cpm:{name} -->\n).*?(<!-- /cpm:{name} -->)", re.S)
    if not pattern.search(doc):
        raise ValueError(f"{DOC}: no <!-- cpm:{name} --> ... <!-- /cpm:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + table.rstrip("\n") + "\n" + m.group(2), doc)


def main(argv: list[str] | None = None) -> int:
    """Run the studies named in argv (default: all) and splice their tables into docs/cpm.md;
    `--splice-only` splices the tables already under docs/results/cpm/ without running."""
    args = list(argv or [])
    only = "--splice-only" in args
    names = [a for a in args if a != "--splice-only"] or list(STUDIES)
    unknown = sorted(set(names) - set(STUDIES))
    if unknown:
        print(f"cpm_docs: unknown study {unknown}; choose from {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    for name in names:
        out = OUT / name
        if not only:
            code = simulate([*STUDIES[name], "--out", str(out.relative_to(ROOT))])
            if code:
                return code
        # re-read: the page may have been edited while the study ran
        DOC.write_text(splice(DOC.read_text(), name, (out / "table.md").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

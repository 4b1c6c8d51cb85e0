"""Every knexa-* command in the data and operations docs exists and parses with these flags.

The operations runbook walks an organization from its own files to a running node; a renamed
subcommand or flag would strand a reader halfway, so each shell line of the docs' code blocks
that runs a knexa-* command is parsed by that CLI's real argument parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from knexa_cpm.cli import build_parser as cpm_parser
from knexa_node.cli import build_parser as node_parser

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"knexa-node": node_parser, "knexa-cpm": cpm_parser}


def _commands(doc: Path) -> list[str]:
    out = []
    blocks: list[str] = []
    lang: str | None = None
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
                if lang in ("", "sh", "bash"):
                    blocks.append("")
            else:
                lang = None
        elif lang in ("", "sh", "bash"):
            blocks[-1] += line + "\n"
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<[^>]*>", "PLACEHOLDER", line.split("#", 1)[0]).strip()
            line = line.removeprefix("sudo ").strip()
            if line.split(" ", 1)[0] in PARSERS:
                out.append(line)
    return out


CASES = [(doc, cmd) for doc in ("docs/operations.md", "docs/data.md") for cmd in _commands(ROOT / doc)]


def test_the_walk_is_documented() -> None:
    walk = " ".join(cmd for doc, cmd in CASES if doc == "docs/operations.md")
    for step in ("knexa-cpm public-set add", "knexa-node public-set fetch", "knexa-node data prepare", "knexa-node init"):
        assert step in walk


@pytest.mark.parametrize("doc, command", CASES)
def test_documented_command_parses(doc: str, command: str) -> None:
    prog, *argv = shlex.split(command)
    try:
        PARSERS[prog]().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")

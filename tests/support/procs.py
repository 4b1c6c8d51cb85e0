"""Process inspection shared by the integration and fault tests (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["processes_mentioning"]


def processes_mentioning(needle: str) -> list[int]:
    """PIDs of live processes whose command line contains `needle` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids

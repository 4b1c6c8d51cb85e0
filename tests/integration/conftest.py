import contextlib
import os
import signal
from pathlib import Path

import pytest


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


@pytest.fixture
def reap(tmp_path):
    """Fails the test if any process mentioning tmp_path outlives it, and kills leftovers."""
    yield tmp_path
    left = processes_mentioning(str(tmp_path))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {left}"

"""Child processes that cannot outlive the launcher, even when it is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Child", "spawn"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM when the launcher dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()  # own process group: Ctrl-C in the terminal reaches only the launcher


class Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, needle: str, timeout: float) -> str:
        """Block until the child's log has a line containing `needle`; return that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if self.poll() is not None:
                tail = "\n".join(self.log_text().splitlines()[-5:])
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready:\n{tail}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s (see {self.log})")

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def spawn(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it; closed when the Popen is collected
    proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent, env={**os.environ, **(env or {})})
    fh.close()
    return Child(name, proc, log)

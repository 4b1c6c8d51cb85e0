"""Run many candidates through a few long-lived sandboxes: one fork per candidate, not one sandbox.

Starting a bubblewrap sandbox and a fresh interpreter costs ~35 ms of CPU per candidate, and a
skills evaluation runs ~1,000 candidates per round: that was 40% of a round on 2 cores. A
:class:`SandboxPool` starts ``workers`` sandboxes once (the same backend, view, namespaces and
uid as :func:`knexa_node.sandbox.run_program`), each running a small server. For every candidate
the server forks a child, which calls ``setsid``, gets its own fresh work directory, drops every
descriptor but its result pipe, and then runs the very prelude a one-shot sandbox runs
(``sandbox._HARNESS``: rlimits, seccomp, the audit hook, the nonce protocol). The host draws the
nonce and judges the result with the same ``_classify``; verdicts are the one-shot verdicts.

What reuse changes, and how it is contained (docs/evaluation.md):

* Candidates of one worker run one after another in the same sandbox. A child cannot fork
  (seccomp), signal or trace anything but itself (seccomp: ``kill``/``tgkill`` to itself,
  ``ptrace`` and ``process_vm_*`` refused; the server is also not dumpable), so nothing it
  starts outlives it; the server SIGKILLs its session anyway and removes its directory.
* The server never reads what a candidate wrote: it holds the current nonce only, gets the
  next one after the verdict is back, and its own code and imports are loaded before any
  candidate runs.
* Where the child reports that seccomp is not in force (an architecture without a filter
  table), the pool does not reuse sandboxes and runs every candidate one-shot instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import secrets
import select
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from . import sandbox as sb
from .sandbox import SandboxResult

__all__ = ["SandboxPool"]

logger = logging.getLogger(__name__)

_REQUEST = struct.Struct(">I")  # payload length; the payload is nonce + b"\n" + program
_REPLY = struct.Struct(">iBI")  # exit code (negative: signal), timed out, result-pipe bytes
_PIPE_CAP = 65536  # what the one-shot reader keeps of the result pipe, too
_HOST_GRACE_S = 10.0  # how much longer than the candidate's limit the host waits for the server

_SERVER = sb._HARNESS + r'''
def _serve(mode, cpu_s, mem_mb, use_hook, timeout_s):
    import os, sys, select, signal, struct, time, shutil
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # not dumpable: a candidate of the same uid cannot trace or read the server
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except Exception:
        pass
    harness = sys.modules["__main__"].__dict__.pop("_harness")
    base = os.getcwd()
    def read_exact(n):
        chunks = []
        while n:
            chunk = os.read(0, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
    def reply(code, timed_out, raw):
        msg = struct.pack(">iBI", code, timed_out, len(raw)) + raw
        while msg:
            msg = msg[os.write(1, msg):]
    runs = 0
    while True:
        head = read_exact(4)
        if head is None:
            return
        data = read_exact(struct.unpack(">I", head)[0])
        if data is None:
            return
        runs += 1
        work = os.path.join(base, "run-%d" % runs)
        os.mkdir(work)
        os.chmod(work, 0o700)  # explicit: mkdir's mode is masked by the umask the host had
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.chdir(work)
                os.environ["HOME"] = os.environ["TMPDIR"] = work
                os.close(r)
                if w != 3:
                    os.dup2(w, 3)
                    os.close(w)
                os.closerange(4, 1 << 16)
                harness(3, mode, cpu_s, mem_mb, use_hook, data)
            finally:
                os._exit(1)
        os.close(w)
        del data
        deadline = time.monotonic() + timeout_s
        pidfd = os.pidfd_open(pid)
        chunks, size, timed_out, open_ = [], 0, False, True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready = select.select([pidfd, r] if open_ else [pidfd], [], [], left)[0]
            if r in ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    open_ = False
                elif size < 65536:
                    chunks.append(chunk)
                    size += len(chunk)
            elif pidfd in ready:
                break
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        status = os.waitpid(pid, 0)[1]
        os.set_blocking(r, False)
        while open_ and size < 65536:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        os.close(r)
        os.close(pidfd)
        shutil.rmtree(work, ignore_errors=True)
        reply(os.waitstatus_to_exitcode(status), timed_out, b"".join(chunks)[:65536])
import sys
sys.modules["__main__"].__dict__.pop("_serve")(
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hook", float(sys.argv[5]))
'''


class _Server:
    """One long-lived sandbox and the host's end of its request pipe; used by one thread at a time."""

    def __init__(self, backend: str, *, timeout_s: float, memory_mb: int, audit_hook: bool,
                 python: str | None) -> None:
        self.backend, self.timeout_s = backend, timeout_s
        exe = python or sb._python()
        drop = backend == "rlimit" and os.geteuid() == 0
        self._workdir = tempfile.TemporaryDirectory(prefix="knexa-sbx-pool-", dir="/tmp" if drop else None,
                                                    ignore_cleanup_errors=True)
        workdir = self._workdir.name
        if drop:
            os.chmod(workdir, 0o700)
            os.chown(workdir, sb.SANDBOX_UID, sb.SANDBOX_UID)
        tmp = "/tmp" if backend == "bwrap" else workdir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": tmp, "TMPDIR": tmp}  # fmt: skip
        child = [exe, "-I", "-S", "-B", "-c", _SERVER, backend, str(int(timeout_s) + 2), str(memory_mb),
                 "hook" if audit_hook else "nohook", repr(float(timeout_s))]  # fmt: skip
        argv = sb._bwrap_argv(exe) + child if backend == "bwrap" else child
        user = {"user": sb.SANDBOX_UID, "group": sb.SANDBOX_UID, "extra_groups": []} if drop else {}
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server; close() ends it
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=workdir, env=env,
            start_new_session=True, **user,
        )  # fmt: skip

    def exchange(self, nonce: str, program: str) -> tuple[int, bool, bytes]:
        """Send one candidate, wait for the server's (exit code, timed out, result-pipe bytes).

        Raises:
            OSError: the server died or closed its pipe; TimeoutError: it stopped answering.
        """
        payload = nonce.encode("ascii") + b"\n" + program.encode("utf-8", "replace")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(_REQUEST.pack(len(payload)) + payload)
            self.proc.stdin.flush()
        except ValueError as exc:  # write to a closed file
            raise BrokenPipeError("the sandbox server is closed") from exc
        code, timed_out, n = _REPLY.unpack(self._read(_REPLY.size))
        return code, bool(timed_out), self._read(n) if n else b""

    def run(self, program: str) -> SandboxResult:
        """One candidate; a server that dies or stops answering is closed, the candidate not passed."""
        nonce = secrets.token_hex(16)
        try:
            code, timed_out, raw = self.exchange(nonce, program)
        except OSError as exc:  # TimeoutError is one
            tail = self._stderr_tail()
            self.close()
            logger.warning("sandbox server %s: %s%s", "stopped answering" if isinstance(exc, TimeoutError)
                           else "died", type(exc).__name__, f" ({tail})" if tail else "")
            if isinstance(exc, TimeoutError):
                return SandboxResult(False, "timeout", "wall_clock")
            return SandboxResult(False, "error", "sandbox_start")
        return sb._classify(raw, nonce, code, b"", timed_out)

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout_s + _HOST_GRACE_S
        chunks: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n)
            if not chunk:
                raise ConnectionError("the sandbox server closed its pipe")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            return lines[-1][:200] if lines else ""
        return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2.0)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self._stderr.close()
        self._workdir.cleanup()


class SandboxPool:
    """``workers`` reusable sandboxes for one batch of candidates; a context manager.

    Args:
        workers: sandboxes (and candidates) at once.
        timeout_s: wall-clock limit per candidate, from its fork.
        memory_mb: address-space limit per candidate.
        backend: default :func:`knexa_node.sandbox.sandbox_backend`; ``audit_hook`` and
            ``python`` as in ``sandbox._execute`` (tests only).
    Raises:
        SandboxUnavailable: as :func:`knexa_node.sandbox.run_program`.
    """

    def __init__(self, workers: int, *, timeout_s: float = 5.0, memory_mb: int = 512, backend: str | None = None,
                 audit_hook: bool = True, python: str | None = None) -> None:
        if workers < 1 or timeout_s <= 0 or memory_mb <= 0:
            raise ValueError("workers, timeout_s and memory_mb must be positive")
        self.workers, self.timeout_s, self.memory_mb = workers, timeout_s, memory_mb
        self.backend = backend or sb.sandbox_backend()
        self._opts = {"audit_hook": audit_hook, "python": python}
        self._idle: queue.SimpleQueue[_Server] = queue.SimpleQueue()
        self._all: list[_Server] = []
        self._lock = threading.Lock()
        # bwrap's --die-with-parent kills a sandbox when the *thread* that started it ends, so
        # every server is started by this one thread, which lives as long as the pool
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knexa-sbx-spawn")
        self.reuse = self._probe()

    def _probe(self) -> bool:
        """Reuse sandboxes only where a forked child reports seccomp in force."""
        try:
            server = self._server()
        except OSError as exc:
            logger.warning("sandbox pool: could not spawn a server (%s); running candidates one-shot", exc)
            return False
        nonce = secrets.token_hex(16)
        try:
            code, timed_out, raw = server.exchange(nonce, "assert 1 + 1 == 2\n")
        except OSError as exc:
            logger.warning("sandbox pool: the server did not start (%s; %s); running candidates one-shot",
                           type(exc).__name__, server._stderr_tail())
            server.close()
            return False
        notes = _notes(raw, nonce)
        verdict = sb._classify(raw, nonce, code, b"", timed_out)
        if not verdict.passed or "seccomp" not in notes:
            logger.warning("sandbox pool: probe %s, notes %s; running candidates one-shot", verdict, notes)
            server.close()
            return False
        self._all.append(server)
        self._idle.put(server)
        return True

    def _server(self) -> _Server:
        start = functools.partial(_Server, self.backend, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                                  **self._opts)
        return self._spawner.submit(start).result()

    def run(self, program: str) -> SandboxResult:
        """Run one candidate (thread-safe); never raises for anything the program does."""
        if not self.reuse:
            return sb._execute(program, self.backend, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                               **self._opts)
        try:
            server = self._idle.get_nowait()
        except queue.Empty:
            try:
                server = self._server()
            except OSError as exc:
                logger.warning("sandbox pool: could not spawn a server: %s", exc)
                return SandboxResult(False, "error", "spawn")
            with self._lock:
                self._all.append(server)
        try:
            return server.run(program)
        finally:
            if server.alive:
                self._idle.put(server)
            else:
                server.close()
                with self._lock:
                    self._all.remove(server)

    def map(self, programs: Sequence[str]) -> list[SandboxResult]:
        """Run every program, ``workers`` at a time; results in input order."""
        if self.workers == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="knexa-sbx") as pool:
            return list(pool.map(self.run, programs))

    def close(self) -> None:
        with self._lock:
            servers, self._all = self._all, []
        for server in servers:
            server.close()
        self._spawner.shutdown()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _notes(raw: bytes, nonce: str) -> list[str]:
    prefix = nonce.encode("ascii") + b" note "
    return [line[len(prefix):].decode("ascii", "replace") for line in raw.split(b"\n") if line.startswith(prefix)]

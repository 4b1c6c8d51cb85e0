"""Run one untrusted candidate program (model-generated code plus its unit test) in a sandbox.

Pass@k needs every candidate *executed*: a model's output is arbitrary Python, so each run gets a
fresh interpreter inside a sandbox and reports only pass / fail / timeout, with a fixed reason
code, back. Three backends, chosen once per process (:func:`sandbox_backend`):

``bwrap`` (preferred; chosen when bubblewrap is installed *and* a probe sandbox really starts):
a minimal read-only view (``/usr``, the merged-usr symlinks or ``/lib*`` directories, the
interpreter's own prefix, nothing else: no ``/etc``, no ``/root`` beyond the interpreter's path,
no ``/home``, no state directories, no ``/proc`` or ``/sys`` at all), a private size-capped
tmpfs on ``/tmp`` (the cwd), a fresh minimal ``/dev``, every namespace unshared (own user
namespace as uid/gid 65534 with no capabilities, no network, own pid namespace),
``--die-with-parent`` and ``--new-session``.

``rlimit`` (fallback when bubblewrap does not work and the node runs as root): a plain
subprocess that setuid()s to 65534/65534 with no supplementary groups before exec, so it holds
no capabilities; cwd and ``TMPDIR`` in a fresh temp dir owned by that uid. A probe checks that
the interpreter is usable by that uid (it is not when it lives under ``/root``).

``unconfined`` (only on the operator's explicit opt-in, ``KNEXA_SANDBOX=unconfined``): the
fallback without the uid drop, so the candidate runs as the node's own user and could read what
that user reads, the node's identity key included. Where neither ``bwrap`` nor ``rlimit`` works
and there is no opt-in, :func:`sandbox_backend` raises :class:`SandboxUnavailable` and the node
refuses to evaluate.

Every backend starts ``python -I -S -B`` (isolated, no ``site``: the standard library only, what
HumanEval/MBPP need) with the same prelude (``_CHILD``); see docs/evaluation.md for the exact
layers (rlimits, seccomp, audit hook) and the result channel:

* The parent draws a fresh 128-bit nonce per run and sends it ahead of the program on stdin; the
  prelude reads stdin to the end and points fds 0-2 at /dev/null before any candidate code runs.
* The candidate runs in a worker thread started from C (``deque.extend(map(exec, ...))``), so
  no Python frame of the harness lies below it: the nonce, the pass token and the harness
  functions live only in the main thread's frame, which the audit hook keeps out of reach
  (``gc`` walkers, ``sys._current_frames``, new audit hooks, tracing) and seccomp keeps signal
  handlers (the one way to run code in the main thread) from being installed.
* Only the main thread writes ``<nonce> passed`` after the worker's ``exec`` returned normally.
  The parent records a pass only when that line is the single result line, every line on the
  pipe carries the nonce, and the interpreter exited 0. Anything else is a failure.

The failure detail is one of :data:`REASONS`: a builtin exception class name (the candidate's
exception mapped to its nearest builtin base) or a harness code. Nothing else from inside the
sandbox (no message text, no output) reaches the caller.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

__all__ = [
    "REASONS",
    "STATUSES",
    "SandboxResult",
    "SandboxUnavailable",
    "run_program",
    "sandbox_backend",
]

logger = logging.getLogger(__name__)

#: Every status a SandboxResult can carry. "error" means the sandbox itself failed to start the
#: candidate (not the candidate's fault); anything the candidate did wrong is "failed".
STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error")
#: Reason codes of the harness itself (the rest of REASONS are builtin exception names).
HARNESS_REASONS: tuple[str, ...] = (
    "exit",           # the program ended (sys.exit, os._exit, a killed thread) before its test finished
    "forged",         # the result pipe held a line the harness did not write, or contradicted itself
    "signal",         # killed by a signal other than the CPU/wall limits
    "exception",      # an exception the harness could not map to a builtin class
    "wall_clock",     # status timeout: the parent's wall-clock limit
    "cpu_limit",      # status timeout: RLIMIT_CPU (SIGXCPU) or killed
    "sandbox_start",  # status error: the sandbox or interpreter did not start
    "spawn",          # status error: the sandbox process could not be spawned
)  # fmt: skip
#: Every detail a SandboxResult can carry besides "" (a pass): fixed, known to both sides.
REASONS: frozenset[str] = frozenset(HARNESS_REASONS) | frozenset(
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
)
#: "bwrap" (require it), "rlimit" (require the uid-dropping fallback), "unconfined" (the operator
#: accepts running candidates as the node's own user when nothing better works), or unset (auto).
ENV_BACKEND = "KNEXA_SANDBOX"
#: The unprivileged uid/gid candidates run as (inside bwrap's user namespace, or after setuid).
SANDBOX_UID = 65534
_TMPFS_BYTES = 64 * 1024 * 1024
_PROBE_TIMEOUT_S = 20.0
_BACKENDS = ("bwrap", "rlimit", "unconfined")

#: The prelude every candidate runs under, as source: ``_harness(fd, mode, cpu_s, mem_mb, use_hook,
#: data)`` never returns. ``_CHILD`` starts it in a fresh interpreter (one sandbox per candidate);
#: :mod:`knexa_node.sandbox_pool` starts it in a child forked per candidate by a long-lived server.
_HARNESS = r'''
def _harness(fd, mode, cpu_s, mem_mb, use_hook, data):
    import os, sys, resource, builtins, _thread, collections, signal, itertools
    nonce, _, src = data.partition(b"\n")
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    write, die, count, new_lock = os.write, os._exit, _thread._count, _thread.allocate_lock
    def report(msg):
        write(fd, nonce + b" " + msg.encode("ascii") + b"\n")
    report("started")
    def limit(name, value):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            report("note no-" + name)
    for name, value in (("RLIMIT_AS", mem_mb << 20), ("RLIMIT_CPU", cpu_s), ("RLIMIT_CORE", 0),
                        ("RLIMIT_FSIZE", 16 << 20), ("RLIMIT_NOFILE", 64)):
        limit(name, value)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    def seccomp():
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, on every architecture
            return "no-seccomp-nnp"
        table = {
            "x86_64": (0xC000003E, True, dict(socket=41, clone=56, fork=57, vfork=58, kill=62,
                       ptrace=101, tgkill=234, io_uring_setup=425, clone3=435, rt_sigaction=13,
                       unshare=272, setns=308, process_vm_readv=310, process_vm_writev=311)),
            "aarch64": (0xC00000B7, False, dict(socket=198, clone=220, kill=129, ptrace=117,
                        tgkill=131, io_uring_setup=425, clone3=435, rt_sigaction=134,
                        unshare=97, setns=268, process_vm_readv=270, process_vm_writev=271)),
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
        for name in ("fork", "vfork", "ptrace", "io_uring_setup", "rt_sigaction", "unshare", "setns",
                     "process_vm_readv", "process_vm_writev"):
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
    DENY = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect",
        "socket.bind", "socket.sendto", "socket.getaddrinfo",
        "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "pty.spawn", "webbrowser.open",
        # reaching the harness's main thread (the nonce, the pass token, the hook's data)
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "sys._current_exceptions", "sys.addaudithook", "sys.settrace", "sys.setprofile",
    })
    PATHS = (("os.remove", (0,)), ("os.rmdir", (0,)), ("os.rename", (0, 1)), ("os.mkdir", (0,)),
             ("os.chmod", (0,)), ("os.chown", (0,)), ("os.link", (0, 1)), ("os.symlink", (1,)),
             ("os.truncate", (0,)), ("os.utime", (0,)), ("shutil.rmtree", (0,)))
    PATH_EVENTS = frozenset(name for name, _ in PATHS)
    def resolve(path):
        if isinstance(path, int) or path is None:
            return None
        try:
            return os.path.realpath(os.fsdecode(path))
        except Exception:
            return ""
    def inside(path):
        real = resolve(path)
        if real is None:
            return True
        return real == os.devnull or any(real == r or real.startswith(r + os.sep) for r in roots)
    def hook(event, args):
        if event == "open":
            path, how, flags = args
            real = resolve(path)
            if real is not None and (real == "/proc" or real.startswith("/proc/")):
                raise PermissionError("sandbox: /proc is not available")
            writing = (flags or 0) & WRITE or (isinstance(how, str) and any(c in how for c in "wax+"))
            if writing and not inside(path):
                raise PermissionError("sandbox: writing outside the temp dir is not allowed")
        elif event in PATH_EVENTS:
            for name, positions in PATHS:
                if name == event:
                    for i in positions:
                        if i < len(args) and not inside(args[i]):
                            raise PermissionError("sandbox: %s outside the temp dir is not allowed" % event)
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX objects only: socketpair() wraps its fds in them
                raise PermissionError("sandbox: network sockets are not allowed")
        elif event in DENY or event.startswith("ctypes."):
            raise PermissionError("sandbox: %s is not allowed" % event)
    if use_hook:
        sys.addaudithook(hook)
    del hook
    sys.modules.pop("ctypes", None)
    codes = {}
    for name in dir(builtins):
        obj = getattr(builtins, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            codes[obj] = name
    def code_of(exc_type):
        try:
            for cls in type.__dict__["__mro__"].__get__(exc_type):
                if cls in codes:
                    return codes[cls]
        except Exception:
            pass
        return "exception"
    try:
        code = compile(src, "candidate.py", "exec")
    except BaseException as exc:
        report("failed " + code_of(type(exc)))
        die(1)
    failures = collections.deque(maxlen=1)
    def unraisable(info, failures=failures, code_of=code_of):
        failures.append(code_of(info.exc_type))
    sys.unraisablehook = unraisable
    sys.argv = ["candidate"]
    ns = {"__name__": "__candidate__", "__builtins__": builtins}
    passed_line = nonce + b" passed\n"
    started, tick, done = new_lock(), new_lock(), collections.deque()
    started.acquire()
    tick.acquire()
    work = itertools.chain(iter(started.release, None), map(exec, (code,), (ns,)))
    del code, ns, data, src
    _thread.start_new_thread(done.extend, (work,))
    del work
    started.acquire()
    while not done and count():
        tick.acquire(True, 0.002)
    if done:
        write(fd, passed_line)
        die(0)
    report("failed " + (failures[0] if failures else "exit"))
    die(1)
'''

_CHILD = _HARNESS + r'''
import sys
sys.modules["__main__"].__dict__.pop("_harness")(
    int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "hook",
    sys.stdin.buffer.read())
'''


class SandboxUnavailable(RuntimeError):
    """No least-privilege sandbox works here and the operator has not opted in to run unconfined."""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``detail`` is "" for a pass, else one of :data:`REASONS`."""

    passed: bool
    status: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.passed != (self.status == "passed"):
            raise ValueError(f"passed={self.passed} contradicts status={self.status!r}")
        if self.detail and self.detail not in REASONS:
            raise ValueError(f"detail must be one of the fixed reason codes, got {self.detail!r}")


_backend_lock = threading.Lock()
_backend: str | None = None
_bwrap_has_size = False


def sandbox_backend() -> str:
    """The backend candidates run under: ``"bwrap"``, ``"rlimit"`` or (opt-in) ``"unconfined"``.

    Probed once per process (thread-safe; it really starts a sandbox) and cached. ``KNEXA_SANDBOX``
    = ``bwrap`` or ``rlimit`` requires that backend; ``unconfined`` allows the last resort.

    Raises:
        SandboxUnavailable: neither bubblewrap nor the uid-dropping fallback works here (or the
            required one does not) and there is no ``KNEXA_SANDBOX=unconfined`` opt-in.
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
    Raises:
        SandboxUnavailable: see :func:`sandbox_backend` (the node refuses to evaluate).
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    return _execute(program, sandbox_backend(), timeout_s=timeout_s, memory_mb=memory_mb)


def _choose_backend() -> str:
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced not in ("", *_BACKENDS):
        raise SandboxUnavailable(f"{ENV_BACKEND} must be one of {', '.join(_BACKENDS)}, got {forced!r}")
    problems: list[str] = []
    if forced in ("", "bwrap", "unconfined"):
        problem = _probe_bwrap()
        if problem is None:
            logger.info("sandbox: using bubblewrap (minimal read-only view, uid %d)", SANDBOX_UID)
            return "bwrap"
        if forced == "bwrap":
            raise SandboxUnavailable(f"{ENV_BACKEND}=bwrap but bubblewrap does not work here: {problem}")
        problems.append(f"bubblewrap: {problem}")
    problem = _probe_rlimit()
    if problem is None:
        logger.warning("sandbox: bubblewrap unavailable (%s); candidates run as a plain subprocess "
                       "dropped to uid %d with no capabilities, rlimits, seccomp and an audit hook, "
                       "without a private file-system view. Install bubblewrap for full isolation.",
                       "; ".join(problems) or "not requested", SANDBOX_UID)
        return "rlimit"
    if forced == "rlimit":
        raise SandboxUnavailable(f"{ENV_BACKEND}=rlimit but the uid-dropping fallback does not work here: {problem}")
    problems.append(f"fallback: {problem}")
    if forced == "unconfined":
        logger.warning(
            "!!! SANDBOX UNCONFINED (%s=unconfined): %s. Candidate code runs as this node's own user "
            "and can read everything it can, the identity key included; only rlimits, seccomp and "
            "a Python audit hook stand in the way. !!!", ENV_BACKEND, "; ".join(problems))
        return "unconfined"
    raise SandboxUnavailable(
        "no least-privilege sandbox for Pass@k: " + "; ".join(problems) + ". Install bubblewrap "
        "(apt-get install bubblewrap) and allow user namespaces, or run the node as root so the "
        f"fallback can drop to uid {SANDBOX_UID}; set {ENV_BACKEND}=unconfined to run candidates "
        "as this node's user anyway")


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


def _probe_rlimit() -> str | None:
    """None when the fallback can drop to the sandbox uid and still run the interpreter."""
    if os.geteuid() != 0:
        return f"the node is not root (uid {os.geteuid()}), so it cannot drop candidates to another uid"
    result = _execute("assert 1 + 1 == 2\n", "rlimit", timeout_s=_PROBE_TIMEOUT_S, memory_mb=512)
    if result.passed:
        return None
    return (f"probe as uid {SANDBOX_UID} {result.status}: {result.detail} (is the interpreter "
            f"{_python()} readable by that uid?)")


def _python() -> str:
    """The interpreter candidates run under: the real file behind ``sys.executable`` (a venv's
    ``python`` is a symlink; with ``-I -S`` the venv adds nothing but its location)."""
    return os.path.realpath(sys.executable)


def _view_binds(python: str) -> list[str]:
    """bwrap arguments for the minimal read-only view: system libraries and the interpreter.

    ``/bin``, ``/lib``, ``/lib64``... are re-created as symlinks where the host has merged /usr,
    else bound read-only. The interpreter's prefix (e.g. a pyenv build under ``/root`` or a CI
    venv's base under ``/tmp``) is bound at its own path, after the private ``/tmp``, so nothing
    else of its parent directories becomes visible.
    """
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf"):
        if os.path.isfile(etc):
            args += ["--ro-bind", etc, etc]
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python)}
    if python.startswith(sys.prefix + os.sep):  # a venv made with --copies
        paths.add(sys.prefix)
    bound = ["/usr"]
    for path in sorted(os.path.realpath(p) for p in paths):
        if not any(path == b or path.startswith(b + os.sep) for b in bound):
            bound.append(path)
            args += ["--ro-bind", path, path]
    return args


def _bwrap_argv(python: str) -> list[str]:
    size = ["--size", str(_TMPFS_BYTES)] if _bwrap_has_size else []
    binds = _view_binds(python)
    tmp_binds = [a for i in range(0, len(binds), 3) for a in binds[i:i + 3]
                 if binds[i] == "--ro-bind" and binds[i + 1].startswith("/tmp/")]
    early = [a for i in range(0, len(binds), 3) for a in binds[i:i + 3]
             if not (binds[i] == "--ro-bind" and binds[i + 1].startswith("/tmp/"))]
    return [
        "bwrap", "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL", "--die-with-parent", "--new-session",
        *early, "--dev", "/dev", *size, "--tmpfs", "/tmp", *tmp_binds, "--chdir", "/tmp",
        "--",
    ]  # fmt: skip


def _execute(
    program: str,
    backend: str,
    *,
    timeout_s: float,
    memory_mb: int,
    audit_hook: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Start one sandboxed interpreter for ``program`` under ``backend`` and classify the end.

    ``audit_hook=False`` exists only so tests can check the kernel-enforced layers (bwrap, seccomp,
    rlimits, the uid drop) on their own, and ``python`` so they can pick an interpreter the
    sandbox uid can read; production callers go through run_program.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    exe = python or _python()
    cpu_s = int(timeout_s) + 2
    nonce = secrets.token_hex(16)
    drop = backend == "rlimit" and os.geteuid() == 0
    # a dropped uid must be able to reach its work dir: the process's temp dir may be a private
    # 0700 folder of the node's user (TMPDIR, a test's tmp_path), so use /tmp, which anyone traverses
    parent = "/tmp" if drop and os.path.isdir("/tmp") else None
    with tempfile.TemporaryDirectory(prefix="knexa-sbx-", dir=parent, ignore_cleanup_errors=True) as workdir:
        tmp = "/tmp" if backend == "bwrap" else workdir
        if drop:
            # explicit mode: mkdtemp's 0o700 is masked by the process umask, and a daemon's umask
            # may be 0o177 for a moment (the control socket's bind) while another thread evaluates
            os.chmod(workdir, 0o700)
            os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": tmp, "TMPDIR": tmp}  # fmt: skip
        read_fd, write_fd = os.pipe()
        child = [exe, "-I", "-S", "-B", "-c", _CHILD, str(write_fd), backend, str(cpu_s),
                 str(memory_mb), "hook" if audit_hook else "nohook"]  # fmt: skip
        argv = _bwrap_argv(exe) + child if backend == "bwrap" else child
        user = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if drop else {}
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=workdir, env=env, pass_fds=(write_fd,), start_new_session=True, **user,
            )  # fmt: skip
        except OSError as exc:
            os.close(read_fd)
            logger.warning("sandbox: could not spawn %s: %s", backend, exc)
            return SandboxResult(False, "error", "spawn")
        finally:
            os.close(write_fd)
        timed_out = False
        payload = nonce.encode("ascii") + b"\n" + program.encode("utf-8", "replace")
        try:
            _, stderr = proc.communicate(payload, timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            try:
                _, stderr = proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:
                stderr = b""
        try:
            os.set_blocking(read_fd, False)
            raw = _read_all(read_fd)
        finally:
            os.close(read_fd)
    return _classify(raw, nonce, proc.returncode, stderr or b"", timed_out)


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


def _classify(raw: bytes, nonce: str, returncode: int, stderr: bytes, timed_out: bool) -> SandboxResult:
    """Judge a run from the result pipe and the exit status; see the module docstring.

    A pass needs exactly one result line, ``<nonce> passed``, every line on the pipe carrying the
    nonce, and exit status 0. ``stderr`` can only hold the interpreter's start-up errors (the
    prelude points fd 2 at /dev/null before candidate code runs); it is logged, never returned.
    """
    prefix = nonce.encode("ascii") + b" "
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    ours = [line[len(prefix):].decode("ascii", "replace") for line in lines if line.startswith(prefix)]
    foreign = len(lines) - len(ours)
    notes = [m[5:] for m in ours if m.startswith("note ")]
    if notes:
        logger.debug("sandbox child notes: %s", notes)
    results = [m for m in ours if m == "passed" or m.startswith("failed ")]
    if timed_out:
        return SandboxResult(False, "timeout", "wall_clock")
    if "started" not in ours:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"rc={returncode}"]
        logger.warning("sandbox did not start: %s", tail[0][:200])
        return SandboxResult(False, "error", "sandbox_start")
    if foreign or len(results) > 1:
        return SandboxResult(False, "failed", "forged")
    if results == ["passed"]:
        if returncode == 0:
            return SandboxResult(True, "passed", "")
        return SandboxResult(False, "failed", "forged")
    if results:
        code = results[0][7:]
        return SandboxResult(False, "failed", code if code in REASONS else "forged")
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return SandboxResult(False, "timeout", "cpu_limit")
    if returncode < 0 or returncode > 128:  # bwrap reports a signalled child as 128 + signal
        return SandboxResult(False, "failed", "signal")
    return SandboxResult(False, "failed", "exit")

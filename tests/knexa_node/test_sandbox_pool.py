"""A SandboxPool gives the one-shot verdicts, and one candidate cannot reach the next one.

The containment and anti-forgery suite runs through the pool too (``test_sandbox.py``, every test
taking ``backend`` runs ``pooled``); these are what reuse adds: leftovers, the server's survival,
its replacement, and the fallback where seccomp is not in force.
"""

from __future__ import annotations

import os
import signal

import pytest

from knexa_node import sandbox as sb
from knexa_node import sandbox_pool as sp
from knexa_node.evaluation import execute_candidates
from knexa_node.sandbox_pool import SandboxPool

pytestmark = pytest.mark.skipif(sb._probe_bwrap() is not None, reason="bubblewrap does not work here")

TIMEOUT = 15.0
PASS = "assert 1 + 1 == 2\n"


def test_nothing_a_candidate_leaves_reaches_the_next_one() -> None:
    leave = (
        "import os, json, sys\nopen('left.txt', 'w').write('x')\nos.mkdir('dir')\n"
        "os.environ['LEFT'] = '1'\njson.LEFT = 1\nsys.modules['left'] = json\n"
    )
    check = (
        "import os, json, sys\nassert os.listdir('.') == [], os.listdir('.')\n"
        "assert 'LEFT' not in os.environ and not hasattr(json, 'LEFT') and 'left' not in sys.modules\n"
    )
    with SandboxPool(1, timeout_s=TIMEOUT, backend="bwrap") as pool:
        assert pool.reuse
        first = pool.run(leave)
        assert first.passed
        assert pool.run(check).passed
        assert len(pool._all) == 1  # the same server ran both


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "kernel-only"])
def test_a_candidate_cannot_signal_trace_or_read_the_server(hook: bool) -> None:
    attacks = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n",
        # without the audit hook ctypes is reachable: the kernel (seccomp) must refuse these
        "import ctypes, os\nassert ctypes.CDLL(None).kill(os.getppid(), 9) == 0\n",
        "import ctypes, os\nassert ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0) == 0\n",  # PTRACE_ATTACH
        (
            "import ctypes, os\nbuf = ctypes.create_string_buffer(8)\n"
            "class V(ctypes.Structure):\n    _fields_ = [('b', ctypes.c_void_p), ('n', ctypes.c_size_t)]\n"
            "v = V(ctypes.addressof(buf), 8)\n"
            "assert ctypes.CDLL(None).process_vm_readv(os.getppid(), ctypes.byref(v), 1, ctypes.byref(v), 1, 0) == 8\n"
        ),
    ]
    with SandboxPool(1, timeout_s=TIMEOUT, backend="bwrap", audit_hook=hook) as pool:
        server = pool._all[0]
        for attack in attacks:
            assert not pool.run(attack).passed, attack
            assert pool.run(PASS).passed, f"the server did not survive: {attack}"
        assert pool._all == [server] and server.alive


def test_a_server_that_dies_is_replaced() -> None:
    with SandboxPool(1, timeout_s=TIMEOUT, backend="bwrap") as pool:
        first = pool._all[0]
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        lost = pool.run(PASS)
        assert (lost.passed, lost.status) == (False, "error")  # not the candidate's pass
        assert pool.run(PASS).passed
        assert len(pool._all) == 1 and pool._all[0] is not first


def test_pooled_verdicts_equal_one_shot_verdicts() -> None:
    problem = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f",
               "test": "def check(c):\n    assert c(2) == 3\n"}  # fmt: skip
    bodies = ["    return x + 1\n", "    return x\n", "    while True:\n        pass\n", "    import os\n    os._exit(0)\n",
              "    raise KeyError(x)\n", "    return (lambda: x + 1)()\n", "    print('x' * 99999)\n    return x + 1\n"]  # fmt: skip
    problems, completions = [problem] * 2, [bodies, list(reversed(bodies))]
    pooled = execute_candidates(problems, completions, workers=2, timeout_s=2.0)
    again = execute_candidates(problems, completions, workers=2, timeout_s=2.0)  # fresh threads, same answers
    one_shot = execute_candidates(problems, completions, workers=2, timeout_s=2.0, reuse=False)
    assert pooled == again == one_shot
    assert pooled[0] == [True, False, False, False, False, True, True]


def test_without_seccomp_in_force_the_pool_runs_every_candidate_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "_notes", lambda raw, nonce: ["no-seccomp-arch"])
    with SandboxPool(2, timeout_s=TIMEOUT, backend="bwrap") as pool:
        assert not pool.reuse and pool._all == []
        assert [r.passed for r in pool.map([PASS, "assert False\n"])] == [True, False]


def test_bad_arguments_are_refused() -> None:
    for kwargs in ({"workers": 0}, {"workers": 1, "timeout_s": 0}, {"workers": 1, "memory_mb": -1}):
        with pytest.raises(ValueError):
            SandboxPool(**kwargs)


def test_a_server_that_cannot_be_spawned_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    with SandboxPool(1, timeout_s=TIMEOUT, backend="bwrap") as pool:
        os.killpg(pool._all[0].proc.pid, signal.SIGKILL)
        pool._all[0].proc.wait()
        assert pool.run(PASS).status == "error"  # the dead server's candidate
        monkeypatch.setattr(sp.subprocess, "Popen", _refuse)
        assert (pool.run(PASS).status, pool.run(PASS).detail) == ("error", "spawn")
    with SandboxPool(1, timeout_s=TIMEOUT, backend="bwrap") as fallback:  # Popen still refused
        assert not fallback.reuse
        assert fallback.run(PASS).detail == "spawn"  # the one-shot path reports it the same way


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("no processes left")

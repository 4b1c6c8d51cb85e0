"""The CPM's learned state survives `kill -9` (knexa_cpm.state: atomic snapshot after every change).

A real `python -m knexa_cpm serve` process is driven over libp2p by two signed client identities:
both submit round-0 profiles (so the round closes on quorum), the student fetches the directive
and reports its reward, then the daemon is SIGKILLed and restarted on the same state directory.
The restarted daemon must hold exactly the pre-kill state (round machine, bandit A / A^-1 / b,
reward statistics, RNG, stats) and carry on: round-1 profiles are accepted, the round-0 reward is
refused as a replay, and round 1 closes without touching what was learned.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import protocol as P
from knexa_cpm.bandit import array_from_state
from knexa_cpm.state import STATE_FILE, load_state
from knexa_p2p.host import P2PHost, open_host
from knexa_p2p.identity import Identity

pytestmark = pytest.mark.integration

FEDERATION = "knexa"  # CpmSection's default
START_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """One `knexa-cpm serve` child in its own session, with stdout read by a thread."""

    def __init__(self, state_dir: Path, extra: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "knexa_cpm", "serve", "--state-dir", str(state_dir),
               "--listen", "/ip4/127.0.0.1/tcp/0", "--set", "cpm.expected_nodes=2",
               "--set", "cpm.round_timeout_s=600", *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_listening(self) -> str:
        """The first multiaddr the daemon prints (`knexa-cpm listening on <maddr>`)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if "listening on" in line:
                return line.split("listening on", 1)[1].strip()
        raise AssertionError("CPM did not start:\n" + "".join(self.seen[-40:]))

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _children_of(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts; all are SIGKILLed (whole session) and reaped afterwards."""
    started: list[Daemon] = []
    before = set(_children_of(os.getpid()))
    yield started
    for d in started:
        d.kill9()
    left = set(_children_of(os.getpid())) - before
    assert not left, f"processes outlived the test: {sorted(left)}"


async def _request(host: P2PHost, cpm: bytes, msg: Any, identity: Identity, cap: int = 64 * 1024) -> Any:
    stream = await host.open_stream(cpm, P.CPM_PROTOCOL)
    try:
        await stream.send(P.encode(P.sign(msg, identity.signing_key)))
        raw = await stream.receive(max_size=cap, timeout=10)
    finally:
        await stream.close()
    return P.decode(raw, (P.Signed, P.Reply), max_size=cap)


async def _directive(host: P2PHost, cpm: bytes, round_: int, identity: Identity) -> P.MatchDirective:
    """Poll until the CPM has closed `round_` (its round loop ticks every 0.25 s)."""
    with trio.fail_after(30):
        while True:
            got = await _request(host, cpm, P.DirectiveRequest(FEDERATION, round_, identity.peer_bytes), identity)
            if isinstance(got, P.Signed):
                return P.open_signed(got, P.MatchDirective, authenticated=cpm, sender_of=lambda d: d.cpm)
            assert got.code == P.ReplyCode.NOT_READY, got
            await trio.sleep(0.1)


def _vector(i: int, round_: int) -> tuple[float, ...]:
    v = np.zeros(P.PROFILE_DIM)
    v[P.FAMILY_SLICE.start + i] = 1.0
    v[P.PERF_SLICE] = 0.1 * (i + 1) + 0.01 * round_
    v[P.HIST_SLICE] = np.eye(12)[i * 5] * 0.5 + 0.5 / 12
    return tuple(float(x) for x in v)


async def _session(maddr: str, ids: list[Identity], script: Any) -> Any:
    async with open_host(ids[0]) as h0, open_host(ids[1]) as h1:
        cpm = await h0.connect(maddr)
        assert await h1.connect(maddr) == cpm
        return await script([h0, h1], cpm)


def _round0(ids: list[Identity]) -> Any:
    async def script(hosts: list[P2PHost], cpm: bytes) -> tuple[P.MatchDirective, float]:
        for i, (h, ident) in enumerate(zip(hosts, ids, strict=True)):
            reply = await _request(h, cpm, P.Profile(FEDERATION, 0, ident.peer_bytes, _vector(i, 0)), ident)
            assert reply.ok and reply.round == 0, reply
        directive = await _directive(hosts[0], cpm, 0, ids[0])
        assert len(directive.pairs) == 1
        m = directive.pairs[0]
        k = [i.peer_bytes for i in ids].index(m.student)
        report = P.RewardReport(FEDERATION, 0, m.directive_id, m.teacher, m.student, 0.75, 1234)
        reply = await _request(hosts[k], cpm, report, ids[k])
        assert reply.ok, reply
        return directive, 0.75
    return script


def _after_restart(ids: list[Identity], directive: P.MatchDirective, state_dir: Path) -> Any:
    async def script(hosts: list[P2PHost], cpm: bytes) -> dict[str, Any]:
        m = directive.pairs[0]
        k = [i.peer_bytes for i in ids].index(m.student)
        # a resent round-0 profile (its first ack lost) is recognised as already counted in the
        # closed round 0: only a daemon that remembers round 0's directive can say so
        reply = await _request(hosts[0], cpm, P.Profile(FEDERATION, 0, ids[0].peer_bytes, _vector(0, 0)), ids[0])
        assert reply.ok and reply.round == 0 and "already counted" in reply.detail, reply
        # the reward already learned from is remembered, not learned twice
        report = P.RewardReport(FEDERATION, 0, m.directive_id, m.teacher, m.student, 0.75, 1234)
        reply = await _request(hosts[k], cpm, report, ids[k])
        assert not reply.ok and reply.code == P.ReplyCode.REPLAY, reply
        reply = await _request(hosts[0], cpm, P.Profile(FEDERATION, 1, ids[0].peer_bytes, _vector(0, 1)), ids[0])
        assert reply.ok and reply.round == 1, reply
        mid = load_state(state_dir)  # persisted after that profile, before round 1 closes
        reply = await _request(hosts[1], cpm, P.Profile(FEDERATION, 1, ids[1].peer_bytes, _vector(1, 1)), ids[1])
        assert reply.ok and reply.round == 1, reply
        d1 = await _directive(hosts[0], cpm, 1, ids[0])
        assert d1.round == 1 and len(d1.pairs) == 1
        return mid
    return script


def _arrays(policy_state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: array_from_state(policy_state["bandit"][k]) for k in ("A", "A_inv", "b")}


def test_state_survives_kill_9_and_the_cpm_continues(tmp_path: Path, daemons: list[Daemon]) -> None:
    state_dir = tmp_path / "cpm"
    ids = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(2)]

    first = Daemon(state_dir)
    daemons.append(first)
    maddr = first.wait_listening()
    directive, reward = trio.run(_session, maddr, ids, _round0(ids))

    before = load_state(state_dir)
    assert before is not None
    assert before["stats"]["updates"] == 1 and before["stats"]["rounds_closed"] == 1
    assert before["policy"]["bandit"]["n_updates"] == 1
    assert before["machine"]["round"] == 1 and not before["machine"]["pending"]
    # the first reward z-normalises to 0, so b is still 0, but A has learned x x'
    a = array_from_state(before["policy"]["bandit"]["A"])
    assert np.abs(a - before["policy"]["bandit"]["lam"] * np.eye(a.shape[0])).sum() > 0
    assert before["policy"]["norm"]["count"] == 1
    assert first.proc.poll() is None
    first.kill9()
    assert first.proc.returncode == -signal.SIGKILL
    assert (state_dir / STATE_FILE).exists()
    assert load_state(state_dir) == before  # nothing wrote after the snapshot we read

    second = Daemon(state_dir)
    daemons.append(second)
    maddr2 = second.wait_listening()
    assert maddr2.rsplit("/p2p/", 1)[1] == maddr.rsplit("/p2p/", 1)[1], "identity must persist too"
    mid = trio.run(_session, maddr2, ids, _after_restart(ids, directive, state_dir))

    # the restarted daemon's state is the pre-kill state plus one round-1 profile
    assert mid["policy"] == before["policy"]  # bandit A, A^-1, b, Welford stats, RNG, exactly
    # stats resumed too; the only new entry is the replayed reward this test provoked
    expect_rejected = dict(before["stats"]["rejected"])
    expect_rejected[P.ReplyCode.REPLAY] = expect_rejected.get(P.ReplyCode.REPLAY, 0) + 1
    assert mid["stats"] == {**before["stats"], "rejected": expect_rejected}
    for key in ("round", "directives", "pending", "rewarded"):
        assert mid["machine"][key] == before["machine"][key], key
    assert list(mid["machine"]["profiles"]) == [ids[0].peer_bytes]
    for name, arr in _arrays(mid["policy"]).items():
        np.testing.assert_array_equal(arr, _arrays(before["policy"])[name], err_msg=name)

    after = load_state(state_dir)
    assert after["machine"]["round"] == 2 and after["stats"]["rounds_closed"] == 2
    assert after["stats"]["updates"] == 1 and after["policy"]["bandit"] == before["policy"]["bandit"]
    assert after["stats"]["rewards"] == [[0, P.peer_id_str(directive.pairs[0].teacher),
                                          P.peer_id_str(directive.pairs[0].student), reward]]

"""A federation of real daemons on loopback whose members a test can kill -9 and restart.

It is built the way `knexa_lab.launcher` builds one (seeded split, identities created up front,
free ports, roster, one TOML config per daemon, `knexa_lab.procs.spawn` so a dying test run
takes its children along), but every daemon keeps its port, state directory and config across
restarts, so a restarted process is the same federation member. Logs are appended to, so each
start remembers where its part of the log begins.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from knexa_lab.procs import Child, spawn
from tests.support.procs import processes_mentioning

__all__ = [
    "Daemon",
    "DaemonDied",
    "LoopbackFederation",
    "TINY_MODELS",
    "check_rewards_once",
    "processes_mentioning",
    "rewards_counted_once",
    "rss_kib",
    "wait_until",
]

T = TypeVar("T")

#: the four tiny presets (two tokenizer styles, four families), built locally in seconds
TINY_MODELS = ("tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-gptneox")

#: learning settings small enough for a round in a few seconds per node on a shared 2-core box
TINY_LEARNING: dict[str, Any] = {
    "max_len": 128, "max_new_tokens": 16, "eval_problems": 2, "transfer_size": 3, "threads": 1,
    "micro_batch": 4, "effective_batch": 8, "gen_batch": 4, "lr": 1e-3, "kd_lr": 1e-3,
    "sandbox_timeout_s": 10.0, "sandbox_workers": 1,
}
#: node timeouts: short enough that a dead peer costs seconds, long enough for a busy machine
FAST_NODE: dict[str, Any] = {
    "directive_timeout_s": 60.0, "directive_poll_s": 2.0, "package_timeout_s": 20.0,
    "stream_timeout_s": 10.0, "cpm_connect_timeout_s": 120.0, "final_eval": False, "stop_grace_s": 3.0,
}


class DaemonDied(AssertionError):
    """A daemon exited while the test was waiting for something it should have done."""


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def wait_until(check: Callable[[], T | None], timeout: float, what: str, *, every: float = 0.2,
               alive: Sequence[Daemon] = ()) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds, or at once
    when one of the `alive` daemons exits (so a crash is reported as a crash, not a timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for d in alive:
            if not d.running:
                raise DaemonDied(f"{d.name} exited with {d.returncode} while waiting for {what}:\n{d.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@dataclass
class Daemon:
    """One daemon of the federation: its command line survives kills, its log is appended to."""

    name: str
    argv: list[str]
    state_dir: Path
    log: Path
    env: dict[str, str]
    child: Child | None = None
    #: byte offset in `log` where the current run's output begins
    log_start: int = 0
    starts: int = 0
    #: (monotonic time, pid, VmRSS KiB) samples taken by `LoopbackFederation.sample_rss`
    rss: list[tuple[float, int, int]] = field(default_factory=list)
    _listening_pid: int | None = None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        self.child = spawn(self.name, self.argv, self.log, self.env)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def returncode(self) -> int | None:
        return None if self.child is None else self.child.poll()

    def kill9(self) -> None:
        """SIGKILL the daemon's process (a crash: no handler, no final write) and reap it."""
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.proc.wait(30)

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but does nothing (a frozen, not a dead, peer)."""
        assert self.child is not None
        os.kill(self.child.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGCONT)

    def stop(self) -> int | None:
        """SIGTERM then SIGKILL (knexa_lab.procs.Child.stop); None when it never started."""
        return None if self.child is None else self.child.stop(grace=15)

    def text(self, *, current: bool = True) -> str:
        """The log; only the current run's part when `current`."""
        try:
            with open(self.log, "rb") as fh:
                if current:
                    fh.seek(self.log_start)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.text(current=False).splitlines()[-n:])

    @property
    def listening(self) -> bool:
        """The current run has printed its listen address (it is up, model loaded)."""
        if self.running and self._listening_pid != self.pid and self.find("listening on"):
            self._listening_pid = self.pid
        return self.running and self._listening_pid == self.pid

    def find(self, needle: str) -> str | None:
        """The first line of the current run's log containing `needle`."""
        return next((ln for ln in self.text().splitlines() if needle in ln), None)

    def wait_for(self, needle: str, timeout: float) -> str:
        return wait_until(lambda: self.find(needle), timeout, f"{self.name}: {needle!r}", alive=[self])

    def status(self) -> dict[str, Any] | None:
        """The daemon's control-socket answer, or None while it cannot answer."""
        from knexa_runtime.control import CONTROL_SOCKET, ControlError, query

        try:
            return query(self.state_dir / CONTROL_SOCKET, timeout=2.0)
        except (ControlError, OSError):
            return None


class LoopbackFederation:
    """A CPM and N nodes as processes on 127.0.0.1, each restartable on its own port and state.

    Args:
        root: everything lives here (data, state dirs, configs, logs); use a test's tmp path so
            the `reap` fixture can find leftovers by command line.
        models: one tiny preset per node.
        cache: KNEXA_CACHE with the models already prepared.
        rounds: rounds each node runs before exiting 0.
        learning / node / cpm: overrides on TINY_LEARNING, FAST_NODE and the CPM's defaults.
        node_learning: per-node extra [learning] keys (index -> dict).
        problems: how many HumanEval problems the split uses (fewer = shorter local epochs).
    """

    def __init__(self, root: Path, models: Sequence[str], cache: Path, *, rounds: int,
                 learning: dict[str, Any] | None = None, node: dict[str, Any] | None = None,
                 cpm: dict[str, Any] | None = None, node_learning: dict[int, dict[str, Any]] | None = None,
                 seed: int = 7, problems: int = 60, federation: str = "faults") -> None:
        from knexa_lab.launcher import _free_ports
        from knexa_node.data import load_problems, make_split, write_split
        from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
        from knexa_runtime.control import CONTROL_SOCKET

        sock = root / "n0" / CONTROL_SOCKET
        assert len(os.fsencode(sock)) < 100, f"{sock} is too long for a Unix socket: use a shorter root"
        self.root = root
        self.models = list(models)
        self.rounds = rounds
        n = len(self.models)
        learn = {**TINY_LEARNING, **(learning or {})}
        data = root / "data"
        split = make_split(load_problems()[:problems], n_nodes=n, seed=seed, test_size=learn["eval_problems"],
                           transfer_size=learn["transfer_size"], alpha=1.0)
        write_split(split, data)

        ports = _free_ports(n + 1)
        cpm_dir = root / "cpm"
        cpm_id = load_or_create_identity(cpm_dir / "identity.key")
        self.node_dirs = [root / f"n{i}" for i in range(n)]
        ids = [load_or_create_identity(d / "identity.key") for d in self.node_dirs]
        for d in self.node_dirs:
            load_or_create_kem_key(d / "kem.key")
        self.peer_ids = [str(i.peer_id) for i in ids]
        self.cpm_peer_id = str(cpm_id.peer_id)
        self.cpm_addr = f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{cpm_id.peer_id}"
        node_addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{i.peer_id}" for p, i in zip(ports[1:], ids, strict=True)]

        cpm_cfg = {"cpm": {"federation": federation, "listen": [f"/ip4/127.0.0.1/tcp/{ports[0]}"],
                           "state_dir": str(cpm_dir), "roster": self.peer_ids, "round_timeout_s": 30.0,
                           "seed": seed, **(cpm or {})}}
        (cpm_dir / "cpm.toml").write_text(tomli_w.dumps(cpm_cfg))
        env = {"KNEXA_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        py = sys.executable
        self.cpm = Daemon("cpm", [py, "-m", "knexa_cpm", "serve", "--config", str(cpm_dir / "cpm.toml")],
                          cpm_dir, cpm_dir / "cpm.log", env)
        self.nodes: list[Daemon] = []
        for i, (model, d) in enumerate(zip(self.models, self.node_dirs, strict=True)):
            cfg = {
                "node": {"federation": federation, "model": model, "state_dir": str(d),
                         "data_dir": str(data / f"node-{i}"), "public_dir": str(data / "public"),
                         "listen": [f"/ip4/127.0.0.1/tcp/{ports[i + 1]}"], "cpm": self.cpm_addr,
                         "bootstrap": [a for j, a in enumerate(node_addrs) if j != i],
                         "roster": self.peer_ids, "rounds": rounds, **FAST_NODE, **(node or {})},
                "learning": {"total_rounds": max(rounds, 1), **learn, "seed": seed * 100 + i,
                             **(node_learning or {}).get(i, {})},
            }
            (d / "node.toml").write_text(tomli_w.dumps(cfg))
            self.nodes.append(Daemon(f"n{i}", [py, "-m", "knexa_node", "start", "--config", str(d / "node.toml")],
                                     d, d / "node.log", env))

    # ---- life cycle -------------------------------------------------------------------------
    @property
    def daemons(self) -> list[Daemon]:
        return [self.cpm, *self.nodes]

    def start(self, *, ready_timeout: float = 240.0) -> None:
        """CPM first, then the nodes, as an operator would: nodes import and load their models
        in parallel and begin round 0 as they start listening, within a second or so of each
        other, so no round 0 closes on its timeout before a slow starter reports."""
        self.cpm.start()
        self.cpm.wait_for("listening on", 120)
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_for("listening on", ready_timeout)

    def restart(self, d: Daemon, *, ready_timeout: float = 180.0) -> None:
        """Start a killed daemon again, same port, config and state dir; wait until it listens."""
        assert not d.running, f"{d.name} is still running"
        d.start()
        d.wait_for("listening on", ready_timeout)

    def stop_all(self) -> dict[str, int | None]:
        return {d.name: d.stop() for d in reversed(self.daemons)}

    def wait_finished(self, timeout: float, *, nodes: Sequence[Daemon] | None = None) -> None:
        """Wait until the nodes exit (they do after `rounds` rounds); fail early if the CPM dies."""
        nodes = list(self.nodes if nodes is None else nodes)

        def done() -> bool:
            if not self.cpm.running:
                raise DaemonDied(f"the CPM exited with {self.cpm.returncode}:\n{self.cpm.tail()}")
            return all(not n.running for n in nodes)

        wait_until(done, timeout, f"{[n.name for n in nodes]} to finish their rounds", every=0.5)

    def sample_rss(self) -> None:
        """Record each daemon's VmRSS, from the moment its current run listens (start-up, with
        its imports and model load, would look like growth)."""
        now = time.monotonic()
        for d in self.daemons:
            if d.running and d.listening and (kib := rss_kib(d.pid)) is not None:
                d.rss.append((now, d.pid, kib))

    # ---- what the daemons left on disk --------------------------------------------------------
    def rounds_log(self, i: int) -> list[dict[str, Any]]:
        path = self.node_dirs[i] / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def node_state(self, i: int) -> dict[str, Any]:
        path = self.node_dirs[i] / "node-state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def cpm_state(self) -> dict[str, Any] | None:
        from knexa_cpm.state import load_state

        return load_state(self.cpm.state_dir)

    def directive(self, round_: int) -> Any | None:
        """The MatchDirective the CPM persisted for `round_` (None until it closed that round)."""
        from protocol import MatchDirective, decode

        state = self.cpm_state()
        raw = state and state["machine"]["directives"].get(str(round_))
        return decode(raw, MatchDirective) if raw else None

    def index_of(self, peer: bytes | str) -> int:
        from protocol import peer_id_str

        return self.peer_ids.index(peer if isinstance(peer, str) else peer_id_str(peer))


def rewards_counted_once(state: dict[str, Any] | None, entries: Sequence[dict[str, Any]], *,
                         may_miss: Sequence[str] = ()) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The federation-wide reward invariant, checked from both ends of the wire.

    Every reward a student logged as acknowledged is in the CPM's persisted stats (`state`, as
    knexa_cpm.state.load_state returns it) exactly once, with the same value: acknowledged is
    `reward_ack == "ok"`, or "replay" when a retry after a lost ack found the CPM had it already.
    The CPM holds no reward twice and none that no student computed. `entries` are the nodes' rounds.jsonl entries. A
    student in `may_miss` (peer ids) may have died between reporting a reward and logging its
    round, so only its rows may lack a log entry. Returns the CPM rows and the rewarded entries.
    """
    assert state is not None, "the CPM persisted no state"
    rows = [list(r) for r in state["stats"]["rewards"]]
    keys = [(int(r), t, s) for r, t, s, _ in rows]
    assert len(keys) == len(set(keys)), f"a reward was counted twice: {sorted(keys)}"
    assert state["stats"]["updates"] == len(rows) == state["policy"]["bandit"]["n_updates"], (
        "bandit updates, reward rows and stats disagree")
    by_key = {(int(r), t, s): float(v) for r, t, s, v in rows}
    rewarded = [dict(e) for e in entries if e.get("role") == "student" and "reward" in e]
    computed = {(e["round"], e["partner"], e["node"]) for e in rewarded}
    for e in rewarded:
        key = (e["round"], e["partner"], e["node"])
        if e["reward_ack"] in ("ok", "replay"):  # replay: a retry after a lost ack
            assert key in by_key, f"acknowledged reward lost by the CPM: {key} ({e['reward_ack']})"
            assert abs(by_key[key] - e["reward"]) < 1e-9, f"reward changed on the way: {key}"
    for key in by_key:
        assert key in computed or key[2] in may_miss, f"the CPM holds a reward no student logged: {key}"
    return rows, rewarded


def check_rewards_once(fed: LoopbackFederation, *, crashed: Sequence[int] = ()
                       ) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """`rewards_counted_once` for a loopback federation; `crashed` are node indices."""
    entries = [e for i in range(len(fed.nodes)) for e in fed.rounds_log(i)]
    return rewards_counted_once(fed.cpm_state(), entries, may_miss=[fed.peer_ids[i] for i in crashed])

"""A federation on a network that delays and loses messages (in-process, real libp2p, fake model).

Every daemon's host is wrapped by tests/support/faulty.py: frames late or lost (stream reset),
stream opens refused, pubsub messages dropped. The federation must keep making progress and
count every reward once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import knexa_cpm.service
import knexa_node.service
import protocol as P
from knexa_cpm.config import CpmSection
from knexa_cpm.service import serve
from knexa_cpm.state import load_state
from knexa_lab.launcher import _free_ports
from knexa_node.config import NodeSection
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from tests.faults.harness import rewards_counted_once
from tests.support.fake_backend import FakeBackend
from tests.support.faulty import FaultLog, Faults, faulty_open_host

pytestmark = [pytest.mark.faults]

LOSSY = Faults(seed=20261123, max_delay_s=0.15, drop_frame=0.08, refuse_open=0.05, drop_pubsub=0.3)


def _fixed_identity(path: Path, name: str) -> None:
    """A key file derived from `name`: the same peer ids, hence the same faults, on every run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.sha256(f"lossy/{name}".encode()).digest())
    path.chmod(0o600)


def _rounds(state_dir: Path) -> list[dict]:
    path = state_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _federation(tmp: Path, rounds: Sequence[int], bound_s: float, *, directive_timeout_s: float = 10.0
                      ) -> tuple[list[NodeService], dict]:
    """Run a CPM and one fake-model node per entry of `rounds` (its round count) to the end."""
    n = len(rounds)
    for name in ("cpm", *(f"n{i}" for i in range(n))):
        _fixed_identity(tmp / name / "identity.key", name)
    ids = [load_or_create_identity(tmp / f"n{i}" / "identity.key") for i in range(n)]
    roster = tuple(str(i.peer_id) for i in ids)
    addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{i.peer_id}" for p, i in zip(_free_ports(n), ids, strict=True)]
    cpm_cfg = CpmSection(federation="lossy", state_dir=tmp / "cpm", roster=roster, round_timeout_s=8.0)
    async with trio.open_nursery() as nursery:
        cpm_addrs = await nursery.start(serve, cpm_cfg)
        nodes = []
        for i in range(n):
            d = tmp / f"n{i}"
            cfg = NodeSection(federation="lossy", state_dir=d, cpm=cpm_addrs[0], roster=roster, rounds=rounds[i],
                              listen=(addrs[i].split("/p2p/")[0],),
                              bootstrap=tuple(a for j, a in enumerate(addrs) if j != i),
                              directive_timeout_s=directive_timeout_s, directive_poll_s=1.0, package_timeout_s=6,
                              stream_timeout_s=5, final_eval=False)
            nodes.append(NodeService(cfg, FakeBackend(f"fake-{i}", seed=i), ids[i],
                                     load_or_create_kem_key(d / "kem.key")))
        with trio.fail_after(bound_s):
            async with trio.open_nursery() as inner:
                for node in nodes:
                    inner.start_soon(node.run)
        nursery.cancel_scope.cancel()
    return nodes, load_state(tmp / "cpm")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_federation_progresses_over_a_lossy_network(tmp_path, monkeypatch):
    log = FaultLog()
    monkeypatch.setattr(knexa_node.service, "open_host", faulty_open_host(LOSSY, log))
    monkeypatch.setattr(knexa_cpm.service, "open_host", faulty_open_host(LOSSY, log))
    rounds = 5
    nodes, state = await _federation(tmp_path, [rounds] * 4, bound_s=240)

    # every kind of fault actually happened
    for kind in ("delay", "drop_frame", "refuse_open"):
        assert log[kind] > 0, f"no {kind} injected: {dict(log)}"
    assert log["drop_published"] + log["drop_delivered"] > 0, f"no pubsub message lost: {dict(log)}"
    # every node ran all its rounds, each round number once and in order (it may catch up past
    # a round the CPM closed without it, never go back), and the federation closed as many
    entries = []
    for node in nodes:
        got = _rounds(node.state_dir)
        entries += got
        assert node.completed == rounds and len(got) == rounds, got
        assert all(a["round"] < b["round"] for a, b in zip(got, got[1:], strict=False)), [e["round"] for e in got]
    assert state["stats"]["rounds_closed"] >= rounds
    # rewards: each counted once, and lost acks did not lose them
    rows, rewarded = rewards_counted_once(state, entries)
    assert rows and any(e["reward_ack"] == "ok" for e in rewarded), "no reward got through at all"


def _first_profile_of_round(round_: int):
    """Matches each node's first profile for `round_` (its retry goes through)."""
    seen: set[bytes] = set()

    def match(payload: bytes) -> bool:
        try:
            signed = P.decode(payload, P.Signed)
            hit = P.decode(signed.body, P.Profile).round == round_ and signed.signer not in seen
        except P.RemoteProtocolError:
            return False
        if hit:
            seen.add(signed.signer)
        return hit

    return match


@pytest.mark.timeout(120)
async def test_lost_profile_ack_does_not_skip_the_matched_round(tmp_path, monkeypatch):
    """A node whose profile the CPM took but whose ack was lost retries after the round closed
    with it as a participant: it must still play that round (it used to get STALE_ROUND, jump
    ahead and leave its partner waiting for a package)."""
    # the only fault: every node's round-1 profile is served by the CPM, but its reply is lost
    lost = Faults(seed=1, lose_reply_to=_first_profile_of_round(1))
    log = FaultLog()
    monkeypatch.setattr(knexa_node.service, "open_host", faulty_open_host(lost, log))
    rounds = 3
    nodes, state = await _federation(tmp_path, [rounds] * 2, bound_s=90)

    assert log["lose_reply"] == 2
    directive = P.decode(state["machine"]["directives"]["1"], P.MatchDirective)
    assert set(directive.participants) == {n.me for n in nodes}, "both profiles of round 1 reached the CPM"
    for node in nodes:
        assert [e["round"] for e in _rounds(node.state_dir)] == list(range(rounds)), _rounds(node.state_dir)
    rows, _ = rewards_counted_once(state, [e for n in nodes for e in _rounds(n.state_dir)])
    assert {r for r, *_ in rows} == set(range(rounds)), "each round's pair should have been rewarded"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_node_ahead_of_the_cpm_does_not_repeat_a_round(tmp_path):
    """After a round without a directive a node is ahead of the CPM's open round; catching up
    must only go forward (it used to step back and run, and log, a round number twice)."""
    # n1 leaves after 2 rounds: round 2 never closes (one participant), n0 times out on its
    # directive, moves on to round 3, and the CPM still has round 2 open
    nodes, state = await _federation(tmp_path, [4, 2], bound_s=90, directive_timeout_s=3.0)

    assert state["machine"]["round"] == 2 and state["stats"]["rounds_closed"] == 2
    got = [e["round"] for e in _rounds(nodes[0].state_dir)]
    assert len(got) == 4 and got[:2] == [0, 1]
    assert len(set(got)) == len(got), f"a round was run twice: {got}"

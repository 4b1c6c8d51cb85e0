"""Discovery end to end (CPM and nodes in one trio run, real libp2p, fake model backend).

The nodes are configured with nothing but the CPM's address and their own keys: no roster file,
no bootstrap list, no peer addresses. They find each other through the signed peer records the
CPM serves and exchange packages; a node that restarts on another port is a partner again in the
very next round.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from knexa_cpm.config import CpmSection
from knexa_cpm.service import CpmService, serve
from knexa_lab.launcher import _free_ports
from knexa_node.config import NodeSection
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from tests.support.fake_backend import FakeBackend


def _node(tmp: Path, name: str, cpm_addr: str, rounds: int, port: int) -> NodeService:
    d = tmp / name
    cfg = NodeSection(federation="disc", state_dir=d, cpm=cpm_addr, rounds=rounds,
                      listen=(f"/ip4/127.0.0.1/tcp/{port}",), directive_timeout_s=60, package_timeout_s=30,
                      stream_timeout_s=10, final_eval=False, directive_poll_s=1.0)
    assert not cfg.roster and cfg.roster_file is None and not cfg.bootstrap
    return NodeService(cfg, FakeBackend(f"fake-{name}", seed=len(name)), load_or_create_identity(d / "identity.key"),
                       load_or_create_kem_key(d / "kem.key"))


def _rounds(tmp: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp / name / "rounds.jsonl").read_text().splitlines()]


async def test_nodes_with_only_the_cpm_address_exchange_packages_and_a_moved_node_is_found(tmp_path, monkeypatch):
    import knexa_node.service

    monkeypatch.setattr(knexa_node.service, "DISCOVERY_INTERVAL_S", 0.5)  # 10 s in production
    ids = [str(load_or_create_identity(tmp_path / n / "identity.key").peer_id) for n in ("a", "b")]
    cfg = CpmSection(federation="disc", state_dir=tmp_path / "cpm", roster=tuple(ids), round_timeout_s=30.0)
    cpm = CpmService(cfg)
    port_a, port_b1, port_b2 = _free_ports(3)
    moved = f"/ip4/127.0.0.1/tcp/{port_b2}"
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(lambda task_status: serve(cfg, service=cpm, task_status=task_status))
        a = _node(tmp_path, "a", addrs[0], rounds=0, port=port_a)  # runs until cancelled
        b1 = _node(tmp_path, "b", addrs[0], rounds=2, port=port_b1)
        with trio.fail_after(150):
            async with trio.open_nursery() as inner:
                inner.start_soon(a.run)
                await b1.run()  # two rounds, then it stops ...
                b2 = _node(tmp_path, "b", addrs[0], rounds=0, port=port_b2)  # ... and comes back elsewhere
                inner.start_soon(b2.run)
                # two more rounds with the moved node, and A dials it at its new address by itself
                while not (b2.completed >= 4 and a.completed >= 4 and a.discovered.get(b2.me) == (moved,)
                           and a.host is not None and a.host.is_connected(b2.me)):
                    await trio.sleep(0.1)
                inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()

    a_log, b_log = _rounds(tmp_path, "a")[:4], _rounds(tmp_path, "b")[:4]
    for log in (a_log, b_log):
        assert [e["round"] for e in log] == [0, 1, 2, 3]
        assert all(e["role"] in ("teacher", "student") and "error" not in e for e in log), log
    # every round paired the two (before and after the move): one taught, the other learnt
    for ea, eb in zip(a_log, b_log, strict=True):
        assert {ea["role"], eb["role"]} == {"teacher", "student"}
    assert cpm.stats["updates"] >= 4
    assert b1.me == b2.me and cpm.directory.records[b2.me].addrs == (moved,)

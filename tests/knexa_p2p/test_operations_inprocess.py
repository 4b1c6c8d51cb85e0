"""Operations on a live in-process federation (real libp2p, fake model): status over the
control socket, Prometheus counters, SIGHUP-style reload of the roster file, and a node that
joins a running federation after it was added to the roster."""

import dataclasses
from pathlib import Path

import trio

from knexa_cpm.config import CpmSection
from knexa_cpm.service import CpmService, serve
from knexa_node.config import NodeSection
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from knexa_runtime.control import query
from tests.support.fake_backend import FakeBackend


def _roster_file(path: Path, ids: list[str], ports: list[int]) -> Path:
    """Members with their addresses: that is how nodes find each other's KD endpoints."""
    path.write_text("".join(f'[[peer]]\nid = "{i}"\nname = "n{k}"\naddr = "/ip4/127.0.0.1/tcp/{p}/p2p/{i}"\n\n'
                            for k, (i, p) in enumerate(zip(ids, ports, strict=True))))
    return path


def _node(tmp: Path, i: int, cpm_addr: str, roster_file: Path, rounds: int, port: int) -> NodeService:
    d = tmp / f"n{i}"
    cfg = NodeSection(federation="ops", state_dir=d, cpm=cpm_addr, roster_file=roster_file, rounds=rounds,
                      listen=(f"/ip4/127.0.0.1/tcp/{port}",),
                      directive_timeout_s=60, package_timeout_s=20, stream_timeout_s=10, final_eval=False,
                      directive_poll_s=1.0)
    return NodeService(cfg, FakeBackend(f"fake-{i}", seed=i), load_or_create_identity(d / "identity.key"),
                       load_or_create_kem_key(d / "kem.key"))


async def test_status_metrics_reload_and_late_joiner(tmp_path):
    ids = [str(load_or_create_identity(tmp_path / f"n{i}" / "identity.key").peer_id) for i in range(3)]
    from knexa_lab.launcher import _free_ports

    ports = _free_ports(3)
    roster = _roster_file(tmp_path / "roster.toml", ids[:2], ports[:2])
    cfg = CpmSection(federation="ops", state_dir=tmp_path / "cpm", roster_file=roster, round_timeout_s=4.0)
    cpm = CpmService(cfg)
    assert cpm.status()["roster"] == 2 and cpm.settings.quorum_count == 2
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(lambda task_status: serve(cfg, service=cpm, task_status=task_status))
        first = [_node(tmp_path, i, addrs[0], roster, rounds=4, port=ports[i]) for i in range(2)]
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                for n in first:
                    inner.start_soon(n.run)
                while cpm.machine.round < 2:
                    await trio.sleep(0.2)
                # status over the real control socket, from a thread as the CLI would
                node_status = await trio.to_thread.run_sync(query, first[0].state_dir / "control.sock")
                assert node_status["daemon"] == "knexa-node" and node_status["round"] >= 1
                assert node_status["health"] == "ok" and node_status["last_rounds"]
                # each finished round says where its time went, phase by phase
                phases = node_status["last_rounds"][0]["phase_seconds"]
                assert {"train", "evaluate", "profile", "checkpoint"} <= set(phases)
                assert all(v >= 0 for v in phases.values())
                assert "round_phase_seconds" in node_status
                cpm_status = await trio.to_thread.run_sync(query, tmp_path / "cpm" / "control.sock")
                assert cpm_status["rounds_closed"] >= 2 and cpm_status["roster"] == 2
                assert cpm_status["last_round"]["pairs"]
                # a third member is added to the roster file and the CPM reloads (SIGHUP)
                _roster_file(roster, ids, ports)
                ignored = cpm.reload(dataclasses.replace(cfg, round_timeout_s=3.0, policy="random"))
                assert ignored == ["policy"], "policy shapes persisted state: restart needed"
                assert cpm.status()["roster"] == 3 and cpm.settings.round_timeout_s == 3.0
                late = _node(tmp_path, 2, addrs[0], roster, rounds=2, port=ports[2])
                inner.start_soon(late.run)
        nursery.cancel_scope.cancel()

    assert all(n.completed == 4 for n in first)
    for n in (*first, late):  # per-round bookkeeping is pruned: a daemon runs for weeks
        assert len(n._directives) <= 3 and len(n._directive_events) <= 3
        assert not n._inbox and not n._inbox_events and not n._waiting
    assert late.completed == 2 and late.round >= 3, "the late node caught up with the open round"
    rewards = cpm.stats["rewards"]
    assert all(e["role"] != "no_directive" for e in late.last_rounds)
    joined = [r for r, d in cpm.machine.directives.items() if late.me in d.participants]
    assert len(joined) == 2, "both of the late node's rounds counted it as a participant"
    m = cpm.metrics.registry.get_sample_value
    assert m("knexa_rounds_total") == cpm.stats["rounds_closed"] >= 4
    assert m("knexa_reward_count") == len(rewards) == cpm.stats["updates"]
    nm = first[0].metrics.registry.get_sample_value
    assert nm("knexa_rounds_total") == 4
    assert nm("knexa_phase_duration_seconds_count", {"phase": "train"}) == 4
    sent = sum(n.metrics.registry.get_sample_value("knexa_bytes_sent_total") for n in (*first, late))
    received = sum(n.metrics.registry.get_sample_value("knexa_bytes_received_total") for n in (*first, late))
    assert sent > 0 and sent == received

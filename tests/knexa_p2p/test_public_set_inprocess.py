"""The federation's public set travels through the federation: a real CPM and real nodes over
libp2p on loopback (fake model backend). A node without the bundle fetches and verifies it and
completes a round on it; a stale or tampered copy, or a version change, stops the round."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import trio

from knexa_cpm.config import CpmSection
from knexa_cpm.public_sets import PublicSetStore
from knexa_cpm.service import CpmService, serve
from knexa_node.config import NodeSection
from knexa_node.data import read_jsonl
from knexa_node.public_set import PublicSetMismatch, bundle_dir, install
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from knexa_runtime.exceptions import leaf_of
from protocol import PublicSetAnnounce
from tests.support.fake_backend import FakeBackend


def problems(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"task_id": f"{prefix}/{i}", "prompt": f"def {prefix}{i}(x):\n", "canonical_solution": "    return x\n",
             "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": f"{prefix}{i}"} for i in range(n)]


def publish(state: Path, tmp: Path, n_test: int, name: str) -> None:
    for kind, rows in (("test", problems("T", n_test)), ("transfer", problems("X", 3))):
        (tmp / f"{name}-{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    PublicSetStore(state).add(tmp / f"{name}-test.jsonl", tmp / f"{name}-transfer.jsonl")


class BundleBackend(FakeBackend):
    """A fake model whose transfer prompts are the public set it was built on."""

    def __init__(self, name: str, seed: int, public_dir: Path) -> None:
        super().__init__(name, seed)
        self.public_dir = public_dir
        self.transfer = [(p["task_id"], p["prompt"]) for p in read_jsonl(public_dir / "transfer.jsonl")]

    def transfer_prompts(self) -> list[tuple[str, str]]:
        return list(self.transfer)


def _node(tmp: Path, i: int, cpm: str, roster: list[str], rounds: int, public_dir: Path | None = None,
          addrs: list[str] = ()) -> NodeService:
    d = tmp / f"node-{i}"
    listen = (addrs[i].split("/p2p/")[0],) if addrs else ("/ip4/127.0.0.1/tcp/0",)
    cfg = NodeSection(federation="t", state_dir=d, cpm=cpm, roster=tuple(roster), rounds=rounds, public_dir=public_dir,
                      listen=listen, bootstrap=tuple(a for j, a in enumerate(addrs) if j != i),
                      directive_timeout_s=60, package_timeout_s=60, stream_timeout_s=10, final_eval=False)
    return NodeService(cfg, None, load_or_create_identity(d / "identity.key"), load_or_create_kem_key(d / "kem.key"),
                       make_backend=lambda folder: BundleBackend(f"fake-{i}", i, folder))


def _roster(tmp: Path, n: int) -> list[str]:
    return [str(load_or_create_identity(tmp / f"node-{i}" / "identity.key").peer_id) for i in range(n)]


async def test_nodes_without_the_bundle_fetch_it_and_complete_a_round(tmp_path: Path) -> None:
    publish(tmp_path / "cpm", tmp_path, 4, "v1")
    roster = _roster(tmp_path, 2)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(serve, CpmSection(federation="t", state_dir=tmp_path / "cpm", roster=tuple(roster)))
        from knexa_lab.launcher import _free_ports

        node_addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{r}" for p, r in zip(_free_ports(2), roster, strict=True)]
        nodes = [_node(tmp_path, i, addrs[0], roster, rounds=1, addrs=node_addrs) for i in range(2)]
        with trio.fail_after(90):
            async with trio.open_nursery() as inner:
                for n in nodes:
                    inner.start_soon(n.run)
        nursery.cancel_scope.cancel()

    current = PublicSetStore(tmp_path / "cpm").current()
    assert current is not None
    for n in nodes:
        assert n.public_set is not None and n.public_set.digest == current.digest
        folder = n.backend.public_dir
        assert folder == tmp_path / f"node-{n.backend.model_name[-1]}" / "public-sets" / f"v0001-{current.digest.hex()[:12]}"
        assert [p["task_id"] for p in read_jsonl(folder / "test.jsonl")] == [f"T/{i}" for i in range(4)]
        (entry,) = [json.loads(line) for line in (n.state_dir / "rounds.jsonl").read_text().splitlines()]
        assert entry["public_set"] == f"v1 ({current.digest.hex()[:12]})" and entry["role"] in ("teacher", "student")
    students = [n for n in nodes if n.backend.distilled]
    assert len(students) == 1  # the round completed: the student distilled the teacher's answers ...
    assert [a.task_id for a in students[0].backend.distilled[0]] == ["X/0", "X/1", "X/2"]  # ... on the bundle's X_u
    from knexa_cpm.state import load_state

    stats = load_state(tmp_path / "cpm")["stats"]
    assert stats["updates"] == 1 and stats["public_sets"][0]["version"] == 1


async def _run_one_expecting_refusal(tmp: Path, node: NodeService, cpm_state: Path) -> PublicSetMismatch:
    with pytest.raises(BaseException) as info:  # noqa: PT011  # trio wraps it in exception groups
        with trio.fail_after(60):
            await node.run()
    found = leaf_of(info.value, (PublicSetMismatch,))
    assert isinstance(found, PublicSetMismatch), info.value
    assert "\n" not in str(found)
    assert not (node.state_dir / "rounds.jsonl").exists()  # no round was started
    return found


async def test_stale_or_tampered_bundles_refuse_to_start_rounds(tmp_path: Path) -> None:
    cpm_state = tmp_path / "cpm"
    publish(cpm_state, tmp_path, 2, "v1")
    v1 = PublicSetStore(cpm_state).current()
    publish(cpm_state, tmp_path, 3, "v2")  # the CPM now announces v2
    roster = _roster(tmp_path, 3)
    async with trio.open_nursery() as nursery:
        svc = CpmService(CpmSection(federation="t", state_dir=cpm_state, roster=tuple(roster)))
        addrs = await nursery.start(partial(serve, svc.cfg, service=svc))
        # stale: this node's public_dir holds an intact copy of v1
        stale_dir = tmp_path / "stale-public"
        ann_v1 = PublicSetAnnounce("t", svc.identity.peer_bytes, v1.version, v1.digest, len(v1.data), 1024, 1.0)
        install(stale_dir, v1.data, ann_v1)
        err = await _run_one_expecting_refusal(tmp_path, _node(tmp_path, 0, addrs[0], roster, 1, stale_dir), cpm_state)
        assert f"holds public set v1 ({v1.digest.hex()[:12]})" in str(err) and "announces v2" in str(err)

        # tampered: the node fetched v2 itself, then someone edited a transfer prompt
        node = _node(tmp_path, 1, addrs[0], roster, 1)
        v2 = svc.public_set
        assert v2 is not None
        ann_v2 = PublicSetAnnounce("t", svc.identity.peer_bytes, v2.version, v2.digest, len(v2.data), 1024, 1.0)
        folder = bundle_dir(node.state_dir, ann_v2)
        install(folder, v2.data, ann_v2)
        text = (folder / "transfer.jsonl").read_text()
        (folder / "transfer.jsonl").write_text(text.replace("return x", "return 42", 1))
        err = await _run_one_expecting_refusal(tmp_path, node, cpm_state)
        assert "was modified after it was fetched" in str(err)

        # a version change while a node runs: its next round is refused
        node = _node(tmp_path, 2, addrs[0], roster, 0)
        await nursery.start(node.run)
        with trio.fail_after(30):
            while node.public_set is None:
                await trio.sleep(0.05)
        assert node.public_set.digest == v2.digest
        publish(cpm_state, tmp_path, 5, "v3")
        svc.reload(svc.cfg)  # what SIGHUP does
        assert node.host is not None
        with pytest.raises(PublicSetMismatch, match=r"this node runs v2 \(.*\), the CPM now announces v3"):
            await node._check_public_set(node.host)
        nursery.cancel_scope.cancel()
    from knexa_cpm.state import load_state

    history = load_state(cpm_state)["stats"]["public_sets"]
    assert [h["version"] for h in history] == [2, 3]


async def test_public_set_fetch_before_the_first_start(tmp_path: Path) -> None:
    """`knexa-node public-set fetch`: an organization gets the public set with its node identity
    (so `data prepare --public` can drop overlapping rows) before its daemon ever ran."""
    from knexa_node.public_set import fetch_for_config

    roster = _roster(tmp_path, 1)
    async with trio.open_nursery() as nursery:
        svc = CpmService(CpmSection(federation="t", state_dir=tmp_path / "cpm", roster=tuple(roster)))
        addrs = await nursery.start(partial(serve, svc.cfg, service=svc))
        cfg = NodeSection(federation="t", state_dir=tmp_path / "node-0", cpm=addrs[0], stream_timeout_s=10)
        with trio.fail_after(30):
            with pytest.raises(BaseException) as nothing:  # noqa: PT011  # trio wraps it in exception groups
                await fetch_for_config(cfg)
            assert "publishes no public set" in str(leaf_of(nothing.value, (PublicSetMismatch,)))
            publish(tmp_path / "cpm", tmp_path, 2, "v1")
            svc.reload(svc.cfg)
            ann, folder = await fetch_for_config(cfg)
            assert ann is not None and folder == bundle_dir(cfg.state_dir, ann)
            assert [p["task_id"] for p in read_jsonl(folder / "transfer.jsonl")] == ["X/0", "X/1", "X/2"]
            stranger = NodeSection(federation="t", state_dir=tmp_path / "stranger", cpm=addrs[0], stream_timeout_s=5,
                                   cpm_connect_timeout_s=5)
            with pytest.raises(BaseException) as info:  # noqa: PT011  # trio wraps it in exception groups
                await fetch_for_config(stranger)  # not on the roster: no public set for it
            from knexa_p2p.host import DialError
            from protocol import RemoteProtocolError

            assert leaf_of(info.value, (DialError, RemoteProtocolError)) is not None, info.value
        nursery.cancel_scope.cancel()


async def test_fetch_checks_size_digest_and_refusals(tmp_path: Path) -> None:
    import dataclasses

    from knexa_node.public_set import fetch, query
    from knexa_node.service import parse_peer
    from knexa_p2p.host import open_host
    from protocol import DecodeError, UnauthorizedError, bundle_digest

    publish(tmp_path / "cpm", tmp_path, 2, "v1")
    roster = _roster(tmp_path, 1)
    member = load_or_create_identity(tmp_path / "node-0" / "identity.key")
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(serve, CpmSection(federation="t", state_dir=tmp_path / "cpm", roster=tuple(roster)))
        cpm = parse_peer(addrs[0])
        with trio.fail_after(30):
            async with open_host(member) as host:
                await host.connect(addrs[0])
                ann = await query(host, cpm, member, "t", timeout=10)
                assert ann is not None and ann.cpm == cpm
                data = await fetch(host, cpm, member, ann, timeout=10)
                assert bundle_digest(data) == ann.digest and len(data) == ann.size
                with pytest.raises(DecodeError, match="larger than the announced"):
                    await fetch(host, cpm, member, dataclasses.replace(ann, size=ann.size - 1), timeout=10)
                with pytest.raises(UnauthorizedError, match="not the current public set"):
                    await fetch(host, cpm, member, dataclasses.replace(ann, digest=b"\0" * 32), timeout=10)
                with pytest.raises(UnauthorizedError, match="not a member"):
                    await query(host, cpm, member, "other-federation", timeout=10)
        nursery.cancel_scope.cancel()

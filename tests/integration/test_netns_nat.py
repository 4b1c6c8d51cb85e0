"""A member behind a real NAT (Linux network namespaces, nftables masquerade) takes part in rounds.

Topology, built by the test and torn down also on failure (processes killed by pid, namespaces
deleted); addresses exist only inside these namespaces:

    [pub] CPM + teacher node  198.51.100.2 --+
                                              br0 in [inet]
    [nat] wan0 198.51.100.3 ------------------+   masquerade out of wan0; new inbound on wan0 dropped
          lan0 192.168.77.1 --- [lan] student node 192.168.77.2 (default route via the NAT)

The student behind the NAT knows only the CPM's address. Nobody on the public side can dial it
(checked first with plain sockets), so every package it receives arrives over a connection it
opened itself: to the CPM, then to the teacher it discovered from the CPM's signed peer records
(connection reversal). The heuristic policy with a better teacher makes the NATed node the student
in every round, the direction a NAT breaks.

Two members each behind its own NAT (`test_two_nats_*`): the CPM and a public node on the public
segment, members `a` and `b` each behind a NAT of its own, both knowing only the CPM's address.
Each learns from the CPM's dial-back that it is private, holds a reservation at the CPM's relay
and publishes only its `/p2p-circuit` address. The teacher `a` dials the student `b` through the
relay; DCUtR then punches a direct connection where the NAT maps endpoint-independently (Linux
masquerade keeps the source port), and the package goes over it; with `masquerade fully-random`
the punch fails and the package goes over the relay. An outsider is refused by the relay.

    [pub]  CPM (relay) 198.51.100.2:4001, public node 198.51.100.2:4003
    [nat1] wan0 198.51.100.3 / lan0 192.168.77.1 --- [a] 192.168.77.2:4002
    [nat2] wan0 198.51.100.5 / lan0 192.168.78.1 --- [b] 192.168.78.2:4002
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUB_IP, NAT_WAN_IP, NAT_LAN_IP, LAN_IP = "198.51.100.2", "198.51.100.3", "192.168.77.1", "192.168.77.2"
ROUNDS = 3
NAT_KINDS = {"eim": "masquerade", "random": "masquerade random,fully-random"}
NFT_RULES = """
table ip knexa_nat {
    chain postrouting { type nat hook postrouting priority 100; oifname "wan0" MASQUERADE; }
    chain input { type filter hook input priority 0; policy accept; iifname "wan0" ct state new drop; }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept;
        iifname "lan0" oifname "wan0" accept;
    }
}
"""


def _nft(nss: Namespaces, role: str, masquerade: str) -> None:
    subprocess.run(["ip", "netns", "exec", nss.ns(role), "nft", "-f", "-"], input=NFT_RULES.replace("MASQUERADE", masquerade),
                   text=True, check=True, capture_output=True, timeout=30)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """Named network namespaces with a common prefix; `close` kills what runs in them and deletes them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names: list[str] = []

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def add(self, role: str) -> str:
        name = self.ns(role)
        _sh("ip", "netns", "add", name)
        self.names.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def run(self, role: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", self.ns(role), *cmd, check=check)

    def close(self) -> None:
        for name in self.names:
            pids = _sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        for name in self.names:
            _sh("ip", "netns", "del", name, check=False)


def _require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    if shutil.which("nft") is None:
        pytest.skip("nftables (`nft`) is not installed; scripts/bootstrap.sh installs it when run as root")
    probe = f"k14probe{os.getpid()}"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"this kernel/container cannot create network namespaces: {made.stderr.strip()}")
    _sh("ip", "netns", "del", probe, check=False)


@pytest.fixture
def topology():
    _require_netns()
    nss = Namespaces(f"k14n{os.getpid() % 100000}")
    try:
        inet, pub, nat, lan = (nss.add(r) for r in ("inet", "pub", "nat", "lan"))
        _sh("ip", "-n", inet, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", inet, "link", "set", "br0", "up")
        for ns, dev, peer, ip in ((pub, "eth0", "pubp", PUB_IP), (nat, "wan0", "natp", NAT_WAN_IP)):
            _sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", inet)
            _sh("ip", "-n", inet, "link", "set", peer, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", nat, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
        _sh("ip", "-n", nat, "addr", "add", f"{NAT_LAN_IP}/24", "dev", "lan0")
        _sh("ip", "-n", nat, "link", "set", "lan0", "up")
        _sh("ip", "-n", lan, "addr", "add", f"{LAN_IP}/24", "dev", "eth0")
        _sh("ip", "-n", lan, "link", "set", "eth0", "up")
        _sh("ip", "-n", lan, "route", "add", "default", "via", NAT_LAN_IP)
        nss.run("nat", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _nft(nss, "nat", NAT_KINDS["eim"])
        yield nss
    finally:
        nss.close()


_PROBE = """
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "listen":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen()
    print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.close()
try:
    socket.create_connection((host, port), timeout=2).close(); print("connected")
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def _can_connect(nss: Namespaces, src: str, dst_ns: str, dst_ip: str, port: int) -> bool:
    listener = subprocess.Popen(["ip", "netns", "exec", nss.ns(dst_ns), sys.executable, "-c", _PROBE, "listen",
                                 dst_ip, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        out = nss.run(src, sys.executable, "-c", _PROBE, "connect", dst_ip, str(port)).stdout
        return out.startswith("connected")
    finally:
        listener.kill()
        listener.wait()


def _spawn(nss: Namespaces, role: str, spec: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(["ip", "netns", "exec", nss.ns(role), sys.executable, __file__, "worker",
                                 json.dumps(spec)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_member_behind_nat_completes_every_round_as_student(topology: Namespaces, tmp_path: Path):
    nss = topology
    # the topology is what it claims: outbound through the NAT works, nothing gets in
    assert _can_connect(nss, "lan", "pub", PUB_IP, 5001)
    assert not _can_connect(nss, "pub", "lan", LAN_IP, 5002)
    assert not _can_connect(nss, "pub", "nat", NAT_WAN_IP, 5003)

    seeds = {"teacher": bytes([7]) * 32, "natted": bytes([9]) * 32}
    sys.path.insert(0, str(ROOT))
    from knexa_p2p.identity import Identity

    ids = {k: str(Identity.from_seed(v).peer_id) for k, v in seeds.items()}
    cpm_spec = {"role": "cpm", "dir": str(tmp_path / "cpm"), "listen": f"/ip4/{PUB_IP}/tcp/4001",
                "roster": list(ids.values()), "rounds": ROUNDS, "addr_file": str(tmp_path / "cpm.addr")}
    procs = [_spawn(nss, "pub", cpm_spec, tmp_path / "cpm.log")]
    deadline = time.time() + 60
    while not (tmp_path / "cpm.addr").exists():
        assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "cpm.log").read_text()[-3000:]
        time.sleep(0.2)
    cpm_addr = (tmp_path / "cpm.addr").read_text()
    for name, ns, ip, pass1 in (("teacher", "pub", PUB_IP, 0.5), ("natted", "lan", LAN_IP, 0.0)):
        spec = {"role": "node", "dir": str(tmp_path / name), "seed": seeds[name].hex(), "cpm": cpm_addr,
                "listen": f"/ip4/{ip}/tcp/4002", "rounds": ROUNDS, "pass_at_1": pass1}
        procs.append(_spawn(nss, ns, spec, tmp_path / f"{name}.log"))
    try:
        for p, name in zip(procs[1:], ("teacher", "natted"), strict=True):
            try:
                assert p.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"{name} did not finish: " + (tmp_path / f"{name}.log").read_text()[-3000:]) from exc
    finally:
        for p in procs:
            p.kill()
            p.wait()

    logs = {n: [json.loads(x) for x in (tmp_path / n / "rounds.jsonl").read_text().splitlines()]
            for n in ("teacher", "natted")}
    assert [e["round"] for e in logs["natted"]] == list(range(ROUNDS))
    for e in logs["natted"]:
        assert e["role"] == "student" and "error" not in e and e.get("reward_ack") == "ok", e
    assert all(e["role"] == "teacher" and "error" not in e for e in logs["teacher"])


# ---- two members, each behind its own NAT ------------------------------------------------------
PUB_NODE_PORT = 4003
NATS = {"a": ("nat1", "198.51.100.3", "192.168.77.1", "192.168.77.2"),
        "b": ("nat2", "198.51.100.5", "192.168.78.1", "192.168.78.2")}


@pytest.fixture(params=sorted(NAT_KINDS))
def two_nats(request):
    _require_netns()
    nss = Namespaces(f"k14t{os.getpid() % 100000}")
    try:
        inet, pub = nss.add("inet"), nss.add("pub")
        _sh("ip", "-n", inet, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", inet, "link", "set", "br0", "up")
        wans = [(pub, "eth0", "pubp", PUB_IP)]
        for host, (nat, wan_ip, _lan_gw, _lan_ip) in NATS.items():
            nss.add(nat)
            nss.add(host)
            wans.append((nss.ns(nat), "wan0", f"{nat}p", wan_ip))
        for ns, dev, peer, ip in wans:
            _sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", inet)
            _sh("ip", "-n", inet, "link", "set", peer, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        for host, (nat, _wan_ip, lan_gw, lan_ip) in NATS.items():
            _sh("ip", "-n", nss.ns(nat), "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns",
                nss.ns(host))
            _sh("ip", "-n", nss.ns(nat), "addr", "add", f"{lan_gw}/24", "dev", "lan0")
            _sh("ip", "-n", nss.ns(nat), "link", "set", "lan0", "up")
            _sh("ip", "-n", nss.ns(host), "addr", "add", f"{lan_ip}/24", "dev", "eth0")
            _sh("ip", "-n", nss.ns(host), "link", "set", "eth0", "up")
            _sh("ip", "-n", nss.ns(host), "route", "add", "default", "via", lan_gw)
            nss.run(nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            _nft(nss, nat, NAT_KINDS[request.param])
        yield nss, request.param
    finally:
        nss.close()


def _wait_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    return path.read_text()


@pytest.mark.slow
def test_two_nats_round_goes_hole_punched_or_relayed(two_nats: tuple[Namespaces, str], tmp_path: Path):
    nss, kind = two_nats
    # the topology is what it claims: out through each NAT works, nothing gets in, not even NAT to NAT
    assert _can_connect(nss, "a", "pub", PUB_IP, 5001)
    assert not _can_connect(nss, "pub", "a", NATS["a"][3], 5002)
    assert not _can_connect(nss, "b", "nat1", NATS["a"][1], 5003)
    assert not _can_connect(nss, "a", "nat2", NATS["b"][1], 5004)

    seeds = {"pubnode": bytes([5]) * 32, "a": bytes([6]) * 32, "b": bytes([8]) * 32}
    outsider_seed = bytes([3]) * 32
    sys.path.insert(0, str(ROOT))
    from knexa_p2p.identity import Identity

    ids = {k: str(Identity.from_seed(v).peer_id) for k, v in seeds.items()}
    cpm_spec = {"role": "cpm", "dir": str(tmp_path / "cpm"), "listen": f"/ip4/{PUB_IP}/tcp/4001",
                "roster": list(ids.values()), "rounds": ROUNDS, "addr_file": str(tmp_path / "cpm.addr"),
                "status_file": str(tmp_path / "cpm.status.json")}
    procs = [_spawn(nss, "pub", cpm_spec, tmp_path / "cpm.log")]
    try:
        cpm_addr = _wait_file(tmp_path / "cpm.addr", procs[0], tmp_path / "cpm.log")
        # heuristic pairing: the most different data histograms pair first (a and b are disjoint,
        # the public node is uniform, so it sits out); the higher Pass@1 teaches: a teaches b
        nodes = {"pubnode": ("pub", f"/ip4/{PUB_IP}/tcp/{PUB_NODE_PORT}", 0.25, [1.0] * 12),
                 "a": ("a", f"/ip4/{NATS['a'][3]}/tcp/4002", 0.5, [1.0] + [0.0] * 11),
                 "b": ("b", f"/ip4/{NATS['b'][3]}/tcp/4002", 0.0, [0.0] * 11 + [1.0])}
        # the public node is also an operator-run relay (relay_service; its roster names the members)
        pub_relay = f"/ip4/{PUB_IP}/tcp/{PUB_NODE_PORT}/p2p/{ids['pubnode']}"
        for name, (ns, listen, pass1, hist) in nodes.items():
            spec = {"role": "node", "dir": str(tmp_path / name), "seed": seeds[name].hex(), "cpm": cpm_addr,
                    "listen": listen, "rounds": ROUNDS, "pass_at_1": pass1, "hist": hist,
                    "status_file": str(tmp_path / f"{name}.status.json")}
            if name == "pubnode":
                spec.update(relay_service=True, roster=list(ids.values()))
            else:
                spec["relays"] = [pub_relay]
            procs.append(_spawn(nss, ns, spec, tmp_path / f"{name}.log"))
            if name == "pubnode":
                _wait_file(tmp_path / "pubnode.status.json", procs[-1], tmp_path / "pubnode.log")
        # an outsider behind NAT 2 tries the relay: refused
        out_spec = {"role": "outsider", "seed": outsider_seed.hex(), "cpm": cpm_addr,
                    "result_file": str(tmp_path / "outsider.json")}
        outsider = _spawn(nss, "b", out_spec, tmp_path / "outsider.log")
        assert outsider.wait(timeout=60) == 0, (tmp_path / "outsider.log").read_text()[-3000:]
        for p, name in zip(procs[1:], nodes, strict=True):
            try:
                assert p.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"{name} did not finish: " + (tmp_path / f"{name}.log").read_text()[-3000:]) \
                    from exc
        time.sleep(1.5)  # one more CPM status snapshot
    finally:
        for p in procs:
            p.kill()
            p.wait()

    logs = {n: [json.loads(x) for x in (tmp_path / n / "rounds.jsonl").read_text().splitlines()] for n in nodes}
    status = {n: json.loads((tmp_path / f"{n}.status.json").read_text()) for n in (*nodes, "cpm")}
    for n in nodes:
        assert [e["round"] for e in logs[n]] == list(range(ROUNDS)), logs[n]
    assert status["a"]["reachability"] == status["b"]["reachability"] == "private"
    assert status["pubnode"]["reachability"] == "public"
    # b holds reservations at both relays and publishes only their circuit addresses
    assert len(status["b"]["relay_addrs"]) == 2 and all(x.endswith("/p2p-circuit") for x in status["b"]["relay_addrs"])
    assert {x.split("/p2p/")[1].split("/")[0] for x in status["b"]["relay_addrs"]} == {
        cpm_addr.rsplit("/", 1)[-1], ids["pubnode"]}
    expected = "hole_punched" if kind == "eim" else "relayed"
    for e in logs["a"]:
        assert e["role"] == "teacher" and "error" not in e and e["path"] == expected, e
    for e in logs["b"]:
        assert e["role"] == "student" and e.get("reward_ack") == "ok" and e["path"] == expected, e
    assert all(e["role"] == "idle" for e in logs["pubnode"])
    relays = [status["cpm"]["relay"], status["pubnode"]["relay"]]
    assert all(r["reservations"] >= 2 for r in relays)  # a and b at each relay
    assert sum(r.get("circuits", 0) for r in relays) >= 1
    assert status["a"]["connections"]["opened"]["relayed"] >= 1
    if kind == "eim":
        assert status["a"]["connections"]["opened"]["hole_punched"] >= 1
    else:
        assert status["a"]["connections"]["opened"]["hole_punched"] == 0
        assert sum(r["bytes_relayed"] for r in relays) > sum(e["package_bytes"] for e in logs["a"])
    refused = json.loads((tmp_path / "outsider.json").read_text())
    assert refused["reserved"] is False and refused["error"], refused
    assert status["cpm"]["rejected"].get("not_member", 0) >= 1


# ---- worker: one daemon inside a namespace ----------------------------------------------------
def _worker(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT))
    import trio

    from knexa_runtime.logs import setup_logging

    setup_logging("INFO")
    if spec["role"] == "outsider":
        _outsider(spec)
        return
    if spec["role"] == "cpm":
        from knexa_cpm.config import CpmSection
        from knexa_cpm.service import serve

        cfg = CpmSection(federation="nat", state_dir=Path(spec["dir"]), roster=tuple(spec["roster"]),
                         listen=(spec["listen"],), policy="heuristic", round_timeout_s=120.0)

        from knexa_cpm.service import CpmService

        svc = CpmService(cfg)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                addrs = await nursery.start(functools.partial(serve, cfg, service=svc))
                Path(spec["addr_file"]).write_text(addrs[0])
                if spec.get("status_file"):
                    nursery.start_soon(_dump_status, svc.status, spec["status_file"])

        trio.run(main)
        return

    from knexa_node.config import NodeSection
    from knexa_node.service import NodeService
    from knexa_p2p.identity import Identity, load_or_create_kem_key
    from tests.support.fake_backend import FakeBackend

    class Backend(FakeBackend):
        def evaluate(self, round_idx: int) -> Any:  # the heuristic policy's teacher: higher Pass@1
            return dataclasses.replace(super().evaluate(round_idx), pass_at_1=spec["pass_at_1"])

        def category_histogram(self) -> Any:  # the heuristic pairs the most different histograms
            import numpy as np

            return np.array(spec["hist"]) if "hist" in spec else super().category_histogram()

    d = Path(spec["dir"])
    cfg = NodeSection(federation="nat", state_dir=d, cpm=spec["cpm"], listen=(spec["listen"],), rounds=spec["rounds"],
                      relays=tuple(spec.get("relays", ())), relay_service=spec.get("relay_service", False),
                      roster=tuple(spec.get("roster", ())),
                      directive_timeout_s=90, directive_poll_s=2.0, package_timeout_s=60, stream_timeout_s=10,
                      cpm_connect_timeout_s=60, final_eval=False, profile_epsilon=0.0)
    node = NodeService(cfg, Backend(d.name, seed=len(spec["seed"])), Identity.from_seed(bytes.fromhex(spec["seed"])),
                       load_or_create_kem_key(d / "kem.key"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if spec.get("status_file"):
                nursery.start_soon(_dump_status, node.status, spec["status_file"])
            await node.run()
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _dump_status(status: Any, path: str) -> None:
    """Snapshot a daemon's status every half second (the last one survives its exit)."""
    import trio

    from knexa_runtime.atomic import atomic_write_json

    while True:
        snap = status()
        if snap.get("connections") is not None or snap.get("daemon") == "knexa-cpm":
            atomic_write_json(Path(path), snap)
        await trio.sleep(0.5)


def _outsider(spec: dict[str, Any]) -> None:
    """A peer that is not on the roster tries to reserve a slot at the CPM's relay."""
    import trio

    from knexa_p2p.host import open_host
    from knexa_p2p.identity import Identity
    from knexa_runtime.atomic import atomic_write_json

    result: dict[str, Any] = {"reserved": False, "error": ""}

    async def main() -> None:
        async with open_host(Identity.from_seed(bytes.fromhex(spec["seed"])), ("/ip4/0.0.0.0/tcp/0",),
                             relay_client=True) as host:
            try:
                relay = await host.connect(spec["cpm"], timeout=10)
                with trio.fail_after(10):
                    await host.relay_client.reserve(spec["cpm"], relay)
                result["reserved"] = True
            except Exception as exc:  # refused at the gate (connection closed) or by the relay
                result["error"] = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__

    trio.run(main)
    atomic_write_json(Path(spec["result_file"]), result)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(json.loads(sys.argv[2]))

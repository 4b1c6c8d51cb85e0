"""A federation of 64 members on loopback versus 8, in one run: every daemon its own process.

Each member is a real `NodeService` (real libp2p: Noise, Yamux, GossipSub, the membership gate,
discovery through the CPM) around the fake model backend from the tests, so what is measured is
the federation's plumbing, not the model. Nodes are configured with only the CPM's address; the
CPM's roster lists them all (quorum = everyone).

Printed for 8 and 64 members, and as ratios 64 / 8:
- round period: seconds between consecutive round closes at the CPM (rounds after the first;
  the fake backend trains in ~0 s, so this is the protocol's own latency per round);
- directive delivery: from the CPM signing a directive (its `issued_at`) to each member accepting
  it, median and the slowest member per round (the target: all members within 1 s), and the
  share that arrived over GossipSub rather than by polling the CPM;
- CPU seconds per round per daemon (process CPU between the first and the last directive, over
  the rounds in between) and peak RSS per daemon, for the CPM and the median node;
- the CPM's own work per round: wall time of closing a round (policy over all ordered pairs,
  state persisted, directive signed; target under 100 ms), and its process CPU per round;
- messages per round: application streams opened by all daemons plus GossipSub directive
  deliveries, divided by the rounds (libp2p's own control traffic is not counted).

Run: `python -m benchmarks federation_scale` (sizes 8 and 64, 4 rounds) or
`python -m benchmarks.bench_federation_scale --sizes 8,64 --rounds 4`. 64 daemons on 2 cores
take a few minutes to start (each imports libp2p).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._util import save

ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "scale"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- workers (one process per daemon) ---------------------------------------------------------
def _count_streams(counter: dict[str, int]) -> None:
    from knexa_p2p.host import P2PHost

    original = P2PHost.open_stream

    async def counted(self: P2PHost, peer: bytes, protocol: str, *, timeout: float = 10.0) -> Any:
        counter["streams"] += 1
        return await original(self, peer, protocol, timeout=timeout)

    P2PHost.open_stream = counted  # type: ignore[method-assign]


def _worker_cpm(spec: dict[str, Any]) -> None:
    import trio

    from knexa_cpm.config import CpmSection
    from knexa_cpm.service import CpmService, serve

    counter = {"streams": 0}
    _count_streams(counter)
    cfg = CpmSection(federation=FEDERATION, state_dir=Path(spec["dir"]), roster=tuple(spec["roster"]),
                     round_timeout_s=600.0, listen=("/ip4/127.0.0.1/tcp/0",))
    svc = CpmService(cfg)
    closes: list[dict[str, float]] = []
    machine_close = svc.machine.close_round

    def timed_close(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = machine_close(*args, **kwargs)
        closes.append({"close_s": time.perf_counter() - t0})
        return out

    svc.machine.close_round = timed_close  # type: ignore[method-assign]
    original_publish = svc._publish

    async def timed_publish(host: Any, directive: Any) -> None:
        t0 = time.perf_counter()
        await original_publish(host, directive)
        closes[-1].update(publish_s=time.perf_counter() - t0, cpu=_cpu(), round=directive.round,
                          issued_at=directive.issued_at)

    svc._publish = timed_publish  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(lambda task_status: serve(cfg, service=svc, task_status=task_status))
            Path(spec["addr_file"]).write_text(addrs[0])
            # run until every round's rewards are in (or the coordinator stops us)
            while not (svc.stats["rounds_closed"] >= spec["rounds"] and not svc.machine.pending):
                await trio.sleep(0.1)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    Path(spec["out"]).write_text(json.dumps({"closes": closes, "streams": counter["streams"], "rss_mb": _rss_mb(),
                                             "cpu": _cpu(), "updates": svc.stats["updates"]}))


def _worker_node(spec: dict[str, Any]) -> None:
    import trio

    sys.path.insert(0, str(ROOT))
    from knexa_node.config import NodeSection
    from knexa_node.service import NodeService
    from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
    from tests.support.fake_backend import FakeBackend

    counter = {"streams": 0}
    _count_streams(counter)
    d = Path(spec["dir"])
    cfg = NodeSection(federation=FEDERATION, state_dir=d, cpm=spec["cpm"], rounds=spec["rounds"],
                      directive_timeout_s=600, directive_poll_s=5.0, package_timeout_s=600,
                      stream_timeout_s=60, cpm_connect_timeout_s=600, final_eval=False, log_level="WARNING")
    node = NodeService(cfg, FakeBackend(f"fake-{spec['index']}", seed=spec["index"]),
                       load_or_create_identity(d / "identity.key"), load_or_create_kem_key(d / "kem.key"))
    accepted: list[dict[str, Any]] = []
    original = node._accept_directive

    def timed_accept(signed: Any, source: str) -> Any:
        directive = original(signed, source)
        if directive is not None:
            accepted.append({"round": directive.round, "source": source, "at": time.time(),
                             "issued_at": directive.issued_at, "cpu": _cpu()})
        return directive

    node._accept_directive = timed_accept  # type: ignore[method-assign]
    trio.run(node.run)
    Path(spec["out"]).write_text(json.dumps({"accepted": accepted, "streams": counter["streams"],
                                             "rss_mb": _rss_mb(), "cpu": _cpu()}))


# ---- coordinator ------------------------------------------------------------------------------
def _spawn(role: str, spec: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "benchmarks.bench_federation_scale", "--worker", role,
                                 json.dumps(spec)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_federation(n: int, rounds: int, timeout_s: float = 1500.0) -> dict[str, Any]:
    from knexa_p2p.identity import load_or_create_identity

    with tempfile.TemporaryDirectory(prefix=f"knexa-scale-{n}-") as tmp:
        base = Path(tmp)
        ids = [str(load_or_create_identity(base / f"n{i}" / "identity.key").peer_id) for i in range(n)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cpm_spec = {"dir": str(base / "cpm"), "roster": ids, "rounds": rounds,
                        "addr_file": str(base / "cpm.addr"), "out": str(base / "cpm.json")}
            procs.append(_spawn("cpm", cpm_spec, base / "cpm.log"))
            deadline = time.time() + 120
            while not (base / "cpm.addr").exists():
                if time.time() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(f"the CPM did not start: {(base / 'cpm.log').read_text()[-2000:]}")
                time.sleep(0.2)
            cpm_addr = (base / "cpm.addr").read_text()
            t_start = time.time()
            for i in range(n):
                spec = {"dir": str(base / f"n{i}"), "cpm": cpm_addr, "rounds": rounds, "index": i,
                        "out": str(base / f"n{i}.json")}
                procs.append(_spawn("node", spec, base / f"n{i}.log"))
            deadline = time.time() + timeout_s
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
            wall = time.time() - t_start
            failed = [i for i, p in enumerate(procs) if p.returncode != 0]
            if failed:
                name = "cpm" if failed[0] == 0 else f"n{failed[0] - 1}"
                raise RuntimeError(f"{len(failed)} daemon(s) failed; {name}.log ends: "
                                   f"{(base / f'{name}.log').read_text()[-2000:]}")
            cpm = json.loads((base / "cpm.json").read_text())
            nodes = [json.loads((base / f"n{i}.json").read_text()) for i in range(n)]
        finally:
            _stop(procs)
    return _summarise(n, rounds, cpm, nodes, wall)


def _summarise(n: int, rounds: int, cpm: dict[str, Any], nodes: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    closes = sorted(cpm["closes"], key=lambda c: c["round"])
    issued = [c["issued_at"] for c in closes]
    period = [b - a for a, b in zip(issued[1:], issued[2:], strict=False)] or [b - a for a, b in zip(issued, issued[1:], strict=False)]
    delays: dict[int, list[float]] = {}
    sources = {"pubsub": 0, "poll": 0}
    for node in nodes:
        for a in node["accepted"]:
            delays.setdefault(a["round"], []).append(a["at"] - a["issued_at"])
            sources[a["source"]] = sources.get(a["source"], 0) + 1
    steady = [r for r in sorted(delays) if r >= 1] or sorted(delays)
    slowest = [max(delays[r]) for r in steady]

    def per_round_cpu(points: list[dict[str, Any]]) -> float:
        pts = sorted(points, key=lambda p: p["round"])
        if len(pts) < 2:
            return float("nan")
        return (pts[-1]["cpu"] - pts[0]["cpu"]) / (pts[-1]["round"] - pts[0]["round"])

    node_cpu = [per_round_cpu(x["accepted"]) for x in nodes]
    streams = cpm["streams"] + sum(x["streams"] for x in nodes)
    return {
        "members": n, "rounds": rounds, "wall_s": round(wall, 1), "rewards": cpm["updates"],
        "round_period_s": statistics.mean(period),
        "directive_median_s": statistics.median(d for r in steady for d in delays[r]),
        "directive_slowest_s": max(slowest),
        "directive_all_reached": all(len(delays.get(r, [])) == n for r in range(rounds)),
        "pubsub_share": sources["pubsub"] / max(1, sum(sources.values())),
        "cpm_close_ms": 1000 * statistics.mean(c["close_s"] for c in closes),
        "cpm_close_publish_ms": 1000 * statistics.mean(c["close_s"] + c["publish_s"] for c in closes),
        "cpm_cpu_per_round_s": per_round_cpu(closes),
        "cpm_rss_mb": cpm["rss_mb"],
        "node_cpu_per_round_s": statistics.median(node_cpu),
        "node_rss_mb": statistics.median(x["rss_mb"] for x in nodes),
        "messages_per_round": (streams + sources["pubsub"]) / rounds,
    }


ROWS = [
    ("round period (s)", "round_period_s", "{:.2f}"),
    ("directive delivery, median (s)", "directive_median_s", "{:.3f}"),
    ("directive delivery, slowest member (s)", "directive_slowest_s", "{:.3f}"),
    ("share delivered by GossipSub", "pubsub_share", "{:.2f}"),
    ("CPM close_round (ms)", "cpm_close_ms", "{:.1f}"),
    ("CPM close + sign + publish (ms)", "cpm_close_publish_ms", "{:.1f}"),
    ("CPM CPU per round (s)", "cpm_cpu_per_round_s", "{:.3f}"),
    ("CPM peak RSS (MB)", "cpm_rss_mb", "{:.0f}"),
    ("node CPU per round, median (s)", "node_cpu_per_round_s", "{:.3f}"),
    ("node peak RSS, median (MB)", "node_rss_mb", "{:.0f}"),
    ("messages per round", "messages_per_round", "{:.0f}"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64", help="comma-separated member counts; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worker", nargs=2, metavar=("ROLE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.worker:
        role, spec = args.worker
        (_worker_cpm if role == "cpm" else _worker_node)(json.loads(spec))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for n in sizes:
        print(f"running {n} members x {args.rounds} rounds ...", flush=True)
        results.append(run_federation(n, args.rounds))
    base = results[0]
    ratio_names = ["x{}/{}".format(r["members"], base["members"]) for r in results[1:]]
    header = f"{'':42}" + "".join(f"{r['members']:>10}" for r in results) + "".join(f"{h:>10}" for h in ratio_names)
    print(header)
    for label, key, fmt in ROWS:
        cells = "".join(f"{fmt.format(r[key]):>10}" for r in results)
        ratios = "".join(f"{(r[key] / base[key] if base[key] else float('nan')):>10.2f}" for r in results[1:])
        print(f"{label:42}{cells}{ratios}")
    big = results[-1]
    print(f"targets at {big['members']}: directives reach all members in < 1 s: "
          f"{'yes' if big['directive_all_reached'] and big['directive_slowest_s'] < 1.0 else 'no'} "
          f"(slowest {big['directive_slowest_s']:.3f} s); CPM work per round < 100 ms: "
          f"{'yes' if big['cpm_close_publish_ms'] < 100 else 'no'} ({big['cpm_close_publish_ms']:.1f} ms)")
    path = save("federation_scale", {"results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

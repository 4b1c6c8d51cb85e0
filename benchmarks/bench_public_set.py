"""Public-set fetch from a real CPM (signed query, 256 KiB chunks, digest check) versus sending
the same bytes as one libp2p frame between two hosts, measured in the same run.

Also: how long a node takes to recompute the digest from its files at start (check_local).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from benchmarks._util import best_of, save

SIZES = [200, 2000]  # problems in the test set; X_u has a quarter as many
REPEAT = 3


def _problems(prefix: str, n: int) -> list[dict[str, str]]:
    body = "    # " + "x" * 1500 + "\n    return x\n"
    return [{"task_id": f"{prefix}/{i}", "prompt": f'def {prefix}{i}(x):\n    """Problem {i}."""\n',
             "canonical_solution": body, "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": f"{prefix}{i}"}
            for i in range(n)]


async def _fetch(tmp: Path, n: int) -> tuple[float, int]:
    from knexa_cpm.config import CpmSection
    from knexa_cpm.public_sets import PublicSetStore
    from knexa_cpm.service import serve
    from knexa_node.public_set import fetch, query
    from knexa_node.service import parse_peer
    from knexa_p2p.host import open_host
    from knexa_p2p.identity import load_or_create_identity

    for kind, rows in (("test", _problems("T", n)), ("transfer", _problems("X", n // 4))):
        (tmp / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    PublicSetStore(tmp / "cpm").add(tmp / "test.jsonl", tmp / "transfer.jsonl")
    member = load_or_create_identity(tmp / "node" / "identity.key")
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(serve, CpmSection(federation="b", state_dir=tmp / "cpm",
                                                      roster=(str(member.peer_id),)))
        cpm = parse_peer(addrs[0])
        async with open_host(member) as host:
            await host.connect(addrs[0])
            best, size = float("inf"), 0
            for _ in range(REPEAT):
                t0 = time.perf_counter()
                ann = await query(host, cpm, member, "b", timeout=60)
                assert ann is not None
                data = await fetch(host, cpm, member, ann, timeout=60)
                best, size = min(best, time.perf_counter() - t0), len(data)
        nursery.cancel_scope.cancel()
    return best, size


async def _one_frame(size: int) -> float:
    from knexa_p2p.host import open_host
    from knexa_p2p.identity import Identity

    payload = os.urandom(size)
    async with open_host(Identity.from_seed(os.urandom(32))) as a, open_host(Identity.from_seed(os.urandom(32))) as b:

        async def sink(stream) -> None:
            await stream.receive(max_size=size + 16, timeout=60)
            await stream.send(b"k")

        a.set_handler("/bench/1", sink)
        await b.connect(a.addrs()[0])
        best = float("inf")
        for _ in range(REPEAT):
            s = await b.open_stream(a.peer_id, "/bench/1")
            t0 = time.perf_counter()
            await s.send(payload)
            await s.receive(max_size=16, timeout=60)
            best = min(best, time.perf_counter() - t0)
            await s.close()
    return best


def main() -> dict:
    from knexa_node.public_set import check_local, install
    from protocol import PublicSetAnnounce, bundle_digest

    rows = []
    for n in SIZES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            fetch_s, size = trio.run(_fetch, tmp, n)
            frame_s = trio.run(_one_frame, size)
            data = (tmp / "cpm" / "public-sets" / "v0001.bundle").read_bytes()
            ann = PublicSetAnnounce("b", b"\x00\x24\x08\x01\x12\x20" + b"\1" * 32, 1, bundle_digest(data), len(data),
                                    256 * 1024, 1.0)
            install(tmp / "copy", data, ann)
            check_s = best_of(partial(check_local, tmp / "copy", ann), REPEAT)
        rows.append({"problems": n + n // 4, "bytes": size, "fetch_s": fetch_s, "one_frame_s": frame_s,
                     "ratio": fetch_s / frame_s, "check_local_s": check_s})
        print(f"public set {n + n // 4:5d} problems {size / 1e6:6.2f} MB: fetch (query+chunks+digest) "
              f"{fetch_s * 1e3:8.1f} ms, one libp2p frame {frame_s * 1e3:8.1f} ms, ratio {fetch_s / frame_s:5.2f}x; "
              f"start-up digest check {check_s * 1e3:6.1f} ms")
    result = {"public_set": rows}
    print(f"saved {save('public_set', result)}")
    return result


if __name__ == "__main__":
    main()

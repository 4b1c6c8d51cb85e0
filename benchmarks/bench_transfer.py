"""Package transfer over libp2p (Noise + Yamux, framed) versus a raw TCP socket, same bytes.

Also: sign + encrypt + decrypt + verify throughput for a 1 MiB package versus a plain copy.
"""

from __future__ import annotations

import os
import time

import trio

from benchmarks._util import save

SIZES = [64 * 1024, 1 << 20, 4 << 20]
REPEAT = 5


async def _raw_tcp(payload: bytes) -> float:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        n = int.from_bytes(await stream.receive_some(4), "big")
        got = 0
        while got < n:
            got += len(await stream.receive_some(1 << 16))
        await stream.send_all(b"k")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        best = float("inf")
        for _ in range(REPEAT):
            done = trio.Event()
            client = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = time.perf_counter()
            await client.send_all(len(payload).to_bytes(4, "big") + payload)
            await client.receive_some(1)
            best = min(best, time.perf_counter() - t0)
            await client.aclose()
        nursery.cancel_scope.cancel()
    return best


async def _libp2p(payload: bytes) -> float:
    from knexa_p2p.host import open_host
    from knexa_p2p.identity import Identity

    async with open_host(Identity.from_seed(os.urandom(32))) as a, open_host(Identity.from_seed(os.urandom(32))) as b:

        async def sink(stream) -> None:
            await stream.receive(max_size=len(payload) + 16, timeout=60)
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


def _crypto(payload_items: int = 400) -> dict[str, float]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    import protocol as P

    key = Ed25519PrivateKey.generate()
    me = P.peer_id_from_public_key(key.public_key())
    kem = X25519PrivateKey.generate()
    pub = kem.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = "x" * ((1 << 20) // payload_items)
    body = P.PackageBody(tuple(P.PackageItem(f"t/{i}", text) for i in range(payload_items)), 0)
    size = len(P.encode(body))

    def full() -> None:
        sealed = P.seal_package(body, federation="f", round=1, directive_id=b"d" * 16, sender=me, recipient=me,
                                recipient_kem_public=pub)
        wire = P.encode(P.sign(sealed, key))
        got = P.open_signed(P.decode(wire, P.Signed), P.SealedPackage, authenticated=me)
        P.open_package(got, kem)

    def baseline() -> None:
        P.decode(P.encode(body), P.PackageBody)

    from benchmarks._util import best_of

    t_full, t_base = best_of(full, 5), best_of(baseline, 5)
    return {"package_bytes": size, "seal_sign_verify_open_s": t_full, "encode_decode_only_s": t_base,
            "crypto_MBps": size / t_full / 1e6, "overhead_ratio": t_full / t_base}


def main() -> dict:
    rows = []
    for size in SIZES:
        payload = os.urandom(size)
        raw = trio.run(_raw_tcp, payload)
        p2p = trio.run(_libp2p, payload)
        rows.append({"bytes": size, "raw_tcp_s": raw, "libp2p_s": p2p, "slowdown": p2p / raw,
                     "libp2p_MBps": size / p2p / 1e6, "raw_MBps": size / raw / 1e6})
        print(f"transfer {size / 1024:>7.0f} KiB: raw TCP {raw * 1e3:8.2f} ms ({size / raw / 1e6:7.1f} MB/s)  "
              f"libp2p {p2p * 1e3:8.2f} ms ({size / p2p / 1e6:6.1f} MB/s)  ratio libp2p/raw = {p2p / raw:6.1f}x")
    crypto = _crypto()
    print(f"1 MiB package: seal+sign+verify+open {crypto['seal_sign_verify_open_s'] * 1e3:.2f} ms "
          f"({crypto['crypto_MBps']:.0f} MB/s); encode+decode alone {crypto['encode_decode_only_s'] * 1e3:.2f} ms; "
          f"ratio {crypto['overhead_ratio']:.1f}x")
    result = {"transfer": rows, "crypto": crypto}
    print(f"saved {save('transfer', result)}")
    return result


if __name__ == "__main__":
    main()

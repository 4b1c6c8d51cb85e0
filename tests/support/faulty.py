"""A fault-injecting stand-in for `knexa_p2p.host.open_host`, for in-process federation tests.

`faulty_open_host(faults, log)` has open_host's signature and yields a `FaultyHost`: the real
libp2p host with every stream and pubsub subscription wrapped so that, drawn from a seeded RNG
per host, sends and receives are delayed, frames are lost (the stream is reset instead, which is
what a peer sees when the network drops a connection mid-message), stream opens are refused,
and pubsub messages vanish on publish or on delivery. A test patches it over the `open_host`
name a service module imported, e.g.::

    monkeypatch.setattr(knexa_node.service, "open_host", faulty_open_host(Faults(seed=1), log))

`Faults.lose_reply_to` targets one exchange exactly: the request goes through and is served,
then the reply is thrown away and the requester sees a broken stream.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from knexa_p2p.host import GossipSettings, MemberGate, P2PHost, open_host
from knexa_p2p.identity import Identity
from knexa_p2p.streams import FramedStream, StreamBroken

__all__ = ["FaultLog", "Faults", "FaultyHost", "FaultyStream", "faulty_open_host"]


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often. Probabilities are per event; delays uniform in [0, max]."""

    seed: int = 0
    #: every frame send and receive first waits up to this long
    max_delay_s: float = 0.0
    #: a frame send is lost: the stream is reset instead and the sender gets StreamBroken
    drop_frame: float = 0.0
    #: opening a stream fails outright
    refuse_open: float = 0.0
    #: a pubsub message is lost, independently on publish and on delivery
    drop_pubsub: float = 0.0
    #: requests (raw payloads) whose reply is lost after the peer has served them
    lose_reply_to: Callable[[bytes], bool] | None = None


class FaultLog(Counter):
    """How many faults of each kind were injected (keys: delay, drop_frame, refuse_open,
    drop_published, drop_delivered, lose_reply), so a test can show they happened."""


class _Dice:
    """One seeded RNG per host and kind of fault: the n-th publish of a host is lost or not
    whatever the streams did before it, so a seed fixes each kind's pattern of faults."""

    def __init__(self, faults: Faults, host_seed: str, log: FaultLog) -> None:
        self.faults, self.log = faults, log
        self._seed = f"{faults.seed}/{host_seed}"
        self._rngs: dict[str, random.Random] = {}

    def _rng(self, kind: str) -> random.Random:
        if kind not in self._rngs:
            self._rngs[kind] = random.Random(f"{self._seed}/{kind}")
        return self._rngs[kind]

    def roll(self, p: float, kind: str) -> bool:
        hit = p > 0 and self._rng(kind).random() < p
        if hit:
            self.log[kind] += 1
        return hit

    async def delay(self) -> None:
        if self.faults.max_delay_s > 0:
            self.log["delay"] += 1
            await trio.sleep(self._rng("delay").uniform(0.0, self.faults.max_delay_s))


class FaultyStream:
    """A `FramedStream` whose frames may be late or lost."""

    def __init__(self, inner: FramedStream, dice: _Dice) -> None:
        self._inner = inner
        self._dice = dice
        self._lose_next_reply = False
        self.remote_peer = inner.remote_peer

    def __getattr__(self, name: str) -> Any:
        # the rest of FramedStream (e.g. `raw`, which P2PHost.stream_kind reads) passes through
        return getattr(self._inner, name)

    async def send(self, payload: bytes, *, max_size: int | None = None) -> None:
        await self._dice.delay()
        if self._dice.roll(self._dice.faults.drop_frame, "drop_frame"):
            await self._inner.reset()
            raise StreamBroken("fault injected: frame lost, stream reset")
        await self._inner.send(payload, max_size=max_size)
        lose = self._dice.faults.lose_reply_to
        self._lose_next_reply = bool(lose and lose(payload))

    async def receive(self, *, max_size: int, timeout: float) -> bytes:
        await self._dice.delay()
        frame = await self._inner.receive(max_size=max_size, timeout=timeout)
        if self._lose_next_reply:
            self._lose_next_reply = False
            self._dice.log["lose_reply"] += 1
            await self._inner.reset()
            raise StreamBroken("fault injected: reply lost, stream reset")
        return frame

    async def close(self) -> None:
        await self._inner.close()

    async def reset(self) -> None:
        await self._inner.reset()


class FaultySubscription:
    """A pubsub subscription that loses messages on delivery."""

    def __init__(self, inner: Any, dice: _Dice) -> None:
        self._inner = inner
        self._dice = dice

    async def get(self) -> Any:
        while True:
            msg = await self._inner.get()
            if not self._dice.roll(self._dice.faults.drop_pubsub, "drop_delivered"):
                await self._dice.delay()
                return msg


class FaultyHost:
    """`P2PHost` with faults on streams (both directions) and pubsub; the rest passes through."""

    def __init__(self, inner: P2PHost, dice: _Dice) -> None:
        self._inner = inner
        self._dice = dice

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def set_handler(self, protocol: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        async def faulty(stream: FramedStream) -> None:
            await handler(FaultyStream(stream, self._dice))

        self._inner.set_handler(protocol, faulty)

    async def open_stream(self, peer: bytes, protocol: str, *, timeout: float = 10.0) -> FaultyStream:
        await self._dice.delay()
        if self._dice.roll(self._dice.faults.refuse_open, "refuse_open"):
            raise StreamBroken(f"fault injected: cannot open {protocol}")
        return FaultyStream(await self._inner.open_stream(peer, protocol, timeout=timeout), self._dice)

    async def subscribe(self, topic: str) -> FaultySubscription:
        return FaultySubscription(await self._inner.subscribe(topic), self._dice)

    async def publish(self, topic: str, data: bytes) -> None:
        if self._dice.roll(self._dice.faults.drop_pubsub, "drop_published"):
            return
        await self._dice.delay()
        await self._inner.publish(topic, data)


def faulty_open_host(faults: Faults, log: FaultLog) -> Callable[..., Any]:
    """An `open_host` replacement: the same host, behind `FaultyHost`, seeded per identity."""

    @asynccontextmanager
    async def open_faulty_host(identity: Identity, listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), *,
                               gossip: GossipSettings | None = None,
                               gate: MemberGate | None = None, **options: Any) -> AsyncIterator[FaultyHost]:
        # options: open_host's NAT-traversal keywords (relay, relay_client, hole_punch, ...)
        async with open_host(identity, listen, gossip=gossip, gate=gate, **options) as host:
            yield FaultyHost(host, _Dice(faults, str(identity.peer_id), log))

    return open_faulty_host

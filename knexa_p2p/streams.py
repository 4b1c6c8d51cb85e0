"""Framed streams over libp2p with caps and timeouts, and libp2p errors translated at the edge.

Every read has a deadline (a frozen peer cannot block a daemon) and every frame a size cap
checked before buffering. Large payloads are written in chunks so Yamux's flow control keeps
moving (a single huge write stalled and was reset after ~5 s in py-libp2p 0.8).
"""

from __future__ import annotations

import contextlib
import logging

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from protocol import NEED_DATA, DecodeError, FrameDecoder, encode_frame

__all__ = ["CHUNK", "FramedStream", "StreamBroken"]

logger = logging.getLogger(__name__)
CHUNK = 64 * 1024


class StreamBroken(Exception):
    """The peer or the network broke the stream (reset, EOF, timeout, connection lost)."""


class FramedStream:
    """One libp2p stream, read and written as length-prefixed frames."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self.remote_peer: bytes = stream.muxed_conn.peer_id.to_bytes()

    @property
    def raw(self) -> INetStream:
        """The libp2p stream (for knexa_p2p's own use: which connection carries it)."""
        return self._stream

    async def send(self, payload: bytes, *, max_size: int | None = None) -> None:
        """Write one frame. Cancellation may leave a partial frame (the reader sees truncation)."""
        frame = encode_frame(payload) if max_size is None else encode_frame(payload, max_size=max_size)
        try:
            for i in range(0, len(frame), CHUNK):
                await self._stream.write(frame[i : i + CHUNK])
        except BaseLibp2pError as exc:
            raise StreamBroken(f"write failed: {type(exc).__name__}: {exc}") from exc

    async def receive(self, *, max_size: int, timeout: float) -> bytes:
        """Read exactly one frame within `timeout` seconds.

        Raises:
            StreamBroken: timeout, reset, or EOF before a complete frame.
            OversizeError: the length prefix exceeds `max_size` (nothing was buffered).
        """
        decoder = FrameDecoder(max_size)
        with trio.move_on_after(timeout) as scope:
            while True:
                frame = decoder.next_frame()
                if frame is not NEED_DATA:
                    return frame  # type: ignore[return-value]
                try:
                    data = await self._stream.read(min(decoder.missing, CHUNK))
                except BaseLibp2pError as exc:
                    if isinstance(exc, EOFError):
                        data = b""
                    else:
                        raise StreamBroken(f"read failed: {type(exc).__name__}") from exc
                if not data:
                    try:
                        decoder.eof()
                    except DecodeError as exc:
                        raise StreamBroken(str(exc)) from exc
                    raise StreamBroken("stream closed before a frame arrived")
                decoder.receive_data(data)
        assert scope.cancelled_caught
        raise StreamBroken(f"no complete frame within {timeout:.1f}s")

    async def close(self) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            with contextlib.suppress(BaseLibp2pError):
                await self._stream.close()

    async def reset(self) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            with contextlib.suppress(BaseLibp2pError):
                await self._stream.reset()

"""Length-prefixed frames: a reader can tell a complete message from a peer that died mid-send.

A 4-byte big-endian length precedes each payload. The decoder is sans-I/O (h11 style): feed it
bytes with `receive_data`, pull frames with `next_frame`, which returns `NEED_DATA` until a whole
frame is buffered. The length is checked against the cap before any payload is buffered.
"""

from __future__ import annotations

import struct
from typing import Final

from ._errors import DecodeError, OversizeError
from ._limits import MAX_FRAME

__all__ = ["HEADER_LEN", "NEED_DATA", "FrameDecoder", "encode_frame"]

HEADER_LEN: Final = 4
_HEADER = struct.Struct(">I")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


def encode_frame(payload: bytes, *, max_size: int = MAX_FRAME) -> bytes:
    if len(payload) > max_size:
        raise OversizeError(f"frame of {len(payload)} bytes exceeds cap {max_size}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser with a per-stream size cap."""

    def __init__(self, max_size: int = MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes; `b""` means EOF (checked by `eof`)."""
        self._buf += data
        if self._need is None and len(self._buf) >= HEADER_LEN:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > self.max_size:
                raise OversizeError(f"length prefix {n} exceeds cap {self.max_size}")
            self._need = n
        if self._need is not None and len(self._buf) > HEADER_LEN + self._need + HEADER_LEN + self.max_size:
            raise OversizeError("peer sent far more than one frame")

    @property
    def missing(self) -> int:
        """Bytes still needed to complete the current frame (header first)."""
        if self._need is None:
            return HEADER_LEN - len(self._buf)
        return max(0, HEADER_LEN + self._need - len(self._buf))

    def next_frame(self) -> bytes | _NeedData:
        if self._need is None or len(self._buf) < HEADER_LEN + self._need:
            return NEED_DATA
        end = HEADER_LEN + self._need
        frame = bytes(self._buf[HEADER_LEN:end])
        del self._buf[:end]
        self._need = None
        if len(self._buf) >= HEADER_LEN:
            self.receive_data(b"")
        return frame

    def eof(self) -> None:
        """The stream ended: fine between frames, a truncated message inside one."""
        if self._buf:
            raise DecodeError(f"stream ended mid-frame ({len(self._buf)} bytes buffered, {self.missing} missing)")

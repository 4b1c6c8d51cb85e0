"""Size caps, checked before anything is allocated (length prefixes, msgpack max_*_len)."""

from __future__ import annotations

__all__ = ["FRAME_CAPS", "MAX_FRAME", "MAX_PACKAGE_ITEMS", "MAX_ANSWER_CHARS", "MAX_PAIRS",
           "MAX_FEDERATION_LEN", "MAX_DETAIL_LEN", "MAX_TASK_ID_LEN", "ROUND_MAX", "MAX_BUNDLE_BYTES",
           "BUNDLE_CHUNK"]

KIB = 1024
MIB = 1024 * KIB

#: Largest frame any stream accepts (a knowledge package of a few hundred answers).
MAX_FRAME = 16 * MIB
#: Per-kind caps: a reader that knows what it expects passes the tighter one.
FRAME_CAPS: dict[str, int] = {
    "hello": 2 * KIB,
    "profile": 4 * KIB,
    "reward": 2 * KIB,
    "directive_request": 1 * KIB,
    "reply": 4 * KIB,
    "directive": 256 * KIB,
    "package": MAX_FRAME,
    "public_set": 2 * KIB,  # a signed PublicSetAnnounce
    "public_set_chunk": 256 * KIB + 1 * KIB,  # one PublicSetChunk: BUNDLE_CHUNK data + envelope
}
MAX_PACKAGE_ITEMS = 4096
MAX_ANSWER_CHARS = 16_384
MAX_TASK_ID_LEN = 128
MAX_PAIRS = 4096
MAX_FEDERATION_LEN = 64
MAX_DETAIL_LEN = 512
ROUND_MAX = 10**9
#: The federation's public-set bundle (transfer set X_u + test set), whole and per chunk.
MAX_BUNDLE_BYTES = 64 * MIB
BUNDLE_CHUNK = 256 * KIB

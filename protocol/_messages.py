"""Message types: frozen dataclasses that validate themselves, so an invalid one cannot exist.

Peer ids travel as raw bytes (the libp2p multihash of an Ed25519 key, 38 bytes); rounds are
non-negative ints; every float is finite. Constructing an invalid message raises
`LocalProtocolError`; the codec turns that into `DecodeError` for bytes from a peer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from ._errors import LocalProtocolError
from ._layout import PROFILE_DIM, SKILLS_DIM
from ._limits import (
    BUNDLE_CHUNK,
    MAX_ANSWER_CHARS,
    MAX_BUNDLE_BYTES,
    MAX_DETAIL_LEN,
    MAX_FEDERATION_LEN,
    MAX_PACKAGE_ITEMS,
    MAX_PAIRS,
    MAX_TASK_ID_LEN,
    ROUND_MAX,
)

__all__ = [
    "DirectiveRequest",
    "Hello",
    "Match",
    "MatchDirective",
    "Message",
    "PackageBody",
    "PackageItem",
    "Profile",
    "Reply",
    "PublicSetAnnounce",
    "PublicSetChunk",
    "PublicSetFetch",
    "PublicSetQuery",
    "ReplyCode",
    "RewardReport",
    "SealedPackage",
    "Signed",
    "MESSAGE_TYPES",
]

PEER_ID_LEN = 38  # identity multihash of a protobuf-wrapped Ed25519 key: 6-byte header + 32
DIRECTIVE_ID_LEN = 16
KEY_LEN = 32
NONCE_LEN = 12
BUNDLE_DIGEST_LEN = 32  # SHA-256 of a public-set bundle
SIGNATURE_LEN = 64
#: Sanitized profile values live in [-1, 1] (deltas are signed; everything else in [0, 1]).
PROFILE_RANGE = (-1.0, 1.0)
REWARD_ABS_MAX = 1e6


class ReplyCode:
    """Codes carried by `Reply`: an enum on the wire, never a traceback."""

    OK = "ok"
    DECODE = "decode"
    OVERSIZE = "oversize"
    SIGNATURE = "signature"
    REPLAY = "replay"
    UNAUTHORIZED = "unauthorized"
    STALE_ROUND = "stale_round"
    NOT_READY = "not_ready"
    DECRYPT = "decrypt"
    INTERNAL = "internal"
    ALL = frozenset({OK, DECODE, OVERSIZE, SIGNATURE, REPLAY, UNAUTHORIZED, STALE_ROUND,
                     NOT_READY, DECRYPT, INTERNAL})


def _fail(cls: type, msg: str) -> None:
    raise LocalProtocolError(f"{cls.__name__}: {msg}")


def _check_federation(cls: type, federation: str) -> None:
    if not (0 < len(federation) <= MAX_FEDERATION_LEN) or not federation.isprintable():
        _fail(cls, f"federation must be 1..{MAX_FEDERATION_LEN} printable chars")


def _check_peer(cls: type, name: str, peer: bytes) -> None:
    if len(peer) != PEER_ID_LEN or peer[:6] != b"\x00\x24\x08\x01\x12\x20":
        _fail(cls, f"{name} is not an Ed25519 peer id ({len(peer)} bytes)")


def _check_round(cls: type, round_: int) -> None:
    if not 0 <= round_ <= ROUND_MAX:
        _fail(cls, f"round {round_} out of range")


def _check_len(cls: type, name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        _fail(cls, f"{name} must be {n} bytes, got {len(value)}")


def _check_finite(cls: type, name: str, x: float, lo: float, hi: float) -> None:
    if not math.isfinite(x) or not lo <= x <= hi:
        _fail(cls, f"{name}={x!r} not finite in [{lo}, {hi}]")


class Message:
    """Base of every wire message; `TYPE` is the tag in the encoded map."""

    TYPE: ClassVar[str] = ""
    #: fields added after the message shipped: left off the wire while they hold their default
    #: and read as the default when absent, so peers of either version still understand the
    #: message as long as the new field is not used
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def field_values(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """A node's signed announcement of its X25519 key for end-to-end package encryption."""

    TYPE: ClassVar[str] = "hello"
    federation: str
    node: bytes
    kem_public: bytes
    timestamp: float

    def __post_init__(self) -> None:
        _check_federation(Hello, self.federation)
        _check_peer(Hello, "node", self.node)
        _check_len(Hello, "kem_public", self.kem_public, KEY_LEN)
        _check_finite(Hello, "timestamp", self.timestamp, 0.0, 1e11)


@dataclass(frozen=True, slots=True)
class Profile(Message):
    """A node's sanitized 32-dim profile for one round (SPEC "Context"), and optionally its
    sanitized validation Pass@1 per category (`skills`, SKILLS_DIM values in [0, 1]; empty when
    the node does not share it, and then absent from the wire)."""

    TYPE: ClassVar[str] = "profile"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"skills"})
    federation: str
    round: int
    node: bytes
    vector: tuple[float, ...]
    skills: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check_federation(Profile, self.federation)
        _check_round(Profile, self.round)
        _check_peer(Profile, "node", self.node)
        if len(self.vector) != PROFILE_DIM:
            _fail(Profile, f"vector must have {PROFILE_DIM} values, got {len(self.vector)}")
        for i, x in enumerate(self.vector):
            _check_finite(Profile, f"vector[{i}]", x, *PROFILE_RANGE)
        if len(self.skills) not in (0, SKILLS_DIM):
            _fail(Profile, f"skills must have {SKILLS_DIM} values or none, got {len(self.skills)}")
        for i, x in enumerate(self.skills):
            _check_finite(Profile, f"skills[{i}]", x, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Match(Message):
    """One ordered pair of a directive: `teacher` sends a package to `student`."""

    TYPE: ClassVar[str] = "match"
    directive_id: bytes
    teacher: bytes
    student: bytes

    def __post_init__(self) -> None:
        _check_len(Match, "directive_id", self.directive_id, DIRECTIVE_ID_LEN)
        _check_peer(Match, "teacher", self.teacher)
        _check_peer(Match, "student", self.student)
        if self.teacher == self.student:
            _fail(Match, "teacher and student are the same peer")


@dataclass(frozen=True, slots=True)
class MatchDirective(Message):
    """The CPM's signed pairing for a round, published on the directive topic."""

    TYPE: ClassVar[str] = "directive"
    federation: str
    round: int
    cpm: bytes
    issued_at: float
    pairs: tuple[Match, ...]
    participants: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_federation(MatchDirective, self.federation)
        _check_round(MatchDirective, self.round)
        _check_peer(MatchDirective, "cpm", self.cpm)
        _check_finite(MatchDirective, "issued_at", self.issued_at, 0.0, 1e11)
        if len(self.pairs) > MAX_PAIRS or len(self.participants) > 2 * MAX_PAIRS + 1:
            _fail(MatchDirective, "too many pairs or participants")
        seen: set[bytes] = set()
        ids: set[bytes] = set()
        for m in self.pairs:
            if m.teacher in seen or m.student in seen:
                _fail(MatchDirective, "a peer appears in two pairs")
            seen.update((m.teacher, m.student))
            if m.directive_id in ids:
                _fail(MatchDirective, "duplicate directive id")
            ids.add(m.directive_id)
        for p in self.participants:
            _check_peer(MatchDirective, "participant", p)
        if not seen <= set(self.participants):
            _fail(MatchDirective, "a matched peer is not a participant")


@dataclass(frozen=True, slots=True)
class DirectiveRequest(Message):
    """A node asks the CPM for a round's directive (fallback when pubsub dropped it)."""

    TYPE: ClassVar[str] = "directive_request"
    federation: str
    round: int
    node: bytes

    def __post_init__(self) -> None:
        _check_federation(DirectiveRequest, self.federation)
        _check_round(DirectiveRequest, self.round)
        _check_peer(DirectiveRequest, "node", self.node)


@dataclass(frozen=True, slots=True)
class RewardReport(Message):
    """A student's scalar reward for one directive (SPEC Eq. 3); accepted once."""

    TYPE: ClassVar[str] = "reward"
    federation: str
    round: int
    directive_id: bytes
    teacher: bytes
    student: bytes
    reward: float
    package_bytes: int

    def __post_init__(self) -> None:
        _check_federation(RewardReport, self.federation)
        _check_round(RewardReport, self.round)
        _check_len(RewardReport, "directive_id", self.directive_id, DIRECTIVE_ID_LEN)
        _check_peer(RewardReport, "teacher", self.teacher)
        _check_peer(RewardReport, "student", self.student)
        _check_finite(RewardReport, "reward", self.reward, -REWARD_ABS_MAX, REWARD_ABS_MAX)
        if not 0 <= self.package_bytes <= 1 << 40:
            _fail(RewardReport, "package_bytes out of range")


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """Answer to any request: ok or a code from `ReplyCode`, plus the CPM's open round."""

    TYPE: ClassVar[str] = "reply"
    ok: bool
    code: str
    detail: str
    round: int

    def __post_init__(self) -> None:
        if self.code not in ReplyCode.ALL:
            _fail(Reply, f"unknown code {self.code!r}")
        if len(self.detail) > MAX_DETAIL_LEN:
            _fail(Reply, "detail too long")
        _check_round(Reply, self.round)


@dataclass(frozen=True, slots=True)
class PackageItem(Message):
    """One teacher answer: a public transfer-set task id and the answer text."""

    TYPE: ClassVar[str] = "item"
    task_id: str
    text: str

    def __post_init__(self) -> None:
        if not 0 < len(self.task_id) <= MAX_TASK_ID_LEN:
            _fail(PackageItem, "task_id length out of range")
        if len(self.text) > MAX_ANSWER_CHARS:
            _fail(PackageItem, f"answer longer than {MAX_ANSWER_CHARS} chars")


@dataclass(frozen=True, slots=True)
class PackageBody(Message):
    """The plaintext of a knowledge package: only the student ever sees it."""

    TYPE: ClassVar[str] = "package_body"
    items: tuple[PackageItem, ...]
    blocked: int

    def __post_init__(self) -> None:
        if len(self.items) > MAX_PACKAGE_ITEMS:
            _fail(PackageBody, "too many items")
        if not 0 <= self.blocked <= MAX_PACKAGE_ITEMS:
            _fail(PackageBody, "blocked count out of range")


@dataclass(frozen=True, slots=True)
class SealedPackage(Message):
    """An end-to-end encrypted knowledge package, addressed to one directive's student."""

    TYPE: ClassVar[str] = "package"
    federation: str
    round: int
    directive_id: bytes
    sender: bytes
    recipient: bytes
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_federation(SealedPackage, self.federation)
        _check_round(SealedPackage, self.round)
        _check_len(SealedPackage, "directive_id", self.directive_id, DIRECTIVE_ID_LEN)
        _check_peer(SealedPackage, "sender", self.sender)
        _check_peer(SealedPackage, "recipient", self.recipient)
        _check_len(SealedPackage, "ephemeral_public", self.ephemeral_public, KEY_LEN)
        _check_len(SealedPackage, "nonce", self.nonce, NONCE_LEN)
        if len(self.ciphertext) < 16:
            _fail(SealedPackage, "ciphertext shorter than the AEAD tag")


@dataclass(frozen=True, slots=True)
class PublicSetQuery(Message):
    """A node asks the CPM which public set (transfer X_u + test) the federation runs on."""

    TYPE: ClassVar[str] = "public_set_query"
    federation: str
    node: bytes

    def __post_init__(self) -> None:
        _check_federation(PublicSetQuery, self.federation)
        _check_peer(PublicSetQuery, "node", self.node)


@dataclass(frozen=True, slots=True)
class PublicSetAnnounce(Message):
    """The CPM's signed statement of the current public-set bundle: version, digest, size."""

    TYPE: ClassVar[str] = "public_set"
    federation: str
    cpm: bytes
    version: int
    digest: bytes
    size: int
    chunk_size: int
    published_at: float

    def __post_init__(self) -> None:
        _check_federation(PublicSetAnnounce, self.federation)
        _check_peer(PublicSetAnnounce, "cpm", self.cpm)
        if not 1 <= self.version <= ROUND_MAX:
            _fail(PublicSetAnnounce, f"version {self.version} out of range")
        _check_len(PublicSetAnnounce, "digest", self.digest, BUNDLE_DIGEST_LEN)
        if not 0 < self.size <= MAX_BUNDLE_BYTES:
            _fail(PublicSetAnnounce, f"size {self.size} not in 1..{MAX_BUNDLE_BYTES}")
        if not 0 < self.chunk_size <= BUNDLE_CHUNK:
            _fail(PublicSetAnnounce, f"chunk_size {self.chunk_size} not in 1..{BUNDLE_CHUNK}")
        _check_finite(PublicSetAnnounce, "published_at", self.published_at, 0.0, 1e11)

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclass(frozen=True, slots=True)
class PublicSetFetch(Message):
    """A node asks for the bundle with this digest; the CPM answers with its chunks in order."""

    TYPE: ClassVar[str] = "public_set_fetch"
    federation: str
    node: bytes
    digest: bytes

    def __post_init__(self) -> None:
        _check_federation(PublicSetFetch, self.federation)
        _check_peer(PublicSetFetch, "node", self.node)
        _check_len(PublicSetFetch, "digest", self.digest, BUNDLE_DIGEST_LEN)


@dataclass(frozen=True, slots=True)
class PublicSetChunk(Message):
    """One piece of a bundle. Unsigned: the reassembled bytes must hash to the signed digest."""

    TYPE: ClassVar[str] = "public_set_chunk"
    digest: bytes
    index: int
    data: bytes

    def __post_init__(self) -> None:
        _check_len(PublicSetChunk, "digest", self.digest, BUNDLE_DIGEST_LEN)
        if not 0 <= self.index < MAX_BUNDLE_BYTES:
            _fail(PublicSetChunk, f"index {self.index} out of range")
        if not 0 < len(self.data) <= BUNDLE_CHUNK:
            _fail(PublicSetChunk, f"data of {len(self.data)} bytes not in 1..{BUNDLE_CHUNK}")


@dataclass(frozen=True, slots=True)
class Signed(Message):
    """Any message, encoded, with the Ed25519 signature of the peer that sent it."""

    TYPE: ClassVar[str] = "signed"
    signer: bytes
    body: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_peer(Signed, "signer", self.signer)
        _check_len(Signed, "signature", self.signature, SIGNATURE_LEN)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Profile, Match, MatchDirective, DirectiveRequest, RewardReport, Reply,
                PackageItem, PackageBody, SealedPackage, Signed, PublicSetQuery, PublicSetAnnounce,
                PublicSetFetch, PublicSetChunk)
}

"""KNEXA wire protocol, sans-I/O: no sockets, no trio, no libp2p, no torch.

Map of the package (each private module has its own `__all__`):
- `_messages`: frozen, self-validating message dataclasses (Profile, RewardReport, MatchDirective,
  SealedPackage, Hello, Reply, ...).
- `_codec`: strict msgpack `encode`/`decode` with version tag and size caps.
- `_framing`: length-prefixed frames with an incremental `FrameDecoder`.
- `_envelope`: Ed25519 `sign`/`open_signed` bound to the authenticated peer; X25519 + HKDF +
  ChaCha20-Poly1305 `seal_package`/`open_package` with AAD binding round, pair and federation.
- `_public_set`: the federation's public-set bundle (transfer X_u + test): canonical bytes, SHA-256
  digest, strict parsing; its stream id. Messages PublicSetQuery/Announce/Fetch/Chunk carry it.
- `_replay`: `DirectiveBook`, which directives exist and which were consumed.
- `_ids`, `_limits`, `_layout`: version, protocol ids, topics, size caps, the 32-dim profile layout.
- `_errors`: `ProtocolError` > `LocalProtocolError` | `RemoteProtocolError` > reason subclasses.
"""

from ._codec import decode, encode
from ._envelope import (
    open_package,
    open_signed,
    peer_id_from_public_key,
    peer_id_str,
    public_key_from_peer_id,
    seal_package,
    sign,
)
from ._errors import (
    DecodeError,
    DecryptError,
    LocalProtocolError,
    OversizeError,
    ProtocolError,
    RemoteProtocolError,
    ReplayError,
    SignatureError,
    UnauthorizedError,
)
from ._framing import HEADER_LEN, NEED_DATA, FrameDecoder, encode_frame
from ._ids import CPM_PROTOCOL, KD_PROTOCOL, PROTOCOL_VERSION, directive_topic
from ._layout import (
    CATEGORIES,
    FAMILIES,
    FAMILY_SLICE,
    HIST_SLICE,
    PERF_SLICE,
    PROFILE_DIM,
    SKILLS_DIM,
)
from ._limits import FRAME_CAPS, MAX_FRAME
from ._messages import (
    MESSAGE_TYPES,
    DirectiveRequest,
    Hello,
    Match,
    MatchDirective,
    Message,
    PackageBody,
    PackageItem,
    Profile,
    PublicSetAnnounce,
    PublicSetChunk,
    PublicSetFetch,
    PublicSetQuery,
    Reply,
    ReplyCode,
    RewardReport,
    SealedPackage,
    Signed,
)
from ._public_set import (
    PUBLIC_SET_PROTOCOL,
    PublicSetBundle,
    bundle_digest,
    decode_bundle,
    encode_bundle,
)
from ._replay import DirectiveBook

__all__ = [
    "CATEGORIES", "CPM_PROTOCOL", "DecodeError", "DecryptError", "DirectiveBook",
    "DirectiveRequest", "FAMILIES", "FAMILY_SLICE", "FRAME_CAPS", "FrameDecoder", "HEADER_LEN",
    "HIST_SLICE", "Hello", "KD_PROTOCOL", "LocalProtocolError", "MAX_FRAME", "MESSAGE_TYPES",
    "Match", "MatchDirective", "Message", "NEED_DATA", "OversizeError", "PERF_SLICE",
    "PROFILE_DIM", "PROTOCOL_VERSION", "SKILLS_DIM", "PackageBody", "PackageItem", "Profile", "ProtocolError",
    "RemoteProtocolError", "Reply", "ReplyCode", "ReplayError", "RewardReport", "SealedPackage",
    "SignatureError", "Signed", "UnauthorizedError",
    "PUBLIC_SET_PROTOCOL", "PublicSetAnnounce", "PublicSetBundle", "PublicSetChunk", "PublicSetFetch",
    "PublicSetQuery", "bundle_digest", "decode_bundle", "encode_bundle", "decode", "directive_topic", "encode",
    "encode_frame", "open_package", "open_signed", "peer_id_from_public_key", "peer_id_str",
    "public_key_from_peer_id", "seal_package", "sign",
]

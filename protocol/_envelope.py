"""Signing and end-to-end encryption envelopes; keys are passed in, nothing is stored here.

Signatures: Ed25519 with the sender's libp2p identity key, over a domain-separated encoding.
`open_signed` checks both that the signature is valid for the peer id it claims AND that this
peer id is the one the caller authenticated (the stream's remote peer, or the pinned CPM): a
valid signature from the wrong peer is rejected.

Packages: ephemeral X25519 to the student's signed X25519 key, HKDF-SHA256, ChaCha20-Poly1305.
The associated data binds version, federation, round, directive id, sender and recipient, so a
ciphertext cannot be moved to another round, pair or federation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import base58
import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._codec import decode, encode
from ._errors import DecodeError, DecryptError, LocalProtocolError, SignatureError
from ._ids import PROTOCOL_VERSION
from ._limits import MAX_FRAME
from ._messages import PEER_ID_LEN, Message, PackageBody, SealedPackage, Signed

__all__ = [
    "open_package",
    "open_signed",
    "peer_id_from_public_key",
    "peer_id_str",
    "public_key_from_peer_id",
    "seal_package",
    "sign",
]

M = TypeVar("M", bound=Message)

# libp2p peer id for an Ed25519 key: identity multihash (0x00, len 0x24) of the protobuf
# PublicKey {Type: Ed25519 (1), Data: 32 bytes}.
_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"
_SIG_DOMAIN = b"knexa/v%d/signed\x00" % PROTOCOL_VERSION
_HKDF_INFO = b"knexa/v%d/package" % PROTOCOL_VERSION


def peer_id_from_public_key(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _PEER_ID_PREFIX + raw


def public_key_from_peer_id(peer: bytes) -> Ed25519PublicKey:
    """Ed25519 peer ids embed their key; other key types are not KNEXA identities."""
    if len(peer) != PEER_ID_LEN or not peer.startswith(_PEER_ID_PREFIX):
        raise SignatureError("peer id is not an Ed25519 identity")
    return Ed25519PublicKey.from_public_bytes(peer[len(_PEER_ID_PREFIX):])


def peer_id_str(peer: bytes) -> str:
    """The base58 form libp2p prints (12D3KooW...)."""
    return base58.b58encode(peer).decode("ascii")


def sign(msg: Message, key: Ed25519PrivateKey) -> Signed:
    body = encode(msg)
    return Signed(
        signer=peer_id_from_public_key(key.public_key()),
        body=body,
        signature=key.sign(_SIG_DOMAIN + body),
    )


def open_signed(
    signed: Signed,
    expect: type[M] | tuple[type[Message], ...],
    *,
    authenticated: bytes,
    sender_of: Callable[[Any], bytes] | None = None,
    max_size: int = MAX_FRAME,
) -> M:
    """Verify a signed message and decode its body.

    Args:
        signed: the envelope as received.
        expect: the message type the caller is prepared to handle.
        authenticated: the peer id the transport authenticated (stream remote peer) or the
            pinned CPM id for pubsub. The signer must be exactly this peer.
        sender_of: returns the peer the body claims as its sender; it must equal the signer.

    Raises:
        SignatureError: wrong signer, bad signature, or body claims another sender.
        DecodeError / OversizeError: the body is not a valid `expect`.
    """
    if signed.signer != authenticated:
        raise SignatureError(
            f"signed by {peer_id_str(signed.signer)[:16]}..., not the authenticated peer "
            f"{peer_id_str(authenticated)[:16]}..."
        )
    try:
        public_key_from_peer_id(signed.signer).verify(signed.signature, _SIG_DOMAIN + signed.body)
    except InvalidSignature as exc:
        raise SignatureError("invalid Ed25519 signature") from exc
    msg = decode(signed.body, expect, max_size=max_size)
    if sender_of is not None and sender_of(msg) != signed.signer:
        raise SignatureError("message claims a sender other than its signer")
    return msg


def _aad(federation: str, round_: int, directive_id: bytes, sender: bytes, recipient: bytes) -> bytes:
    return msgpack.packb(
        [PROTOCOL_VERSION, federation, round_, directive_id, sender, recipient], use_bin_type=True
    )


def _derive_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_public, info=_HKDF_INFO
    ).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal_package(
    body: PackageBody,
    *,
    federation: str,
    round: int,
    directive_id: bytes,
    sender: bytes,
    recipient: bytes,
    recipient_kem_public: bytes,
    urandom: Callable[[int], bytes] = os.urandom,
) -> SealedPackage:
    """Encrypt a package body for one student and one directive (fresh ephemeral key)."""
    try:
        recipient_pub = X25519PublicKey.from_public_bytes(recipient_kem_public)
    except ValueError as exc:
        raise LocalProtocolError(f"bad recipient X25519 key: {exc}") from exc
    ephemeral = X25519PrivateKey.from_private_bytes(urandom(32))
    eph_pub = _raw(ephemeral.public_key())
    key = _derive_key(ephemeral.exchange(recipient_pub), eph_pub, recipient_kem_public)
    nonce = urandom(12)
    aad = _aad(federation, round, directive_id, sender, recipient)
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, encode(body), aad)
    return SealedPackage(
        federation=federation, round=round, directive_id=directive_id, sender=sender,
        recipient=recipient, ephemeral_public=eph_pub, nonce=nonce, ciphertext=ciphertext,
    )


def open_package(sealed: SealedPackage, kem_private: X25519PrivateKey, *, max_size: int = MAX_FRAME) -> PackageBody:
    """Decrypt a package addressed to us; the header fields are authenticated via the AAD.

    Raises:
        DecryptError: wrong key, tampered ciphertext/header, or header moved to another context.
        DecodeError: the plaintext is not a valid package body.
    """
    try:
        eph = X25519PublicKey.from_public_bytes(sealed.ephemeral_public)
        shared = kem_private.exchange(eph)
    except ValueError as exc:
        raise DecryptError(f"bad ephemeral key: {exc}") from exc
    key = _derive_key(shared, sealed.ephemeral_public, _raw(kem_private.public_key()))
    aad = _aad(sealed.federation, sealed.round, sealed.directive_id, sealed.sender, sealed.recipient)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(sealed.nonce, sealed.ciphertext, aad)
    except InvalidTag as exc:
        raise DecryptError("package authentication failed") from exc
    try:
        return decode(plaintext, PackageBody, max_size=max_size)
    except DecodeError:
        raise

"""Persistent Ed25519 identities: the peer id a daemon keeps across restarts.

The key file holds the 32-byte Ed25519 seed; it is created with mode 0600 on first start and
reused afterwards. The same seed gives the libp2p key pair (for Noise and pubsub signing) and
the `cryptography` key (for KNEXA's own message signatures), so both sign as the same peer.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from protocol import peer_id_from_public_key

__all__ = ["Identity", "IdentityError", "load_or_create_identity", "load_or_create_kem_key"]

SEED_LEN = 32


class IdentityError(Exception):
    """The key file exists but is unusable (wrong size, wrong permissions)."""


@dataclass(frozen=True)
class Identity:
    seed: bytes
    key_pair: KeyPair
    signing_key: Ed25519PrivateKey
    peer_id: ID

    @property
    def peer_bytes(self) -> bytes:
        return self.peer_id.to_bytes()

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != SEED_LEN:
            raise IdentityError(f"identity seed must be {SEED_LEN} bytes, got {len(seed)}")
        key_pair = create_new_key_pair(seed)
        signing_key = Ed25519PrivateKey.from_private_bytes(seed)
        peer_id = ID.from_pubkey(key_pair.public_key)
        if peer_id.to_bytes() != peer_id_from_public_key(signing_key.public_key()):
            raise IdentityError("libp2p and cryptography derived different peer ids")
        return cls(seed=seed, key_pair=key_pair, signing_key=signing_key, peer_id=peer_id)


def _read_secret(path: Path, length: int) -> bytes | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{path} is readable by others (mode {oct(st.st_mode & 0o777)}); chmod 600 it")
    data = path.read_bytes()
    if len(data) != length:
        raise IdentityError(f"{path} holds {len(data)} bytes, expected {length}")
    return data


def _create_secret(path: Path, length: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(length)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return data


def load_or_create_identity(path: Path) -> Identity:
    """Load the identity seed at `path`, creating it (mode 0600) on first start."""
    seed = _read_secret(path, SEED_LEN)
    if seed is None:
        seed = _create_secret(path, SEED_LEN)
    return Identity.from_seed(seed)


def load_or_create_kem_key(path: Path) -> X25519PrivateKey:
    """The node's X25519 key that teachers encrypt packages to (announced in a signed Hello)."""
    raw = _read_secret(path, 32)
    if raw is None:
        raw = _create_secret(path, 32)
    return X25519PrivateKey.from_private_bytes(raw)

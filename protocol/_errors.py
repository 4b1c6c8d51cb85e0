"""The protocol's error tree: who broke the rules, and how (h11's Local/Remote split).

Every decoder and verifier raises a `RemoteProtocolError` subclass for bad input from a peer;
`LocalProtocolError` means this process tried to build something invalid (a bug). Callers catch
`RemoteProtocolError` at the service edge, log one line and drop that stream; nothing else.
"""

from __future__ import annotations

__all__ = [
    "DecodeError",
    "DecryptError",
    "LocalProtocolError",
    "OversizeError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplayError",
    "SignatureError",
    "UnauthorizedError",
]


class ProtocolError(Exception):
    """Abstract root: a message broke the KNEXA wire protocol."""

    #: short machine-readable reason, used in ErrorReply codes and rejection counters
    code = "protocol"


class LocalProtocolError(ProtocolError):
    """We tried to build or send an invalid message (a bug on this side)."""

    code = "local"


class RemoteProtocolError(ProtocolError):
    """A peer sent something invalid; reject it, keep serving everyone else."""

    code = "remote"


class DecodeError(RemoteProtocolError):
    """Bytes are not a well-formed message of a known type and version."""

    code = "decode"


class OversizeError(RemoteProtocolError):
    """A frame or field is larger than the cap for its message type."""

    code = "oversize"


class SignatureError(RemoteProtocolError):
    """Signature invalid, or signed by a peer other than the authenticated one."""

    code = "signature"


class DecryptError(RemoteProtocolError):
    """AEAD open failed: wrong key, tampered ciphertext, or AAD for another round/pair."""

    code = "decrypt"


class ReplayError(RemoteProtocolError):
    """Stale round, duplicate directive/report, or a directive the CPM never issued."""

    code = "replay"


class UnauthorizedError(RemoteProtocolError):
    """The sender is not on the roster, or not allowed to send this message."""

    code = "unauthorized"

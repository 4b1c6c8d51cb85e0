"""Names both sides must agree on: version, libp2p protocol ids, pubsub topics."""

from __future__ import annotations

__all__ = [
    "CPM_PROTOCOL",
    "KD_PROTOCOL",
    "PROTOCOL_VERSION",
    "directive_topic",
]

#: Bumped on any incompatible change of message fields or semantics.
PROTOCOL_VERSION = 1
#: Request/response to the CPM: profile and reward submissions, directive polls.
CPM_PROTOCOL = "/knexa/cpm/1.0.0"
#: Direct teacher -> student stream carrying one sealed knowledge package.
KD_PROTOCOL = "/knexa/kd/1.0.0"


def directive_topic(federation: str) -> str:
    """GossipSub topic on which the CPM publishes signed match directives."""
    return f"knexa/{federation}/directives/v{PROTOCOL_VERSION}"

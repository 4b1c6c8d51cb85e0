"""Peer identities for tests."""

from __future__ import annotations

import os

from knexa_p2p.identity import Identity


def ident() -> Identity:
    """A fresh random identity."""
    return Identity.from_seed(os.urandom(32))

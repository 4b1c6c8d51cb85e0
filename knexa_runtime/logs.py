"""Daemon logging: one event per line, `key=value` pairs after a short message."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", *, file: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=_FORMAT,
                        handlers=handlers, force=True)
    # py-libp2p is chatty at INFO and its loggers don't propagate usefully; keep warnings only.
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.WARNING)

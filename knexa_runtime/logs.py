"""Daemon logging: one event per line, as text (`key=value` after a short message) or JSON.

JSON lines carry the event's structured fields (round, peer, directive ...) when a call passes
them as ``extra={"round": 3, "peer": "...KooW"}``; text lines carry the same in the message.
Neither ever holds package contents or private data: the callers only log ids, counts and scores.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["EVENT_FIELDS", "JsonFormatter", "set_level", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: structured fields copied from a record into its JSON line when present
EVENT_FIELDS = ("event", "round", "peer", "partner", "directive", "role", "reward", "bytes", "reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", *, fmt: str = "text", file: str | None = None) -> None:
    """Configure the root logger; `fmt` is "text" or "json"."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file))
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_FORMAT)
    for h in handlers:
        h.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers, force=True)
    # py-libp2p is chatty at INFO and its loggers don't propagate usefully; keep warnings only.
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the root level at run time (SIGHUP reload)."""
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))

"""Daemon logging: one event per line, as text (`key=value` after a short message) or JSON.

Messages are written as ``what happened key=value key=value``; a JSON line carries those pairs
as fields too (numbers as numbers), plus any ``extra={...}`` a call passes, so a log shipper can
filter on ``round``, ``peer``, ``teacher`` or ``reason`` without parsing text.
Neither ever holds package contents or private data: the callers only log ids, counts and scores.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["EVENT_FIELDS", "JsonFormatter", "set_level", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PAIR = re.compile(r"(?<![\w.])([a-z_][a-z0-9_]*)=([^\s,\]\[]+)")
_RESERVED = {"ts", "level", "logger", "msg", "exc"}


def _scalar(text: str) -> object:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)
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
        for key, value in _PAIR.findall(out["msg"]):
            if key not in _RESERVED:
                out.setdefault(key, _scalar(value))
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

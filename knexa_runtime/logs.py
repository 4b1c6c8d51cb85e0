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

__all__ = ["EVENT_FIELDS", "JsonFormatter", "LibraryOneLine", "OneLineFormatter", "set_level", "setup_logging"]

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


#: third-party loggers kept at WARNING and folded to one short line per event
LIBRARY_LOGGERS = ("libp2p", "multiaddr", "async_service")


def fold_lines(text: str) -> str:
    """One line: the non-blank lines of `text`, stripped and joined with " | "."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class LibraryOneLine(logging.Filter):
    """py-libp2p logs multi-line blocks: a message with a whole traceback pasted in (its
    `[ADDCONN_FAIL]` warning), or `exc_info`. Keep the message's first line, its last line (the
    exception) and the exception's one-line summary, so one event is one short line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in LIBRARY_LOGGERS:
            return True
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        summary = lines[0] if lines else ""
        if len(lines) > 1:
            summary += " | " + lines[-1]
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            summary += f" | exc={type(exc).__name__}: {fold_lines(str(exc))}"
        record.msg, record.args, record.exc_info, record.exc_text = summary, None, None, None
        return True


class OneLineFormatter(logging.Formatter):
    """The text format, with any multi-line message or traceback folded into its one line."""

    def format(self, record: logging.LogRecord) -> str:
        return fold_lines(super().format(record))


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
    formatter = JsonFormatter() if fmt == "json" else OneLineFormatter(_FORMAT)
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(LibraryOneLine())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers, force=True)
    # py-libp2p is chatty at INFO; keep warnings only. Its `import` sets propagate=False with no
    # handler, so its errors went to Python's last-resort handler: bare multi-line blocks without a
    # timestamp. Route them through our handlers instead (unless LIBP2P_DEBUG gave it its own).
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.setLevel(logging.WARNING)
        if not lib.handlers:
            lib.propagate = True


def set_level(level: str) -> None:
    """Change the root level at run time (SIGHUP reload)."""
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))

"""What both daemons share around their service: signals, systemd, reload, roster, metrics.

`supervise` is the process's life cycle, the same for `knexa-cpm serve` and `knexa-node start`:
start the service, print where it listens, tell systemd READY, ping the watchdog, and on
SIGTERM/SIGINT tell systemd STOPPING and cancel (the services persist state at every step, so
cancelling loses at most the step in flight); on SIGHUP call the daemon's reload.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from .roster import load_roster
from .systemd import Notifier

__all__ = ["check_common", "diff_settings", "merged_roster", "parse_hostport", "supervise"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def check_common(log_format: str, metrics_listen: str, log_level: str) -> None:
    """Validation shared by both daemons' config sections (raises ValueError)."""
    problems = []
    if log_format not in ("text", "json"):
        problems.append(f"log_format must be text or json, got {log_format!r}")
    if metrics_listen:
        try:
            parse_hostport(metrics_listen)
        except ValueError as exc:
            problems.append(f"metrics_listen: {exc}")
    if log_level.upper() not in LOG_LEVELS:
        problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if problems:
        raise ValueError("; ".join(problems))


def merged_roster(ids: Iterable[str], roster_file: Path | None) -> tuple[frozenset[str], list[str]]:
    """Peer ids from the config list plus the roster file, and the file's dialable addrs."""
    out = set(ids)
    addrs: list[str] = []
    if roster_file is not None:
        for entry in load_roster(roster_file):
            out.add(entry.id)
            if entry.addr:
                addrs.append(entry.addr)
    return frozenset(out), addrs


def diff_settings(old: Any, new: Any, reloadable: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Changed fields of two config dataclasses: (reloadable ones -> new value, others' names)."""
    allowed = set(reloadable)
    applied: dict[str, Any] = {}
    ignored: list[str] = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            if f.name in allowed:
                applied[f.name] = b
            else:
                ignored.append(f.name)
    return applied, ignored


async def supervise(start: Callable[..., Awaitable[None]], *, name: str, logger: logging.Logger,
                    reload: Callable[[], None] | None = None,
                    notifier: Notifier | None = None) -> None:
    """Run `start(task_status=...)` until it returns or a stop signal arrives."""
    notifier = notifier or Notifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def main_then_stop(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await start(task_status=task_status)
                nursery.cancel_scope.cancel()

            addrs = await nursery.start(main_then_stop)
            for a in addrs:
                print(f"{name} listening on {a}", flush=True)
            notifier.ready(f"listening on {addrs[0] if addrs else '?'}")
            nursery.start_soon(notifier.watchdog)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if reload is None:
                        logger.info("SIGHUP: nothing to reload")
                        continue
                    notifier.reloading()
                    try:
                        reload()
                    except Exception as exc:  # a bad edit must not kill a running daemon
                        logger.error("reload failed, keeping the running config: %s", exc)
                    notifier.ready("reloaded")
                    continue
                logger.info("received %s, shutting down", signal.Signals(signum).name)
                notifier.stopping()
                nursery.cancel_scope.cancel()
                break

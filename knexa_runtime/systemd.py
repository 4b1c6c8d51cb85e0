"""sd_notify for `Type=notify` units: READY, STATUS, STOPPING and watchdog pings.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemons call it unconditionally.
The watchdog pings at half of WATCHDOG_USEC, from the trio loop: a wedged event loop stops the
pings and systemd restarts the daemon, which is the point (a blocked worker thread does not).
"""

from __future__ import annotations

import logging
import os

import trio
from sdnotify import SystemdNotifier

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = SystemdNotifier() if self.enabled else None

    def _send(self, state: str) -> None:
        if self._sd is not None:
            self._sd.notify(state)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings systemd asked for (half its timeout), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(int(usec) / 2e6, 0.05)
        except ValueError:
            return None

    async def watchdog(self) -> None:
        """Ping until cancelled; returns at once when no watchdog is configured."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        logger.info("systemd watchdog every %.1fs", interval)
        while True:
            self._send("WATCHDOG=1")
            await trio.sleep(interval)

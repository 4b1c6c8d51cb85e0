"""The local control socket behind `knexa-node status` / `knexa-cpm status`.

A Unix socket in the state directory (mode 0600, so only the daemon's user may ask): the
client writes one command line (`status`), the daemon answers one JSON document and closes.
It is local-only by construction: nothing on the network can reach it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

__all__ = ["CONTROL_SOCKET", "ControlError", "query", "serve_control"]

logger = logging.getLogger(__name__)
CONTROL_SOCKET = "control.sock"
_MAX_REQUEST = 256
_MAX_UNIX_PATH = 104  # sun_path is 108 bytes on Linux, 104 on BSD/macOS


class ControlError(Exception):
    """The daemon could not be asked (not running, or a socket we may not open)."""


async def serve_control(path: Path, handlers: dict[str, Callable[[], dict[str, Any]]], *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `handlers[command]()` as JSON on a Unix socket at `path` until cancelled."""
    path = Path(path)
    if len(os.fsencode(path)) >= _MAX_UNIX_PATH:
        logger.warning("control socket path %s is too long for AF_UNIX; `status` is unavailable", path)
        task_status.started(None)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a killed daemon
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(5):
                    raw = b""
                    while b"\n" not in raw and len(raw) < _MAX_REQUEST:
                        chunk = await stream.receive_some(_MAX_REQUEST)
                        if not chunk:
                            break
                        raw += chunk
                command = raw.split(b"\n", 1)[0].decode("ascii", "replace").strip() or "status"
                handler = handlers.get(command)
                reply = handler() if handler else {"error": f"unknown command {command!r}",
                                                   "commands": sorted(handlers)}
                await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:  # a status bug must never take the daemon down
                logger.exception("control command failed")

    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            await trio.serve_listeners(handle, [listener], handler_nursery=nursery)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def query(path: Path, command: str = "status", *, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client: send `command`, return the daemon's JSON answer."""
    path = Path(path)
    if not path.exists():
        raise ControlError(f"no control socket at {path}: is the daemon running with this state dir?")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(command.encode("ascii") + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise ControlError(f"daemon not running (stale socket {path}): {exc}") from exc
        except PermissionError as exc:
            raise ControlError(f"{path}: permission denied (run as the daemon's user)") from exc
        except TimeoutError as exc:
            raise ControlError(f"daemon did not answer within {timeout:.0f}s") from exc
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError(f"bad answer from the daemon: {exc}") from exc

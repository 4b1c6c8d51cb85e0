import socket

import trio

from knexa_runtime.systemd import Notifier


def _listener(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    return s, str(path)


def test_ready_status_stopping_reach_the_socket(tmp_path, monkeypatch):
    sock, path = _listener(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    n.ready("listening")
    n.status("round 3")
    n.stopping()
    got = [sock.recv(512).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=listening", "STATUS=round 3", "STOPPING=1"]


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready()  # must not raise
    assert n.watchdog_interval() is None


async def test_watchdog_pings_at_half_the_timeout(tmp_path, monkeypatch):
    sock, path = _listener(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    assert n.watchdog_interval() == 0.1
    with trio.move_on_after(0.35):
        await n.watchdog()
    pings = []
    sock.settimeout(0.1)
    try:
        while True:
            pings.append(sock.recv(64))
    except TimeoutError:
        pass
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}


def test_watchdog_for_another_pid_is_ignored(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval() is None

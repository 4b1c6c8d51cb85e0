"""The CPM as systemd runs it: a real process with NOTIFY_SOCKET and a watchdog, queried with
`knexa-cpm status`, scraped over HTTP, reloaded with SIGHUP and stopped with SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from knexa_p2p.identity import Identity

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knexa_cpm", *args], capture_output=True, text=True, timeout=60)


def _recv_until(sock: socket.socket, needle: str, timeout: float = 30.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(needle in g for g in got):
            return got
    raise AssertionError(f"no {needle!r} from the daemon; got {got}")


def test_cpm_under_a_systemd_like_supervisor(reap):
    tmp = reap
    state, cfg = tmp / "state", tmp / "cpm.toml"
    roster = tmp / "roster.toml"
    ids = [str(Identity.from_seed(bytes([i]) * 32).peer_id) for i in range(3)]
    roster.write_text(f'[[peer]]\nid = "{ids[0]}"\n[[peer]]\nid = "{ids[1]}"\n')
    init = _cli("init", "--state-dir", str(state), "--config", str(cfg), "--listen", "/ip4/127.0.0.1/tcp/0",
                "--metrics", "127.0.0.1:0", "--roster-file", str(roster))
    assert init.returncode == 0, init.stderr
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(1.0)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "knexa_cpm", "serve", "--config", str(cfg),
                             "--log-format", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        messages = _recv_until(notify, "READY=1")
        assert any("WATCHDOG=1" in m for m in _recv_until(notify, "WATCHDOG=1")), messages

        status = _cli("status", "--config", str(cfg), "--json")
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["daemon"] == "knexa-cpm" and info["roster"] == 2 and info["health"] == "ok"
        human = _cli("status", "--state-dir", str(state))
        assert "roster" in human.stdout and "round" in human.stdout

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=5).read()
        assert b'knexa_up{daemon="cpm"} 1.0' in metrics

        # a new member joins: edit the roster file, SIGHUP
        roster.write_text(roster.read_text() + f'[[peer]]\nid = "{ids[2]}"\n')
        proc.send_signal(signal.SIGHUP)
        _recv_until(notify, "READY=1")
        assert json.loads(_cli("status", "--config", str(cfg), "--json").stdout)["roster"] == 3
        # a broken edit is refused and the daemon keeps running with the old roster
        roster.write_text("[[peer]]\nid = 'garbage'\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None
        assert json.loads(_cli("status", "--config", str(cfg), "--json").stdout)["roster"] == 3

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _recv_until(notify, "STOPPING=1")
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any("reload failed" in line["msg"] for line in lines)
    assert not (state / "control.sock").exists()
    assert _cli("status", "--state-dir", str(state)).returncode != 0

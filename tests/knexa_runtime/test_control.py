import os
import stat

import pytest
import trio

from knexa_runtime.control import ControlError, query, serve_control


async def test_status_round_trip_and_unknown_command(tmp_path):
    path = tmp_path / "control.sock"
    calls = []

    def status():
        calls.append(1)
        return {"round": 7, "peers": ["abc"]}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": status})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answer = await trio.to_thread.run_sync(query, path)
        assert answer == {"round": 7, "peers": ["abc"]} and calls == [1]
        other = await trio.to_thread.run_sync(lambda: query(path, "reboot"))
        assert "unknown command" in other["error"] and other["commands"] == ["status"]
        nursery.cancel_scope.cancel()
    assert not path.exists(), "the socket is removed on shutdown"


async def test_a_failing_handler_does_not_stop_the_server(tmp_path):
    path = tmp_path / "c.sock"
    state = {"fail": True}

    def status():
        if state["fail"]:
            raise RuntimeError("bug")
        return {"ok": True}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": status})
        with pytest.raises(ControlError):
            await trio.to_thread.run_sync(query, path)
        state["fail"] = False
        assert await trio.to_thread.run_sync(query, path) == {"ok": True}
        nursery.cancel_scope.cancel()


async def test_replaces_a_stale_socket(tmp_path):
    import socket

    path = tmp_path / "c.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # what a kill -9 leaves behind
    with pytest.raises(ControlError, match="not running"):
        query(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda: {"n": 1}})
        assert await trio.to_thread.run_sync(query, path) == {"n": 1}
        nursery.cancel_scope.cancel()


def test_no_daemon(tmp_path):
    with pytest.raises(ControlError, match="is the daemon running"):
        query(tmp_path / "none.sock")



"""One event per line in a daemon's log, py-libp2p's own errors and tracebacks included.

Before: `import libp2p` left its logger without a handler and with propagate=False, so every
outsider connection wrote a bare multi-line block (no timestamp) to the daemon's stderr. The
script below runs in its own process (logging setup is process-global) in the order the CLIs use:
our logging first, libp2p imported afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import logging, os, sys
    import multiaddr, trio
    from knexa_runtime.logs import setup_logging
    setup_logging("INFO", fmt=sys.argv[1])
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.noise.transport import PROTOCOL_ID, Transport
    from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
    from knexa_p2p.host import MemberGate, open_host
    from knexa_p2p.identity import Identity

    async def attempt(target, muxer):
        me = Identity.from_seed(os.urandom(32))
        noise = Transport(me.key_pair, noise_privkey=x25519().private_key)
        client = new_host(key_pair=me.key_pair, sec_opt={TProtocol(PROTOCOL_ID): noise}, muxer_opt=muxer)
        async with client.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(10):
                    await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(target)))
            except Exception:
                pass
            await trio.sleep(0.3)
            await client.close()

    async def main():
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as Y, Yamux
        async with open_host(Identity.from_seed(os.urandom(32))) as h:
            await attempt(h.addrs()[0], {TProtocol(MPLEX_PROTOCOL_ID): Mplex})   # muxer refused
        gate = MemberGate(lambda peer: False)
        async with open_host(Identity.from_seed(os.urandom(32)), gate=gate) as h:
            await attempt(h.addrs()[0], {TProtocol(Y): Yamux})                    # not a member
        # the shape of py-libp2p's [ADDCONN_FAIL] warning: a whole traceback pasted into the message
        try:
            raise ValueError("boom\\nsecond line")
        except ValueError:
            logging.getLogger("libp2p.network.swarm").warning(
                "[ADDCONN_FAIL] add_conn failed for peer %s: %r\\nTraceback (most recent call last):\\n"
                '  File "x.py", line 1, in f\\nValueError: boom', "QmX", "e", exc_info=True)
            logging.getLogger("knexa_node").exception("our own failure")
        print("DONE", file=sys.stderr)

    trio.run(main)
''')

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _run(fmt: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[-1] == "DONE", lines[-5:]
    return lines[:-1]


@pytest.mark.slow
def test_text_log_has_one_timestamped_line_per_event_libp2p_included():
    lines = _run("text")
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, bad
    assert any("libp2p.network.swarm: fail to upgrade mux" in line for line in lines)
    refused = [line for line in lines if "refused connection" in line]
    # py-libp2p's dialer retries: one line per refused connection attempt
    assert refused and all("reason=not_member" in x and "direction=inbound" in x for x in refused)
    folded = [line for line in lines if "[ADDCONN_FAIL]" in line]
    assert len(folded) == 1
    assert folded[0].endswith("| ValueError: boom | exc=ValueError: boom | second line")
    ours = [line for line in lines if "our own failure" in line]
    assert len(ours) == 1 and "Traceback (most recent call last): |" in ours[0]


@pytest.mark.slow
def test_json_log_is_one_object_per_line_libp2p_included():
    records = [json.loads(line) for line in _run("json")]
    assert any(r["logger"] == "libp2p.network.swarm" and r["msg"].startswith("fail to upgrade mux") for r in records)
    addconn = [r for r in records if "[ADDCONN_FAIL]" in r["msg"]]
    assert len(addconn) == 1 and "\n" not in addconn[0]["msg"] and "exc" not in addconn[0]
    refused = [r["reason"] for r in records if r.get("event") == "connection_refused"]
    assert refused and set(refused) == {"not_member"}

"""Guardrail-blocked answers never leave the real service.

A live in-process federation (real libp2p, CPM and two NodeService daemons) whose teachers
generate answers that leak an AWS key, a private-key block and a verbatim copy of their private
training text, filtered by the real :class:`knexa_node.guardrail.Guardrail`. Whatever a student
decrypts and distils is what left its teacher: it must hold only the clean answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from knexa_cpm.config import CpmSection
from knexa_cpm.service import CpmService, serve
from knexa_node.backend import Answer, GuardrailReport
from knexa_node.config import NodeSection
from knexa_node.guardrail import Guardrail
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from tests.support.fake_backend import FakeBackend

PRIVATE = ("def rotate_ledger(entries, shift):\n    total = 0\n    for index, entry in enumerate(entries):\n"
           "        total += entry.amount * (index + shift) - entry.fee // 3\n    return total % 1000003\n")
LEAKS = {
    "T/1": "    key = 'AKIAIOSFODNN7EXAMPLF'\n    return key\n",
    "T/2": "    return '''-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
           "-----END RSA PRIVATE KEY-----'''\n",
    "T/3": PRIVATE,
}
MARKERS = ("AKIAIOSFODNN7EXAMPLF", "PRIVATE KEY", "rotate_ledger", "entry.fee // 3")


class LeakyBackend(FakeBackend):
    """Half its answers leak; its outgoing filter is the real guardrail over its private text."""

    def __init__(self, name: str, seed: int) -> None:
        super().__init__(name, seed=seed, n_transfer=4)
        self.guardrail = Guardrail([PRIVATE])
        self.reports: list[GuardrailReport] = []

    def generate_answers(self, prompts: Sequence[tuple[str, str]]) -> list[Answer]:
        return [Answer(tid, LEAKS.get(tid, f"    return x + {i}\n")) for i, (tid, _) in enumerate(prompts)]

    def filter_outgoing(self, answers: Sequence[Answer]) -> tuple[list[Answer], GuardrailReport]:
        kept, report = self.guardrail.filter(answers)
        self.reports.append(report)
        return kept, report


async def test_blocked_answers_never_reach_the_student(tmp_path: Path) -> None:
    from knexa_lab.launcher import _free_ports

    ids = [str(load_or_create_identity(tmp_path / f"n{i}" / "identity.key").peer_id) for i in range(2)]
    ports = _free_ports(2)
    roster = tmp_path / "roster.toml"
    roster.write_text("".join(f'[[peer]]\nid = "{p}"\nname = "n{k}"\naddr = "/ip4/127.0.0.1/tcp/{port}/p2p/{p}"\n\n'
                              for k, (p, port) in enumerate(zip(ids, ports, strict=True))))
    cfg = CpmSection(federation="guard", state_dir=tmp_path / "cpm", roster_file=roster, round_timeout_s=10.0)
    cpm = CpmService(cfg)
    nodes: list[NodeService] = []
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(lambda task_status: serve(cfg, service=cpm, task_status=task_status))
        for i in range(2):
            d = tmp_path / f"n{i}"
            section = NodeSection(federation="guard", state_dir=d, cpm=addrs[0], roster_file=roster, rounds=2,
                                  listen=(f"/ip4/127.0.0.1/tcp/{ports[i]}",), directive_timeout_s=60,
                                  package_timeout_s=20, stream_timeout_s=10, final_eval=False, directive_poll_s=1.0)
            nodes.append(NodeService(section, LeakyBackend(f"leaky-{i}", seed=i),
                                     load_or_create_identity(d / "identity.key"), load_or_create_kem_key(d / "kem.key")))
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                for n in nodes:
                    inner.start_soon(n.run)
        nursery.cancel_scope.cancel()

    backends = [n.backend for n in nodes]
    assert isinstance(backends[0], LeakyBackend) and isinstance(backends[1], LeakyBackend)
    reports = [r for b in backends for r in b.reports]
    assert reports and all(r.blocked == 3 and r.kept == 1 for r in reports), reports
    reasons = {k for r in reports for k in r.reasons}
    assert {"aws_key", "private_key", "verbatim_overlap"} <= reasons
    distilled = [a for b in backends for batch in b.distilled for a in batch]
    assert distilled, "no package was received: the test would pass vacuously"
    assert all(a.task_id == "T/0" for a in distilled)
    received = sorted((tmp_path).glob("n*/received/round-*.json"))
    assert received
    for path in received:
        text = path.read_text()
        assert not any(m in text for m in MARKERS), path
    # the node's own logs and round records name reasons and counts, never the blocked text
    for path in tmp_path.glob("n*/rounds.jsonl"):
        assert not any(m in path.read_text() for m in MARKERS)

"""The CPM's reward log (stats["rewards"], rewritten with the state on every reward) is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from knexa_cpm import service as svc_mod
from knexa_cpm.config import CpmSection
from knexa_cpm.service import CpmService


def test_reward_log_keeps_only_the_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc_mod, "REWARD_LOG_KEEP", 5)
    cpm = CpmService(CpmSection(federation="bound", state_dir=tmp_path))
    for r in range(12):
        cpm._log_reward([r, "teacher", "student", 0.1 * r])
    assert [row[0] for row in cpm.stats["rewards"]] == [7, 8, 9, 10, 11]


def test_an_oversized_saved_log_is_trimmed_on_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpm = CpmService(CpmSection(federation="bound", state_dir=tmp_path))
    cpm.stats["rewards"] = [[r, "t", "s", 0.0] for r in range(50)]
    cpm.persist()
    monkeypatch.setattr(svc_mod, "REWARD_LOG_KEEP", 10)
    again = CpmService(CpmSection(federation="bound", state_dir=tmp_path))
    assert [row[0] for row in again.stats["rewards"]] == list(range(40, 50))

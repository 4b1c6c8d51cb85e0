"""scripts/gpu-check runs end to end on CPU (CI has no GPU): load, one LoRA step, generate, and a
2-node federation of real daemon processes, with a timing line per step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "KNEXA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu-check"), "--device", "cpu", "--model",
                           "tiny-gpt2", "--out", str(tmp_path / "fed")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "device cpu" in out and "dtype float32" in out
    for step in ("load + LoRA", "one LoRA step (4 ex)", "generate (4 prompts)", "2-node federation"):
        assert f"  {step}" in out, step
    assert "gpu-check: OK" in out and re.search(r"rewards [+-]\d", out)
    # the federation really ran: two node logs with a finished round each
    for i in (0, 1):
        assert (tmp_path / "fed" / f"node-{i}" / "rounds.jsonl").read_text().strip()

import contextlib
import os
import signal

import pytest

from tests.support.procs import processes_mentioning


@pytest.fixture
def reap(tmp_path):
    """Fails the test if any process mentioning tmp_path outlives it, and kills leftovers."""
    yield tmp_path
    left = processes_mentioning(str(tmp_path))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {left}"

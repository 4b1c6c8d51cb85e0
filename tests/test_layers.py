"""The architecture, enforced: protocol/ is sans-I/O; pure cores import no networking."""

import subprocess
import sys

import pytest


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_protocol_imports_no_io_or_ml():
    mods = _loaded_after_import("protocol")
    for banned in ("trio", "libp2p", "torch", "transformers", "socket"):
        assert banned not in mods, f"protocol pulled in {banned}"


@pytest.mark.parametrize("module", ["knexa_cpm.rounds", "knexa_cpm.policies"])
def test_cpm_cores_import_no_networking(module):
    mods = _loaded_after_import(module)
    for banned in ("trio", "libp2p", "torch"):
        assert banned not in mods, f"{module} pulled in {banned}"


def test_protocol_all_names_exist():
    import protocol

    for name in protocol.__all__:
        assert hasattr(protocol, name), name

"""constraints.txt pins every dependency to the version the committed results were measured with;
a dependency added to pyproject.toml without a pin would install whatever is newest."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_except_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    assert declared - {"torch"} <= set(_pins()), f"unpinned: {sorted(declared - {'torch'} - set(_pins()))}"
    assert "torch" not in _pins(), "torch is pinned by scripts/bootstrap.sh (CPU build), not here"


def test_pins_satisfy_pyproject() -> None:
    from packaging.requirements import Requirement

    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, project["dependencies"]):
        if req.name != "torch":
            assert req.specifier.contains(pins[_name(req.name)], prereleases=True), f"{req} vs {pins[_name(req.name)]}"


def test_this_environment_has_the_pinned_result_changing_packages() -> None:
    """The packages run-info.json records (they change numbers) are the pinned ones here."""
    from knexa_lab.experiment.provenance import PACKAGES

    pins = _pins()
    for name in PACKAGES:
        if name in pins:
            try:
                assert metadata.version(name) == pins[name], f"{name} {metadata.version(name)} != pin {pins[name]}"
            except metadata.PackageNotFoundError:
                pytest.fail(f"{name} is pinned but not installed")

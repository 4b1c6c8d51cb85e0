"""``run-info.json``: what produced these numbers (seeds, code version, packages, machine)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "git_commit", "package_versions", "run_info", "version_differences"]

#: distributions whose versions change results
PACKAGES: tuple[str, ...] = ("knexa", "torch", "transformers", "tokenizers", "peft", "numpy", "scipy", "libp2p",
                             "codebleu")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def version_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """``"name x -> y"`` for each package both records name with another version (a package one
    of them did not record, e.g. from before it was recorded, is not a difference)."""
    a, b = a or {}, b or {}
    return [f"{k} {a[k]} -> {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def git_commit(repo: Path | None = None) -> dict[str, Any] | None:
    """HEAD of the checkout this code runs from, and whether it has uncommitted changes; None
    outside a git checkout (an installed wheel) or without git."""
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def _device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_info(*, preset: str, seeds: list[int], mode: str, argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "preset": preset, "seeds": list(seeds), "mode": mode,
        "command": " ".join(argv if argv is not None else sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_commit(),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "packages": package_versions(), "machine": _device(),
    }

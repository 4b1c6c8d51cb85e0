"""`knexa-node init` / `knexa-cpm init`: a state directory, an identity key and a config file.

The config is rendered from a commented template shipped in the daemon's package, so what
`init` writes and what `deploy/config/*.example.toml` shows cannot drift apart (a test renders
the template with the example's values and compares).
"""

from __future__ import annotations

import os
from pathlib import Path
from string import Template

__all__ = ["InitError", "create_state_dir", "render_template", "write_config"]


class InitError(Exception):
    """Refusing to overwrite, or a path we cannot create."""


def render_template(template: Path, values: dict[str, str]) -> str:
    """Fill a daemon's commented config template (a `string.Template` with $placeholders)."""
    return Template(Path(template).read_text()).substitute(values)


def create_state_dir(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_config(path: Path, text: str, *, force: bool) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise InitError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode())

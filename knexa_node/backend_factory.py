"""Build the real backend from the node config (kept apart so service.py never imports torch)."""

from __future__ import annotations

from pathlib import Path

from .config import NodeConfig
from .errors import ConfigError

__all__ = ["create_backend"]


def create_backend(cfg: NodeConfig, public_dir: Path | None = None):  # -> TorchBackend (torch stays lazy)
    """The node's backend; `public_dir` (the verified public set) overrides the configured one."""
    from .models import default_cache_dir
    from .torch_backend import LearningConfig, TorchBackend

    try:
        learning = LearningConfig.from_dict(dict(cfg.learning))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[learning]: {exc}") from exc
    n = cfg.node
    assert n.data_dir is not None  # checked by cli._validate
    return TorchBackend.create(n.model, n.data_dir, learning, cache_dir=default_cache_dir(),
                               public_dir=public_dir or n.public_dir)

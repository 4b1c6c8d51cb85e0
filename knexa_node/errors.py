"""Node error root and exit codes (only cli.py maps exceptions to codes)."""

from __future__ import annotations

from enum import IntEnum

from knexa_runtime.config import ConfigError

__all__ = ["ConfigError", "ExitCode", "NodeError", "UnreachableError"]


class NodeError(Exception):
    """Root of the node's own errors."""


class UnreachableError(NodeError):
    """The CPM could not be reached within the start-up deadline."""


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure: systemd restarts us
    USAGE = 2  # bad flags (argparse)
    CONFIG = 20  # invalid configuration file, overrides or data paths
    MODEL = 21  # model missing, unknown alias, or not loadable offline
    NETWORK = 22  # cannot listen, or CPM unreachable at start-up

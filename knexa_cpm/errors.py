"""CPM error root and exit codes (only cli.py maps exceptions to codes)."""

from __future__ import annotations

from enum import IntEnum

from knexa_runtime.config import ConfigError

__all__ = ["ConfigError", "CpmError", "ExitCode", "StateError"]


class CpmError(Exception):
    """Root of the CPM's own errors."""


class StateError(CpmError):
    """The persisted state cannot be read (corrupt, or from an incompatible version)."""


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure: systemd restarts us
    USAGE = 2  # bad flags (argparse)
    CONFIG = 10  # invalid configuration file or overrides
    STATE = 11  # persisted state unreadable
    NETWORK = 12  # cannot listen on the configured address

"""The contract between the experiment engine and a method, and the metrics row schema.

A round, for every method (SPEC "One round t"): the engine runs each client's local epoch
(unless the method replaces it, ``local_training = False``), then calls
:meth:`Method.communicate` once, then evaluates every client and writes one metrics row per
client. So a method only implements the collaboration step: pairing and text KD, logit
ensembles, adapter averaging, proxy aggregation. Methods never evaluate Pass@k themselves;
they may call ``backend.validation_loss()`` (e.g. for Eq. 3 rewards).

Everything a method needs to resume after a crash goes through :meth:`Method.save` /
:meth:`Method.load` (the engine checkpoints clients' adapters and optimiser state itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from knexa_node.backend import Answer, EvalReport
    from knexa_node.torch_backend import TorchBackend

__all__ = ["METRIC_FIELDS", "Client", "ClientStep", "Method", "RoundContext", "check_settings", "package_bytes"]

#: Columns of ``metrics.jsonl`` / ``metrics.csv``: one row per (method, seed, round, client).
#: ``round`` counts completed rounds from 1; Pass@5/10 are None unless sampled that round;
#: ``partner`` is the teacher's client name for a student row (the match heatmap reads it);
#: ``local_steps`` .. ``tokens_generated`` are that round's budget (``TorchBackend.budget``);
#: ``categories`` is per-category Pass@1 on the test set where the benchmark labels categories.
METRIC_FIELDS: tuple[str, ...] = (
    "method", "seed", "round", "client", "model", "family",
    "pass_at_1", "pass_at_5", "pass_at_10", "codebleu", "val_loss", "train_loss",
    "role", "partner", "reward", "kd_loss", "bytes_sent", "bytes_received", "wall_s",
    "local_steps", "kd_steps", "tokens_trained", "tokens_generated", "categories",
)


@dataclass
class Client:
    """One federation member inside a simulation: its own model, adapter, data and seed."""

    index: int
    name: str  # "client-0", ...
    backend: TorchBackend
    seed: int


@dataclass
class ClientStep:
    """What the collaboration step did for one client this round (merged into its metrics row)."""

    #: local | teacher | student | aggregated | server_student (free text, shown in tables)
    role: str = "local"
    #: for a student: the teacher's client name (or "server"); for a teacher: the student's
    partner: str | None = None
    reward: float | None = None
    kd_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RoundContext:
    """Everything the engine hands a method for one round."""

    round_idx: int  # 0-based
    total_rounds: int
    clients: Sequence[Client]
    #: this (method, seed, round)'s generator: methods draw all randomness from it
    rng: np.random.Generator
    #: each client's evaluations of the rounds before this one (by client index), oldest first
    history: Mapping[int, Sequence[EvalReport]]
    #: the method's table of the preset (``[methods.<name>]``), e.g. policy, context, gamma
    settings: Mapping[str, Any]
    #: a directory private to this (method, seed) for server models and scratch files
    workdir: Path
    extras: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    """One federated-learning method. Instances live for one (method, seed) run."""

    #: registry name, e.g. "knexa-fl"; also the ``method`` column
    name: ClassVar[str]
    #: False when the method replaces the local LLM epoch (FedProxy trains a proxy instead)
    local_training: ClassVar[bool]

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        """Called once before round 0 (and again before resuming)."""
        ...

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        """The collaboration step of one round; returns a step per client index it touched."""
        ...

    def save(self, directory: Path) -> None:
        """Persist the method's own state (bandit, server model) after a round."""
        ...

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (called after :meth:`setup` when resuming)."""
        ...


def package_bytes(answers: Sequence[Answer]) -> int:
    """Wire size of a text package as the daemons would send it (msgpack PackageBody, unsealed).

    Sealing adds a constant ~100 bytes of nonce, tag and header; the body dominates.
    """
    from protocol import PackageBody, PackageItem, encode

    return len(encode(PackageBody(items=tuple(PackageItem(a.task_id, a.text) for a in answers), blocked=0)))


def check_settings(method: str, settings: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse a ``[methods.<name>]`` key the method does not know (a typo must not be ignored)."""
    known = sorted(known)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"unknown {method} settings {unknown}; known: {', '.join(known)}")

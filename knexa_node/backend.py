"""The boundary between the node's network service and its learning stack.

`service.py` only ever talks to a `ModelBackend`; `torch_backend.TorchBackend` is the real one
(transformers + peft) and `tests/support/fake_backend.py` a fake, so the network layer can be
tested without torch and the ML without a network. All methods block: the service runs them in a
worker thread (`trio.to_thread.run_sync`) behind one capacity limiter per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["Answer", "Distillation", "EvalReport", "GuardrailReport", "ModelBackend", "TrainReport"]


@dataclass(frozen=True, slots=True)
class TrainReport:
    """What one local epoch or one distillation pass did."""

    steps: int
    examples: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Distillation:
    """A student's Eq. 2 steps on a package, and the validation measure with and without it.

    ``loss_without`` is the counterfactual: the same steps from the same state without the
    teacher's term. ``loss_without - loss_with`` is what the teacher caused (Eq. 3's dL).
    ``measure`` names what both hold: "val_loss" (validation loss) or "val_error" (1 - executed
    validation Pass@1), so logs and round records can say which.
    """

    report: TrainReport
    loss_without: float
    loss_with: float
    measure: str = "val_loss"


@dataclass(frozen=True, slots=True)
class EvalReport:
    """A node's view of itself after a step; feeds the profile and the results table."""

    val_loss: float
    perplexity: float
    pass_at_1: float
    codebleu: float
    n_problems: int
    seconds: float
    #: greedy Pass@1 per problem category (knexa_node.categories) of the evaluated problems
    per_category: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One teacher answer for one transfer-set prompt (task ids name public X_u problems)."""

    task_id: str
    text: str


@dataclass(frozen=True, slots=True)
class GuardrailReport:
    """Counts of what the guardrail kept and blocked, by reason (never the blocked text)."""

    kept: int
    blocked: int
    reasons: dict[str, int] = field(default_factory=dict)


class ModelBackend(Protocol):
    """Everything a node does with its model and private data. Implementations block."""

    #: One of protocol.FAMILIES: the backbone family for the profile's one-hot block.
    family: str
    #: Human-readable model name (alias, path or hub id) for logs and results.
    model_name: str

    def train_local_epoch(self, round_idx: int) -> TrainReport:
        """One local LoRA epoch on the node's private shard (SPEC round step 1)."""
        ...

    def validation_loss(self) -> float:
        """Mean completion-token cross-entropy on the node's private validation split."""
        ...

    def evaluate(self, round_idx: int) -> EvalReport:
        """Validation loss/perplexity plus Pass@1 and CodeBLEU on the global test subset."""
        ...

    def validation_skills(self) -> tuple[float, dict[str, float]]:
        """(greedy Pass@1, {category: Pass@1}) on the node's private validation problems, executed
        in the sandbox. Categories without a validation problem are absent from the dict. Only
        called when the node shares its skills (``share_skills``)."""
        ...

    def category_histogram(self) -> np.ndarray:
        """Normalised 12-bin histogram of the node's training shard over protocol.CATEGORIES."""
        ...

    def transfer_prompts(self) -> list[tuple[str, str]]:
        """The public transfer set X_u as (task_id, prompt) pairs, identical on every node."""
        ...

    def generate_answers(self, prompts: Sequence[tuple[str, str]]) -> list[Answer]:
        """Teacher side: batched generation, answers cleaned to code, not yet filtered."""
        ...

    def filter_outgoing(self, answers: Sequence[Answer]) -> tuple[list[Answer], GuardrailReport]:
        """Guardrail: drop answers that leak secrets, PII or verbatim private training data."""
        ...

    def distill(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> TrainReport:
        """Student side: AKD (SPEC Eq. 2) on the teacher's re-tokenized text answers."""
        ...

    def learn(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> Distillation:
        """Student side of a P2P exchange: Eq. 2 steps plus the counterfactual loss for Eq. 3."""
        ...

    def integrate_local(self, round_idx: int, total_rounds: int) -> TrainReport:
        """The same Eq. 2 steps without a teacher (clients that are not students, equal budget)."""
        ...

    def adapter_fingerprint(self) -> str:
        """Hash of the trainable (LoRA) weights: changes when training touched them."""
        ...

    def base_fingerprint(self) -> str:
        """Hash of the frozen base weights: must never change."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """Persist the adapter (never the base) and optimizer state atomically."""
        ...

    def load_checkpoint(self, directory: Path) -> bool:
        """Restore a checkpoint written by save_checkpoint; False when there is none."""
        ...

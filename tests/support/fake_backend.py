"""A deterministic ModelBackend without torch, so the network layer is tested on its own.

Its "adapter" is a small numpy vector; training and distillation move it, and the validation
loss is its distance from a target, so KD from a package measurably lowers the loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knexa_node.backend import Answer, Distillation, EvalReport, GuardrailReport, TrainReport


class FakeBackend:
    family = "llama"

    def __init__(self, name: str = "fake", seed: int = 0, n_transfer: int = 4) -> None:
        self.model_name = name
        rng = np.random.default_rng(seed)
        self.base = rng.normal(size=8)
        self.adapter = rng.normal(size=8)
        self.target = np.zeros(8)
        self.n_transfer = n_transfer
        self.distilled: list[list[Answer]] = []

    def train_local_epoch(self, round_idx: int) -> TrainReport:
        self.adapter *= 0.95
        return TrainReport(steps=1, examples=4, mean_loss=self.validation_loss(), seconds=0.0)

    def validation_loss(self) -> float:
        return float(np.linalg.norm(self.adapter - self.target))

    def evaluate(self, round_idx: int) -> EvalReport:
        loss = self.validation_loss()
        return EvalReport(val_loss=loss, perplexity=float(np.exp(min(loss, 20))), pass_at_1=0.1,
                          codebleu=0.2, n_problems=4, seconds=0.0)

    def validation_skills(self) -> tuple[float, dict[str, float]]:
        """Per-category Pass@1 from the adapter's state: closer to the target solves more; the
        last category ("other") has no validation problem, so it is absent."""
        from protocol import CATEGORIES

        skill = 1.0 / (1.0 + self.validation_loss())
        per_cat = {c: round(skill * (i + 1) / len(CATEGORIES), 4) for i, c in enumerate(CATEGORIES[:-1])}
        return sum(per_cat.values()) / len(per_cat), per_cat

    def category_histogram(self) -> np.ndarray:
        h = np.ones(12)
        return h / h.sum()

    def transfer_prompts(self) -> list[tuple[str, str]]:
        return [(f"T/{i}", f"def f{i}(x):\n") for i in range(self.n_transfer)]

    def generate_answers(self, prompts: Sequence[tuple[str, str]]) -> list[Answer]:
        return [Answer(tid, f"    return x + {i}  # from {self.model_name}\n") for i, (tid, _) in enumerate(prompts)]

    def filter_outgoing(self, answers: Sequence[Answer]) -> tuple[list[Answer], GuardrailReport]:
        return list(answers), GuardrailReport(kept=len(answers), blocked=0, reasons={})

    def distill(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> TrainReport:
        self.distilled.append(list(answers))
        self.adapter *= 0.5
        return TrainReport(steps=1, examples=len(answers), mean_loss=0.0, seconds=0.0)

    def integrate_local(self, round_idx: int, total_rounds: int) -> TrainReport:
        self.adapter *= 0.9
        return TrainReport(steps=1, examples=0, mean_loss=self.validation_loss(), seconds=0.0)

    def learn(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> Distillation:
        """The counterfactual is the local-only step; the package's step moves further."""
        loss_without = float(np.linalg.norm(self.adapter * 0.9 - self.target))
        report = self.distill(answers, round_idx, total_rounds)
        return Distillation(report=report, loss_without=loss_without, loss_with=self.validation_loss())

    def adapter_fingerprint(self) -> str:
        return hashlib.sha256(self.adapter.tobytes()).hexdigest()[:16]

    def base_fingerprint(self) -> str:
        return hashlib.sha256(self.base.tobytes()).hexdigest()[:16]

    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "adapter.npy", self.adapter)

    def load_checkpoint(self, directory: Path) -> bool:
        path = directory / "adapter.npy"
        if not path.exists():
            return False
        self.adapter = np.load(path)
        return True

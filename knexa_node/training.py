"""Local LoRA epochs, adaptive knowledge distillation (SPEC Eq. 2) and validation loss.

All three share one objective: mean cross-entropy over *completion* tokens only; the prompt is
masked (label -100), so a node learns to write solutions, not to repeat problem statements.
Loss is normalised by the number of completion tokens in the whole effective batch (micro-batches
of ``micro_batch`` accumulated to ``effective_batch``), so accumulation gives exactly the gradient
of one big batch, whatever the micro-batch split.

Optimiser (SPEC "Hyperparameters"): AdamW, betas (0.9, 0.98), eps 1e-6, lr 3e-5 local and 5e-5
for KD, linear warmup over the first 2% of steps, gradient-norm clip 1.0. SPEC names no decay and
a federation may run open-ended (``rounds = 0``), so the rate stays constant after warmup.

Determinism: every phase (local epoch, KD, validation) seeds its own shuffling and dropout from
``(seed, round, phase)``, so a resumed node replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backend import TrainReport

__all__ = [
    "Budget",
    "Example",
    "Snapshot",
    "TrainSettings",
    "Trainer",
    "a_kd_schedule",
    "collate",
    "encode",
    "perplexity",
    "phase_seed",
    "token_loss_sum",
]

logger = logging.getLogger(__name__)
IGNORE = -100
#: families whose causal-LM head is a plain projection of the backbone's last hidden state
_PLAIN_HEAD = {"llama", "qwen", "qwen2", "mistral", "gpt_neox", "bloom", "gpt2", "phi"}
_PHASES = {"local": 1, "kd": 2, "val": 3, "gen": 4}


@dataclass(frozen=True, slots=True)
class TrainSettings:
    lr: float = 3e-5
    kd_lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.0
    micro_batch: int = 8
    effective_batch: int = 32
    warmup_steps: int = 1
    grad_clip: float = 1.0
    max_len: int = 512
    progress: bool = False


@dataclass(slots=True)
class Budget:
    """Training and generation spent by one node, for equal-budget comparisons.

    ``local_steps`` counts optimizer steps whose loss includes the node's own data (local epochs
    and every Eq. 2 step), ``kd_steps`` those that also include a teacher's text; a reward's
    counterfactual branch is undone and not counted. Tokens are padded-free sequence lengths.
    """

    local_steps: int = 0
    kd_steps: int = 0
    tokens_trained: int = 0
    tokens_generated: int = 0

    def count_step(self, *, kd: bool, local: bool) -> None:
        """Count one optimizer step: every trainer (Eq. 2, logit KD, local epochs) goes through
        this one rule, so table4's budget columns mean the same thing for every method."""
        self.kd_steps += int(kd)
        self.local_steps += int(local)

    def as_dict(self) -> dict[str, int]:
        return {"local_steps": self.local_steps, "kd_steps": self.kd_steps,
                "tokens_trained": self.tokens_trained, "tokens_generated": self.tokens_generated}


@dataclass(slots=True)
class Snapshot:
    """A trainer's state at one moment (see :meth:`Trainer.snapshot`)."""

    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    budget: Budget
    rng: torch.Tensor


@dataclass(frozen=True, slots=True)
class Example:
    """Token ids of prompt + completion (+eos) and labels with the prompt masked."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        # the first label is never predicted (nothing precedes it)
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def phase_seed(seed: int, round_idx: int, phase: str) -> int:
    """A 32-bit seed for one phase of one round, independent of what ran before."""
    return int(np.random.SeedSequence([seed, max(round_idx, 0), _PHASES[phase]]).generate_state(1)[0])


def a_kd_schedule(round_idx: int, total_rounds: int, start: float = 0.2, end: float = 0.5) -> float:
    """SPEC Eq. 2 weight: a_KD rises linearly from ``start`` (first round) to ``end`` (last)."""
    if total_rounds <= 1:
        return end
    frac = min(max(round_idx / (total_rounds - 1), 0.0), 1.0)
    return start + (end - start) * frac


def encode(tokenizer: Any, prompt: str, completion: str, max_len: int) -> Example:
    """Tokenize prompt and completion separately (as generation sees them) and mask the prompt.

    Over-long pairs keep the end of the prompt (closest to the answer) and at least half the
    window for the completion.
    """
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    if len(p) + len(c) > max_len:
        keep_c = min(len(c), max_len - min(len(p), max_len // 2))
        keep_p = max_len - keep_c
        p, c = (p[-keep_p:] if keep_p else []), c[:keep_c]
    return Example(tuple(p + c), tuple([IGNORE] * len(p) + c))


def collate(batch: Sequence[Example], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch (labels padded with -100)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], model_type: str = "") -> tuple[torch.Tensor, int]:
    """Summed next-token CE over completion tokens, and how many there were.

    For plain-head families only the completion positions go through the LM head (the full
    vocab x sequence logits of a 49k-vocab model are the biggest tensor of a CPU step).
    """
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE
    n = int(targets_mask.sum())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if model_type in _PLAIN_HEAD and backbone is not None:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][targets_mask])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][targets_mask]
    loss = F.cross_entropy(logits.float(), labels[:, 1:][targets_mask], reduction="sum")
    return loss, n


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


class Trainer:
    """One AdamW over the adapter's trainable parameters, shared by local epochs and KD."""

    def __init__(self, model: Any, tokenizer: Any, settings: TrainSettings, *, seed: int,
                 model_type: str, device: Any) -> None:
        if settings.effective_batch % settings.micro_batch:
            raise ValueError("effective_batch must be a multiple of micro_batch")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.seed = seed
        self.model_type = model_type
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                           eps=settings.eps, weight_decay=settings.weight_decay)
        self.step = 0  #: optimizer steps taken (drives the warmup)
        #: the training budget spent so far (see :class:`Budget`); equal-budget tables read it
        self.budget = Budget()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Example]:
        return [encode(self.tokenizer, p, c, self.settings.max_len) for p, c in pairs]

    def lr_at(self, base_lr: float) -> float:
        """Linear warmup over the first ``warmup_steps`` optimizer steps, then constant."""
        return base_lr * min(1.0, (self.step + 1) / max(self.settings.warmup_steps, 1))

    def _step(self, groups: Sequence[tuple[float, Sequence[Example]]], base_lr: float,
              seed: int | None = None) -> list[float]:
        """One optimizer step on sum_g weight_g * mean-token-CE(group_g); returns each group's CE.

        With ``seed``, group g's dropout draws come from ``seed + g``: a group's forward passes
        then do not depend on whether an earlier group was empty, which keeps the reward's
        counterfactual branch (:meth:`kd_phase`) identical to the real one except for the
        teacher's term.
        """
        s = self.settings
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for g, (weight, examples) in enumerate(groups):
            total = sum(e.n_targets for e in examples)
            if total == 0:
                losses.append(0.0)
                continue
            if seed is not None:
                torch.manual_seed(seed + g)
            acc = 0.0
            ordered = sorted(examples, key=lambda e: len(e.input_ids))  # less padding per micro-batch
            for micro in _chunks(ordered, s.micro_batch):
                loss_sum, _ = token_loss_sum(self.model, collate(micro, self.pad_id, self.device), self.model_type)
                (loss_sum * (weight / total)).backward()
                acc += float(loss_sum.detach())
            losses.append(acc / total)
            self.budget.tokens_trained += sum(len(e.input_ids) for e in examples)
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        lr = self.lr_at(base_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return losses

    def train_epoch(self, examples: Sequence[Example], round_idx: int) -> TrainReport:
        """One pass over the private shard in effective batches (SPEC round step 1)."""
        t0 = time.perf_counter()
        seed = phase_seed(self.seed, round_idx, "local")
        torch.manual_seed(seed)
        order = np.random.default_rng(seed).permutation(len(examples))
        batches = list(_chunks([examples[i] for i in order], self.settings.effective_batch))
        self.model.train()
        losses = []
        for batch in tqdm(batches, desc=f"local r{round_idx}", disable=not self.settings.progress, leave=False):
            losses.append(self._step([(1.0, batch)], self.settings.lr)[0])
            self.budget.count_step(kd=False, local=True)
        report = TrainReport(steps=len(batches), examples=len(examples),
                             mean_loss=float(np.mean(losses)) if losses else float("nan"),
                             seconds=time.perf_counter() - t0)
        logger.info("local epoch round=%d steps=%d examples=%d loss=%.4f %.1fs", round_idx, report.steps,
                    report.examples, report.mean_loss, report.seconds)
        return report

    def kd_phase(self, kd: Sequence[Example], local: Sequence[Example], a_kd: float, round_idx: int,
                 steps: int) -> TrainReport:
        """AKD, SPEC Eq. 2: ``steps`` optimizer steps on (1 - a_KD) * L_local + a_KD * CE(teacher text).

        Every step takes the next effective batch of KD pairs (cycling through a shuffled order)
        and the next effective batch of local examples, at the KD learning rate. The number of
        steps and the local batches depend only on (seed, round), never on the package: with an
        empty ``kd`` this is exactly the step a node takes without a teacher, which is both the
        equal-budget step of clients that are not students and the reward's counterfactual.
        """
        t0 = time.perf_counter()
        seed = phase_seed(self.seed, round_idx, "kd")
        local_rng = np.random.default_rng([seed, 1])
        kd_rng = np.random.default_rng([seed, 2])
        self.model.train()
        eff = self.settings.effective_batch
        local_order = [local[i] for i in local_rng.permutation(len(local))]
        kd_order: list[Example] = []
        l_cur = k_cur = 0
        losses, kd_losses = [], []
        for step in tqdm(range(steps), desc=f"kd r{round_idx}", disable=not self.settings.progress, leave=False):
            kd_batch: list[Example] = []
            while kd and len(kd_batch) < min(eff, len(kd)):
                if k_cur >= len(kd_order):
                    kd_order, k_cur = [kd[i] for i in kd_rng.permutation(len(kd))], 0
                kd_batch.append(kd_order[k_cur])
                k_cur += 1
            local_batch = [local_order[(l_cur + i) % len(local_order)] for i in range(eff if local_order else 0)]
            l_cur += len(local_batch)
            kd_ce, local_ce = self._step([(a_kd, kd_batch), (1.0 - a_kd, local_batch)], self.settings.kd_lr,
                                         seed=seed + 7919 * step)
            losses.append(a_kd * kd_ce + (1.0 - a_kd) * local_ce if kd_batch else (1.0 - a_kd) * local_ce)
            if kd_batch:
                kd_losses.append(kd_ce)
            self.budget.count_step(kd=bool(kd_batch), local=bool(local_batch))
        report = TrainReport(steps=steps, examples=len(kd),
                             mean_loss=float(np.mean(losses)) if losses else float("nan"),
                             seconds=time.perf_counter() - t0)
        logger.info("AKD round=%d a_kd=%.3f steps=%d pairs=%d eq2_loss=%.4f kd_ce=%.4f %.1fs", round_idx, a_kd,
                    steps, len(kd), report.mean_loss, float(np.mean(kd_losses)) if kd_losses else float("nan"),
                    report.seconds)
        return report

    def distill(self, kd: Sequence[Example], local: Sequence[Example], a_kd: float, round_idx: int,
                epochs: int = 1) -> TrainReport:
        """Eq. 2 over ``epochs`` passes of the KD pairs (one step per effective batch of them)."""
        steps = epochs * math.ceil(len(kd) / self.settings.effective_batch) if kd else 0
        return self.kd_phase(kd, local, a_kd, round_idx, steps)

    def snapshot(self) -> Snapshot:
        """Everything a training step changes: adapter tensors, optimizer, step, budget, RNG."""
        return Snapshot(params=[p.detach().clone() for p in self.params],
                        optimizer=copy.deepcopy(self.optimizer.state_dict()), step=self.step,
                        budget=copy.copy(self.budget), rng=torch.get_rng_state())

    def restore(self, snap: Snapshot) -> None:
        """Undo every training step taken since ``snap`` (exactly: same tensors, same state)."""
        with torch.no_grad():
            for p, saved in zip(self.params, snap.params, strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        self.step = snap.step
        self.budget = copy.copy(snap.budget)
        torch.set_rng_state(snap.rng)

    @torch.no_grad()
    def validation_loss(self, examples: Sequence[Example]) -> float:
        """Mean completion-token CE over ``examples`` (nan when there are none)."""
        was_training = self.model.training
        self.model.eval()
        total_loss, total_n = 0.0, 0
        ordered = sorted(examples, key=lambda e: len(e.input_ids))
        for micro in _chunks(ordered, self.settings.micro_batch):
            loss_sum, n = token_loss_sum(self.model, collate(micro, self.pad_id, self.device), self.model_type)
            total_loss += float(loss_sum)
            total_n += n
        self.model.train(was_training)
        return total_loss / total_n if total_n else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "budget": self.budget.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.budget = Budget(**state.get("budget", {}))


def perplexity(loss: float) -> float:
    """exp(mean CE), capped so a diverged model reports a large finite number."""
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("inf")

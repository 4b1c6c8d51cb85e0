"""The real :class:`~knexa_node.backend.ModelBackend`: a frozen base LLM + LoRA, on torch/peft.

``TorchBackend.create(model, data_dir, cfg, cache_dir=...)`` resolves the model (alias, path,
hub id in the local cache, tiny preset or the embedded SmolLM2), loads this node's data
(:func:`knexa_node.data.load_node_data`: ``data_dir/train.jsonl``, ``data_dir/val.jsonl`` and the
public ``test.jsonl``/``transfer.jsonl`` in ``public_dir``, default ``data_dir/../public``) and
wires the pieces:

* local epoch and AKD (SPEC Eq. 2): :mod:`knexa_node.training`;
* teacher answers and Pass@1 samples: :mod:`knexa_node.generation`;
* outgoing filter: :class:`knexa_node.guardrail.Guardrail` over the node's own private texts;
* metrics: :mod:`knexa_node.evaluation` (sandboxed tests, CodeBLEU).

Every method blocks; the service calls them from one worker thread at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backend import Answer, Distillation, EvalReport, GuardrailReport, TrainReport
from .categories import histogram
from .data import NodeData, load_node_data
from .generation import (
    GenerationSettings,
    body_of,
    format_prompt,
    generate,
    training_target,
    uses_chat,
)
from .models import (
    LoadedModel,
    LoraSettings,
    ModelLoadError,
    ModelSpec,
    default_cache_dir,
    load_model,
    resolve_model,
)
from .training import Trainer, TrainSettings, a_kd_schedule, perplexity, phase_seed

__all__ = ["LearningConfig", "TorchBackend"]

logger = logging.getLogger(__name__)
_ADAPTER = "adapter_model.safetensors"
_STATE = "trainer_state.pt"
_META = "meta.json"


@dataclass(frozen=True, slots=True)
class LearningConfig:
    """Every knob of the learning stack (the ``[learning]`` table). Defaults follow SPEC."""

    # LoRA (SPEC: rank 8, alpha 32)
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    #: comma-separated module names; "" = the family's default (models.lora_targets)
    lora_targets: str = ""
    # optimisation (SPEC "Hyperparameters")
    lr: float = 3e-5
    kd_lr: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    #: examples per forward pass; 0 = auto: 8 on CUDA, 1 on CPU. Loss is normalised over the
    #: whole effective batch, so any split gives the same optimizer step (SPEC batch 8 /
    #: effective 32 is about the step); on CPU, micro-batch 1 avoids padding and was both faster
    #: and 4.6x leaner than 8 for SmolLM2-135M (33 s vs 59 s, 2.5 vs 11.5 GB per 8-example step)
    micro_batch: int = 0
    effective_batch: int = 32
    warmup_frac: float = 0.02
    grad_clip: float = 1.0
    #: tokens per training example (prompt + completion) and per generation prompt
    max_len: int = 512
    local_epochs: int = 1
    #: recompute activations in backward: ~1/3 more compute, a fraction of the memory (CPU nodes
    #: sharing a machine); the gradient is the same
    gradient_checkpointing: bool = False
    # AKD (SPEC Eq. 2): a_KD linear from a_kd_start to a_kd_end over total_rounds
    a_kd_start: float = 0.2
    a_kd_end: float = 0.5
    kd_epochs: int = 1
    total_rounds: int = 20
    # generation (teacher answers; evaluation is always greedy)
    max_new_tokens: int = 128
    #: 0 = greedy teacher answers
    temperature: float = 0.0
    top_p: float = 0.95
    gen_batch: int = 8
    # evaluation
    #: the first N problems of the global test set are evaluated each round (0 = none)
    eval_problems: int = 20
    sandbox_timeout_s: float = 5.0
    #: concurrent sandboxes; 0 = one per CPU
    sandbox_workers: int = 0
    # knowledge packages
    #: prompts per package: the first N of the public transfer set (0 = all)
    transfer_size: int = 16
    guardrail_ngram: int = 10
    guardrail_threshold: float = 0.6
    # reward (SPEC Eq. 3's dL; docs/method.md "Reward")
    #: what the counterfactual compares: "val_loss" (the paper's validation loss) or
    #: "val_error" (1 - greedy Pass@1 on the validation problems, executed in the sandbox)
    reward_measure: str = "val_loss"
    #: a teacher answers only X_u prompts of categories where its greedy Pass@1 on its own
    #: validation problems is at least this; 0 = answer every prompt (the paper)
    teach_min_skill: float = 0.0
    # runtime
    #: torch intra-op threads; 0 = torch's default
    threads: int = 0
    seed: int = 42
    #: "auto" (CUDA + bf16 when present, else CPU fp32), "cpu", "cuda", "cuda:N"
    device: str = "auto"
    #: "auto" (chat template + pre-filled fenced prompt when the tokenizer has one), "raw", "chat"
    prompt_format: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        problems = []
        positive = ("lora_rank", "lora_alpha", "effective_batch", "max_len", "max_new_tokens",
                    "gen_batch", "guardrail_ngram", "total_rounds", "sandbox_timeout_s")
        problems += [f"{k} must be > 0" for k in positive if getattr(self, k) <= 0]
        nonneg = ("micro_batch", "lr", "kd_lr", "weight_decay", "grad_clip", "local_epochs", "kd_epochs",
                  "eval_problems", "transfer_size", "threads", "sandbox_workers", "temperature")
        problems += [f"{k} must be >= 0" for k in nonneg if getattr(self, k) < 0]
        unit = ("lora_dropout", "warmup_frac", "a_kd_start", "a_kd_end", "top_p", "guardrail_threshold",
                "teach_min_skill")
        problems += [f"{k} must be in [0, 1]" for k in unit if not 0.0 <= getattr(self, k) <= 1.0]
        if self.micro_batch > 0 and self.effective_batch % self.micro_batch:
            problems.append("effective_batch must be a multiple of micro_batch")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.reward_measure not in REWARD_MEASURES:
            problems.append(f"reward_measure must be one of {REWARD_MEASURES}, got {self.reward_measure!r}")
        if self.prompt_format not in ("auto", "raw", "chat"):
            problems.append(f"prompt_format must be auto, raw or chat, got {self.prompt_format!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearningConfig:
        """Build from a plain mapping (unknown keys are an error, listing the known ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown learning settings {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)


#: what a student's counterfactual compares (LearningConfig.reward_measure)
REWARD_MEASURES = ("val_loss", "val_error")

#: sandbox verdicts by (task id, sha256 of prompt + completion); see TorchBackend._execute
_VERDICTS: dict[tuple[str, str], bool] = {}
_VERDICTS_MAX = 200_000


def _by_category(problems: Sequence[dict[str, str]], passed: Sequence[bool]) -> dict[str, float]:
    """Mean pass per category (knexa_node.categories.classify_name of each prompt)."""
    from .categories import classify_name

    sums: dict[str, list[int]] = {}
    for p, ok in zip(problems, passed, strict=True):
        acc = sums.setdefault(classify_name(p["prompt"]), [0, 0])
        acc[0] += int(ok)
        acc[1] += 1
    return {c: n / total for c, (n, total) in sorted(sums.items())}


def _sha256(tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TorchBackend:
    """One node's model, data and optimiser state. See the module docstring."""

    def __init__(self, spec: ModelSpec, loaded: LoadedModel, data: NodeData, cfg: LearningConfig) -> None:
        from .profile import family_of

        self.cfg = cfg
        self.spec = spec
        self.model_name = spec.name
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.family = family_of(loaded.model_type)
        self.data = data
        eff = cfg.effective_batch
        # auto micro-batch: the largest divisor of eff up to 8 on CUDA, 1 on CPU (see the field)
        micro = cfg.micro_batch or (next(m for m in range(min(8, eff), 0, -1) if eff % m == 0)
                                    if loaded.device.type == "cuda" else 1)
        n_transfer = len(self.transfer_prompts())
        steps_per_round = (cfg.local_epochs * math.ceil(len(data.train) / eff)
                           + cfg.kd_epochs * math.ceil(max(n_transfer, 1) / eff))
        warmup = max(1, math.ceil(cfg.warmup_frac * cfg.total_rounds * steps_per_round))
        self.trainer = Trainer(self.model, self.tokenizer, TrainSettings(
            lr=cfg.lr, kd_lr=cfg.kd_lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, micro_batch=micro, effective_batch=eff,
            warmup_steps=warmup, grad_clip=cfg.grad_clip, max_len=cfg.max_len, progress=cfg.progress,
        ), seed=cfg.seed, model_type=loaded.model_type, device=loaded.device)
        self._chat = uses_chat(self.tokenizer, cfg.prompt_format)
        self._train = self._encode([(p["prompt"], p["canonical_solution"]) for p in data.train])
        self._val = self._encode([(p["prompt"], p["canonical_solution"]) for p in data.val])
        self._transfer = {p["task_id"]: p for p in data.transfer}
        self._guardrail: Any = None
        self._gen_calls = 0
        self._base_fp = self.base_fingerprint()
        logger.info("backend ready: model=%s family=%s train=%d val=%d test=%d transfer=%d micro_batch=%d "
                    "effective_batch=%d warmup=%d steps", spec.name, self.family, len(data.train), len(data.val),
                    len(data.test), n_transfer, micro, eff, warmup)

    @classmethod
    def create(cls, model: str, data_dir: Path, cfg: LearningConfig, *, cache_dir: Path | None = None,
               public_dir: Path | None = None) -> TorchBackend:
        """Resolve and load ``model``, read this node's data, and build the optimiser.

        Args:
            model: alias, local path, cached hub id, tiny preset or "smollm2-135m".
            data_dir: this node's folder (train.jsonl, val.jsonl); nothing else of the split is read.
            cfg: the ``[learning]`` settings; ``cfg.seed`` should differ per node.
            cache_dir: where tiny/embedded checkpoints are built (default $KNEXA_CACHE or ~/.cache/knexa).
            public_dir: test.jsonl and transfer.jsonl (default ``data_dir/../public``).

        Raises:
            ModelLoadError: the model is unknown, missing or not loadable offline.
            FileNotFoundError: a data file is missing.
        """
        if not cfg.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        data = load_node_data(Path(data_dir), public_dir)
        spec = resolve_model(model, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        loaded = load_model(spec, lora=LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets),
                            device=cfg.device, threads=cfg.threads, seed=cfg.seed,
                            gradient_checkpointing=cfg.gradient_checkpointing)
        return cls(spec, loaded, data, cfg)

    # ---- training ---------------------------------------------------------------------------
    def _fmt(self, prompt: str) -> str:
        return format_prompt(self.tokenizer, prompt, self.cfg.prompt_format)

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        """Training examples in the prompt format generation uses (see generation.training_target)."""
        return self.trainer.encode_pairs([(self._fmt(p), training_target(p, c, self._chat)) for p, c in pairs])

    def train_local_epoch(self, round_idx: int) -> TrainReport:
        reports = [self.trainer.train_epoch(self._train, round_idx * max(self.cfg.local_epochs, 1) + e)
                   for e in range(self.cfg.local_epochs)]
        if not reports:
            return TrainReport(steps=0, examples=0, mean_loss=0.0, seconds=0.0)
        return TrainReport(steps=sum(r.steps for r in reports), examples=sum(r.examples for r in reports),
                           mean_loss=float(np.mean([r.mean_loss for r in reports])),
                           seconds=sum(r.seconds for r in reports))

    def validation_loss(self) -> float:
        return self.trainer.validation_loss(self._val)

    def validation_skills(self) -> tuple[float, dict[str, float]]:
        """(greedy Pass@1, Pass@1 per category) on this node's validation problems (sandboxed)."""
        problems = self.data.val
        if not problems:
            return 0.0, {}
        passed = self._greedy_passes(problems)
        return sum(passed) / len(passed), _by_category(problems, passed)

    def validation_error(self) -> float:
        """1 - greedy Pass@1 on this node's validation problems (run in the sandbox).

        Why: validation *loss* is dominated by the boilerplate every answer shares (signature,
        indentation, return), so a package from any teacher lowers it by teaching format; whether
        a category's hidden rule was learnt moves a handful of tokens. Executing the validation
        problems' unit tests measures exactly the skill a teacher can add (docs/skills.md,
        "Which reward").
        """
        return 1.0 - self.validation_skills()[0]

    def reward_loss(self) -> float:
        """The quantity whose drop is the student's dL (``cfg.reward_measure``)."""
        return self.validation_error() if self.cfg.reward_measure == "val_error" else self.validation_loss()

    def _kd_pairs(self, answers: Sequence[Answer], round_idx: int) -> list[tuple[str, str]]:
        """(prompt, teacher text) from our own copy of X_u: a teacher never chooses what we train on."""
        pairs = [(self._transfer[a.task_id]["prompt"], a.text) for a in answers
                 if a.task_id in self._transfer and a.text.strip()]
        if len(pairs) < len(answers):
            logger.warning("AKD round=%d: ignored %d of %d answers (unknown task id or empty)", round_idx,
                           len(answers) - len(pairs), len(answers))
        return pairs

    def _a_kd(self, round_idx: int, total_rounds: int) -> float:
        horizon = total_rounds if total_rounds > 1 else self.cfg.total_rounds
        return a_kd_schedule(round_idx, horizon, self.cfg.a_kd_start, self.cfg.a_kd_end)

    @property
    def kd_steps_per_round(self) -> int:
        """Eq. 2 steps a node takes each round, teacher or not: fixed by the config, never by
        what a package holds, so every client of every method spends the same budget."""
        n = len(self.transfer_prompts())
        return self.cfg.kd_epochs * math.ceil(max(n, 1) / self.cfg.effective_batch)

    def distill(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> TrainReport:
        """AKD (SPEC Eq. 2) on the teacher's text, re-tokenized with this node's tokenizer.

        Prompts come from this node's own copy of X_u by task id; unknown ids and empty answers
        are dropped (no usable pair: no step). ``total_rounds`` drives the a_KD schedule when
        > 1, else ``cfg.total_rounds`` does (a service running open-ended).
        """
        t0 = time.perf_counter()
        pairs = self._kd_pairs(answers, round_idx)
        if not pairs:
            return TrainReport(steps=0, examples=0, mean_loss=0.0, seconds=time.perf_counter() - t0)
        return self.trainer.distill(self._encode(pairs), self._train, self._a_kd(round_idx, total_rounds),
                                    round_idx, epochs=self.cfg.kd_epochs)

    def integrate_local(self, round_idx: int, total_rounds: int) -> TrainReport:
        """The Eq. 2 steps without a teacher: what a client that is not a student does each round."""
        return self.trainer.kd_phase([], self._train, self._a_kd(round_idx, total_rounds), round_idx,
                                     self.kd_steps_per_round)

    def learn(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> Distillation:
        """Student side of an exchange: Eq. 2 steps with the teacher's text, and what they earned.

        The reward must measure the teacher, not the student's own local term (which Eq. 2 mixes
        in): from one snapshot of adapter, optimizer and RNG, take the round's Eq. 2 steps once
        *without* the teacher term (the counterfactual, exactly :meth:`integrate_local`), measure
        the validation loss, roll back, take them *with* it and measure again. Local batches,
        learning rates and dropout are identical in both branches, so ``loss_without -
        loss_with`` is the teacher's contribution. Costs one more phase of LoRA steps.
        """
        t0 = time.perf_counter()
        snap = self.trainer.snapshot()
        self.integrate_local(round_idx, total_rounds)
        loss_without = self.reward_loss()
        self.trainer.restore(snap)
        report = self.kd_steps(answers, round_idx, total_rounds)
        loss_with = self.reward_loss()
        logger.info("learn round=%d pairs=%d %s without teacher %.4f, with %.4f (%.1fs)", round_idx,
                    report.examples, self.cfg.reward_measure, loss_without, loss_with, time.perf_counter() - t0)
        return Distillation(report=report, loss_without=loss_without, loss_with=loss_with,
                            measure=self.cfg.reward_measure)

    def kd_steps(self, answers: Sequence[Answer], round_idx: int, total_rounds: int) -> TrainReport:
        """The round's Eq. 2 steps with the teacher's text: :meth:`learn`'s second branch, unmeasured."""
        kd = self._encode(self._kd_pairs(answers, round_idx))
        return self.trainer.kd_phase(kd, self._train, self._a_kd(round_idx, total_rounds), round_idx,
                                     self.kd_steps_per_round)

    def budget(self) -> dict[str, int]:
        """Training and generation spent so far (:class:`knexa_node.training.Budget`)."""
        return self.trainer.budget.as_dict()

    # ---- generation and evaluation ----------------------------------------------------------
    def _generate(self, prompts: list[str], entry_points: list[str | None], *, greedy: bool,
                  teaching: bool = False) -> list[str]:
        cfg = self.cfg
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
                                      top_p=cfg.top_p, batch_size=cfg.gen_batch, max_prompt_len=cfg.max_len,
                                      progress=cfg.progress)
        seed = phase_seed(cfg.seed, self._gen_calls, "gen")
        self._gen_calls += 1
        result = generate(self.model, self.tokenizer, [self._fmt(p) for p in prompts], settings=settings,
                          entry_points=entry_points, seed=seed, device=self.loaded.device)
        if teaching:  # evaluation generates the same for every method; the budget counts teaching
            self.trainer.budget.tokens_generated += int(result.new_tokens)
        logger.info("generated %d answers (%d tokens) in %.1fs", len(prompts), result.new_tokens, result.seconds)
        return [t[0] for t in result.texts]

    def evaluate(self, round_idx: int) -> EvalReport:
        """Val loss/perplexity; greedy Pass@1 and CodeBLEU on the first ``eval_problems`` tests."""
        from .evaluation import codebleu, pass_at_k_report

        t0 = time.perf_counter()
        loss = self.validation_loss()
        problems = self.data.test[:self.cfg.eval_problems]
        pass1 = bleu = 0.0
        per_category = None
        if problems:
            completions = self._generate([p["prompt"] for p in problems], [p["entry_point"] for p in problems],
                                         greedy=True)
            results = self._execute(problems, completions)
            pass1 = pass_at_k_report(results, ks=(1,)).get(1, 0.0)
            per_category = _by_category(problems, [r[0] for r in results])
            try:
                bodies = [body_of(c, p["entry_point"]) for c, p in zip(completions, problems, strict=True)]
                bleu = codebleu([p["canonical_solution"] for p in problems], bodies)
            except Exception:  # a metrics-library failure must not stop a federation round
                logger.exception("CodeBLEU failed in round=%d; reporting 0", round_idx)
        report = EvalReport(val_loss=loss, perplexity=perplexity(loss), pass_at_1=float(pass1),
                            codebleu=float(bleu), n_problems=len(problems), seconds=time.perf_counter() - t0,
                            per_category=per_category)
        logger.info("eval round=%d val_loss=%.4f ppl=%.2f pass@1=%.3f codebleu=%.3f n=%d %.1fs", round_idx,
                    report.val_loss, report.perplexity, report.pass_at_1, report.codebleu, report.n_problems,
                    report.seconds)
        return report

    def _execute(self, problems: Sequence[dict[str, str]], completions: Sequence[str]) -> list[list[bool]]:
        """Sandboxed verdicts of one greedy completion per problem, each program run once.

        A verdict depends only on the program text (problem + completion; the tests are
        deterministic), and a model that has settled writes the same completions round after
        round, so verdicts are remembered per (task, completion) for the process: a skills
        evaluation of 240 problems then runs only what changed. Bounded, oldest dropped first.
        """
        from .evaluation import execute_candidates

        keys = [(p["task_id"], hashlib.sha256(p["prompt"].encode() + b"\0" + c.encode()).hexdigest())
                for p, c in zip(problems, completions, strict=True)]
        first: dict[tuple[str, str], int] = {}
        for i, k in enumerate(keys):
            if k not in _VERDICTS:
                first.setdefault(k, i)
        todo = list(first.values())
        if todo:
            fresh = execute_candidates([problems[i] for i in todo], [[completions[i]] for i in todo],
                                       workers=self.cfg.sandbox_workers or None, timeout_s=self.cfg.sandbox_timeout_s)
            for i, verdict in zip(todo, fresh, strict=True):
                _VERDICTS[keys[i]] = verdict[0]
            while len(_VERDICTS) > _VERDICTS_MAX:
                _VERDICTS.pop(next(iter(_VERDICTS)))
        return [[_VERDICTS[k]] for k in keys]

    def _greedy_passes(self, problems: Sequence[dict[str, str]]) -> list[bool]:
        """Whether this node's greedy answer to each problem passes its tests (sandboxed)."""
        completions = self._generate([p["prompt"] for p in problems], [p["entry_point"] for p in problems],
                                     greedy=True)
        return [r[0] for r in self._execute(problems, completions)]

    def pass_by_category(self, problems: Sequence[dict[str, str]]) -> dict[str, float]:
        """Greedy Pass@1 per category on ``problems`` (the oracle's probe of true skills)."""
        return _by_category(problems, self._greedy_passes(problems)) if problems else {}

    def evaluate_pass_at_k(self, n_samples: int, ks: Sequence[int] = (1, 5, 10), temperature: float = 0.8,
                           *, round_idx: int = 0) -> dict[int, float]:
        """Unbiased Pass@k from ``n_samples`` sampled completions per problem (SPEC "Metrics").

        Same problems as :meth:`evaluate` (the first ``eval_problems`` of the test set), nucleus
        sampling at ``temperature`` with ``cfg.top_p``; seeded by (seed, round) and independent
        of every other generation, so adding it changes nothing else a node does. A k above
        ``n_samples`` is left out of the result.

        Raises:
            ValueError: ``n_samples < 1`` or ``temperature <= 0`` (greedy samples are identical).
        """
        from .evaluation import execute_candidates, pass_at_k_report

        if n_samples < 1 or temperature <= 0:
            raise ValueError(f"need n_samples >= 1 and temperature > 0, got {n_samples}, {temperature}")
        problems = self.data.test[:self.cfg.eval_problems]
        if not problems:
            return {}
        t0 = time.perf_counter()
        cfg = self.cfg
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                                      batch_size=max(cfg.gen_batch, n_samples), max_prompt_len=cfg.max_len,
                                      progress=cfg.progress)
        seed = int(np.random.SeedSequence([cfg.seed, max(round_idx, 0), 0x9A55]).generate_state(1)[0])
        result = generate(self.model, self.tokenizer, [self._fmt(p["prompt"]) for p in problems], settings=settings,
                          num_return_sequences=n_samples, entry_points=[p["entry_point"] for p in problems],
                          seed=seed, device=self.loaded.device)
        results = execute_candidates(problems, result.texts, workers=cfg.sandbox_workers or None,
                                     timeout_s=cfg.sandbox_timeout_s)
        report = pass_at_k_report(results, ks=[k for k in ks if k <= n_samples])
        logger.info("sampled pass@k round=%d n=%d T=%.2f %s (%d problems, %.1fs)", round_idx, n_samples,
                    temperature, {k: round(v, 3) for k, v in report.items()}, len(problems),
                    time.perf_counter() - t0)
        return report

    def category_histogram(self) -> np.ndarray:
        return histogram(p["prompt"] for p in self.data.train)

    def transfer_prompts(self) -> list[tuple[str, str]]:
        items = self.data.transfer[:self.cfg.transfer_size] if self.cfg.transfer_size else self.data.transfer
        return [(p["task_id"], p["prompt"]) for p in items]

    def generate_answers(self, prompts: Sequence[tuple[str, str]]) -> list[Answer]:
        """Greedy (or sampled) answers to ``prompts``, the teacher's side of an exchange.

        With ``cfg.teach_min_skill > 0`` the teacher first measures its own Pass@1 per category on
        its validation problems and answers only prompts of categories where it reaches that
        level: a confidently wrong answer teaches the student a wrong rule and was measured to
        cost more than a right one gains (docs/skills.md). Prompts it withholds get no answer.
        """
        if self.cfg.teach_min_skill > 0 and prompts:
            from .categories import classify_name

            _, skill = self.validation_skills()
            keep = [(t, p) for t, p in prompts if skill.get(classify_name(p), 0.0) >= self.cfg.teach_min_skill]
            logger.info("teaching %d of %d prompts: categories at Pass@1 >= %.2f on validation: %s", len(keep),
                        len(prompts), self.cfg.teach_min_skill,
                        sorted(c for c, v in skill.items() if v >= self.cfg.teach_min_skill))
            prompts = keep
            if not prompts:
                return []
        entry = [self._transfer[t]["entry_point"] if t in self._transfer else None for t, _ in prompts]
        texts = self._generate([p for _, p in prompts], entry, greedy=self.cfg.temperature <= 0, teaching=True)
        return [Answer(task_id=t, text=text) for (t, _), text in zip(prompts, texts, strict=True)]

    def filter_outgoing(self, answers: Sequence[Answer]) -> tuple[list[Answer], GuardrailReport]:
        if self._guardrail is None:
            from .guardrail import Guardrail

            private = [p["prompt"] + p["canonical_solution"] for p in (*self.data.train, *self.data.val)]
            self._guardrail = Guardrail(private, ngram=self.cfg.guardrail_ngram,
                                        overlap_threshold=self.cfg.guardrail_threshold)
        return self._guardrail.filter(answers)

    # ---- fingerprints and checkpoints -------------------------------------------------------
    def adapter_fingerprint(self) -> str:
        """sha256 over the trainable (LoRA) tensors, by name."""
        return _sha256(sorted((n, p) for n, p in self.model.named_parameters() if p.requires_grad))

    def base_fingerprint(self) -> str:
        """sha256 over every frozen (base) parameter, by name; about 0.4 s for 135M params."""
        return _sha256(sorted((n, p) for n, p in self.model.named_parameters() if not p.requires_grad))

    def save_checkpoint(self, directory: Path) -> None:
        """Adapter (peft format) + optimiser state + RNG + meta, swapped in atomically.

        Written into a temp sibling, then renamed over ``directory`` (the old one is moved aside
        first and deleted last); :meth:`load_checkpoint` falls back to that aside copy if a crash
        hit between the two renames. The base model is never written.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, save_embedding_layers=False)  # never trained; no hub lookup
        torch.save({"trainer": self.trainer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "gen_calls": self._gen_calls}, tmp / _STATE)
        meta = {"model": self.model_name, "model_type": self.loaded.model_type, "family": self.family,
                "base_fingerprint": self._base_fp, "adapter_fingerprint": self.adapter_fingerprint(),
                "step": self.trainer.step, "config": asdict(self.cfg), "saved": time.time()}
        (tmp / _META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        dir_fd = os.open(directory.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        logger.info("checkpoint saved to %s (step %d)", directory, self.trainer.step)

    def load_checkpoint(self, directory: Path) -> bool:
        """Restore what :meth:`save_checkpoint` wrote; False when there is none.

        Raises:
            ModelLoadError: the checkpoint belongs to a different base model.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / _META).is_file():
            old = directory.with_name(f".{directory.name}.old")
            if not (old / _META).is_file():
                return False
            logger.warning("using %s (a save was interrupted)", old)
            directory = old
        meta = json.loads((directory / _META).read_text())
        if meta.get("base_fingerprint") != self._base_fp:
            raise ModelLoadError(f"checkpoint {directory} was trained on base {meta.get('model')!r} "
                                 f"({str(meta.get('base_fingerprint'))[:12]}), not on this node's "
                                 f"{self.model_name!r} ({self._base_fp[:12]})")
        weights = load_file(str(directory / _ADAPTER), device=str(self.loaded.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ModelLoadError(f"checkpoint {directory}: unexpected adapter keys {result.unexpected_keys[:3]}")
        state = torch.load(directory / _STATE, map_location=self.loaded.device, weights_only=True)
        self.trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self._gen_calls = int(state["gen_calls"])
        logger.info("checkpoint loaded from %s (step %d)", directory, self.trainer.step)
        return True

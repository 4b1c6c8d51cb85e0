"""Logit distillation and answer voting for the centralised baselines (Central-KD, FedID).

Pure learning code over a :class:`~knexa_node.torch_backend.TorchBackend` and its
:class:`~knexa_node.training.Trainer`; who talks to whom and what it costs lives in the methods.

* Per-token distributions: :func:`teacher_dists` runs a model over (prompt, completion) examples
  and returns, per completion token, its softmax at temperature ``T`` as a :class:`TokenDist`
  (dense, or its top-k plus the mass of the rest, which is what a client would upload).
* Ensemble (FedMD): :func:`ensemble_mean` averages members' distributions over one shared vocabulary;
  :func:`vocab_key` decides which tokenizers share one.
* Distillation: :func:`distill_logits` steps the client's own optimiser on
  ``(1 - a_KD) * CE(local) + a_KD * T^2 * KL(ensemble || student_T)``, normalised per token over the
  effective batch exactly as :meth:`Trainer.distill` normalises Eq. 2, so the warmup counter and the
  AdamW moments stay the ones the engine checkpoints.
* Scores and votes: :func:`answer_logprobs` (mean token log-probability of a completion),
  :func:`normalize_code` (comments, docstrings and layout removed) and :func:`weighted_vote`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from knexa_node.backend import TrainReport
from knexa_node.generation import format_prompt, training_target, uses_chat
from knexa_node.training import (
    _PLAIN_HEAD,
    IGNORE,
    Example,
    Trainer,
    collate,
    phase_seed,
    token_loss_sum,
)

if TYPE_CHECKING:
    from knexa_node.torch_backend import TorchBackend

__all__ = [
    "SPARSE_ENTRY_BYTES",
    "DENSE_ENTRY_BYTES",
    "TokenDist",
    "answer_logprobs",
    "completion_logits",
    "distill_logits",
    "encode_completions",
    "ensemble_mean",
    "kd_kl_sum",
    "normalize_code",
    "output_vocab",
    "quantize",
    "teacher_dists",
    "top_k_dist",
    "vocab_key",
    "weighted_vote",
]

logger = logging.getLogger(__name__)

#: wire size of one sparse entry: int32 token id + fp16 probability
SPARSE_ENTRY_BYTES = 6
#: wire size of one dense entry: fp16 probability (the token id is the position)
DENSE_ENTRY_BYTES = 2


@dataclass(frozen=True, slots=True)
class TokenDist:
    """Per-position distributions over a vocabulary: ``prob[i, j]`` is P(token ``idx[i, j]``).

    Dense distributions carry every token id (``idx`` is ``arange(V)`` on each row); sparse
    ones their top-k ids with their true probabilities, and :attr:`tail` (one minus their sum)
    is the mass of every other token as one bucket. Top-k distillation against the bucketed
    distribution is exact at the bucket level: zero when the student matches the teacher
    (renormalising the top-k instead leaves a floor of -log(top-k mass) per token, about 0.15
    nats for SmolLM2 at T = 1.5 and k = 64, and pushes students to sharpen).
    """

    idx: torch.Tensor  #: (positions, k) int64
    prob: torch.Tensor  #: (positions, k) float32
    dense: bool

    @property
    def positions(self) -> int:
        return int(self.idx.shape[0])

    @property
    def tail(self) -> torch.Tensor:
        """(positions,) mass outside ``idx`` (zero when dense; clipped at zero after rounding)."""
        return (1.0 - self.prob.sum(-1)).clamp(min=0.0)

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """The known probabilities scattered into (positions, V); the tail is not spread out."""
        out = torch.zeros(self.positions, vocab_size, dtype=torch.float32, device=self.prob.device)
        return out.scatter_(1, self.idx, self.prob)

    def wire_bytes(self) -> int:
        """Upload/download size: fp16 values, plus an int32 id per entry when sparse."""
        per = DENSE_ENTRY_BYTES if self.dense else SPARSE_ENTRY_BYTES
        return int(self.idx.numel()) * per


def vocab_key(tokenizer: Any) -> str:
    """Hash of the token -> id table: equal keys mean logits index the same tokens."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(table.encode()).hexdigest()


def output_vocab(backend: TorchBackend) -> int:
    """Ids every logit vector of this model covers and its tokenizer can emit.

    Some checkpoints pad the output layer past the tokenizer (Qwen1.5: 151936 rows, 151646
    tokens); the padding rows are never a target, so ensembles are taken over the smaller range.
    """
    return min(len(backend.tokenizer), int(backend.model.config.vocab_size))


def encode_completions(backend: TorchBackend, pairs: Sequence[tuple[str, str]]) -> list[Example]:
    """(prompt, completion) pairs in the format this backend trains and generates with."""
    chat = uses_chat(backend.tokenizer, backend.cfg.prompt_format)
    return backend.trainer.encode_pairs([
        (format_prompt(backend.tokenizer, p, backend.cfg.prompt_format), training_target(p, c, chat))
        for p, c in pairs
    ])


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def completion_logits(model: Any, batch: dict[str, torch.Tensor], model_type: str = "") -> torch.Tensor:
    """Next-token logits at the completion positions of ``batch`` (row by row), float32.

    The same head shortcut as :func:`knexa_node.training.token_loss_sum`: for plain-head
    families only the completion positions go through the LM head.
    """
    mask = batch["labels"][:, 1:] != IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if model_type in _PLAIN_HEAD and backbone is not None:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    return logits.float()


@torch.no_grad()
def answer_logprobs(backend: TorchBackend, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Mean log-probability per completion token (eos included) of each pair under ``backend``.

    Pairs with an empty completion score ``-inf``. Evaluated in eval mode (no dropout).
    """
    out = np.full(len(pairs), -np.inf)
    keep = [i for i, (_, c) in enumerate(pairs) if c.strip()]
    examples = encode_completions(backend, [pairs[i] for i in keep])
    trainer = backend.trainer
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for rows in _chunks(list(range(len(examples))), trainer.settings.micro_batch):
            micro = [examples[r] for r in rows]
            batch = collate(micro, trainer.pad_id, trainer.device)
            logits = completion_logits(trainer.model, batch, trainer.model_type)
            targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE]
            token_lp = -F.cross_entropy(logits, targets, reduction="none").cpu()
            for r, part in zip(rows, torch.split(token_lp, [e.n_targets for e in micro]), strict=True):
                out[keep[r]] = float(part.mean()) if part.numel() else -np.inf
    finally:
        trainer.model.train(was_training)
    return out


def top_k_dist(probs: torch.Tensor, top_k: int) -> TokenDist:
    """``probs`` (positions, V) kept whole (``top_k`` <= 0 or >= V) or cut to its top-k (+ tail)."""
    vocab = probs.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        idx = torch.arange(vocab, device=probs.device).expand(probs.shape[0], vocab)
        return TokenDist(idx.contiguous(), probs.float(), dense=True)
    values, idx = probs.topk(top_k, dim=-1)
    return TokenDist(idx, values.float(), dense=False)


def quantize(dist: TokenDist) -> TokenDist:
    """What survives the wire: probabilities rounded to fp16 (ids are exact)."""
    return TokenDist(dist.idx, dist.prob.half().float(), dist.dense)


@torch.no_grad()
def teacher_dists(backend: TorchBackend, examples: Sequence[Example], temperature: float, top_k: int,
                  vocab_size: int) -> list[TokenDist]:
    """Per example, softmax(logits[:vocab_size] / T) at each completion position (eval mode, CPU)."""
    trainer = backend.trainer
    was_training = trainer.model.training
    trainer.model.eval()
    out: list[TokenDist] = []
    try:
        for micro in _chunks(list(examples), trainer.settings.micro_batch):
            logits = completion_logits(trainer.model, collate(micro, trainer.pad_id, trainer.device),
                                       trainer.model_type)[:, :vocab_size]
            probs = torch.softmax(logits / temperature, dim=-1)
            for part in torch.split(probs, [e.n_targets for e in micro]):
                d = top_k_dist(part, top_k)
                out.append(TokenDist(d.idx.cpu(), d.prob.cpu(), d.dense))
    finally:
        trainer.model.train(was_training)
    return out


def ensemble_mean(members: Sequence[TokenDist], vocab_size: int) -> torch.Tensor:
    """The FedMD consensus: the plain average of the members' distributions, (positions, V).

    For sparse members a token outside a member's top-k counts as zero from that member, so
    rows sum to one minus the average tail (:func:`top_k_dist` keeps that as the tail).
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if len({m.positions for m in members}) != 1:
        raise ValueError(f"members disagree on the number of positions: {[m.positions for m in members]}")
    total = members[0].to_dense(vocab_size)
    for m in members[1:]:
        total += m.to_dense(vocab_size)
    return total / len(members)


def kd_kl_sum(student_logits: torch.Tensor, target: TokenDist, temperature: float) -> torch.Tensor:
    """Sum over positions of KL(target || softmax(student / T)).

    A sparse target is compared bucket-wise: its top-k tokens one by one, and its tail against
    the student's mass on every other token (see :class:`TokenDist`).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = target.prob.to(log_q.device)
    idx = target.idx.to(log_q.device)
    kl = (torch.xlogy(p, p) - p * log_q.gather(1, idx)).sum()
    if target.dense:
        return kl
    tail = target.tail.to(log_q.device)
    log_q_tail = torch.logsumexp(log_q.scatter(1, idx, float("-inf")), dim=-1)
    return kl + (torch.xlogy(tail, tail) - tail * log_q_tail).sum()


def distill_logits(trainer: Trainer, kd: Sequence[tuple[Example, TokenDist]], local: Sequence[Example],
                   a_kd: float, temperature: float, round_idx: int, *, epochs: int = 1,
                   vocab_size: int | None = None) -> TrainReport:
    """Logit KD on the client's own optimiser: one step per effective batch of KD examples.

    Each step minimises ``(1 - a_KD) * CE(local) + a_KD * T^2 * KL(target || student_T)``, each
    term a mean over its completion tokens in the whole step (micro-batches accumulate), with
    as many local examples as KD examples cycled from a shuffled copy of the shard (as in
    :meth:`Trainer.distill`), at the KD learning rate with the trainer's warmup and clip.
    ``T^2`` keeps the soft-target gradient on the scale of the CE term (Hinton et al. 2015).

    Returns:
        steps, KD examples seen and the mean combined loss (the ``kd_loss`` a P2P student
        reports for Eq. 2).
    """
    t0 = time.perf_counter()
    s = trainer.settings
    seed = phase_seed(trainer.seed, round_idx, "kd")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trainer.model.train()
    local_order = [local[i] for i in rng.permutation(len(local))]
    cursor, steps = 0, 0
    losses: list[float] = []
    kl_terms: list[float] = []
    for _ in range(epochs):
        kd_order = [kd[i] for i in rng.permutation(len(kd))]
        for batch in _chunks(kd_order, s.effective_batch):
            local_batch = []
            for _ in range(len(batch) if local_order else 0):
                local_batch.append(local_order[cursor % len(local_order)])
                cursor += 1
            trainer.optimizer.zero_grad(set_to_none=True)
            kd_total = sum(e.n_targets for e, _ in batch)
            kl = 0.0
            if kd_total:
                for micro in _chunks(sorted(batch, key=lambda p: len(p[0].input_ids)), s.micro_batch):
                    logits = completion_logits(trainer.model, collate([e for e, _ in micro], trainer.pad_id,
                                                                      trainer.device), trainer.model_type)
                    if vocab_size is not None:
                        logits = logits[:, :vocab_size]
                    target = TokenDist(torch.cat([d.idx for _, d in micro]), torch.cat([d.prob for _, d in micro]),
                                       micro[0][1].dense)
                    kl_sum = kd_kl_sum(logits, target, temperature)
                    (kl_sum * (a_kd * temperature ** 2 / kd_total)).backward()
                    kl += float(kl_sum.detach())
                kl /= kd_total
            ce = 0.0
            local_total = sum(e.n_targets for e in local_batch)
            if local_total:
                for micro in _chunks(sorted(local_batch, key=lambda e: len(e.input_ids)), s.micro_batch):
                    loss_sum, _ = token_loss_sum(trainer.model, collate(micro, trainer.pad_id, trainer.device),
                                                 trainer.model_type)
                    (loss_sum * ((1.0 - a_kd) / local_total)).backward()
                    ce += float(loss_sum.detach())
                ce /= local_total
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainer.params, s.grad_clip)
            lr = trainer.lr_at(s.kd_lr)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.step += 1
            steps += 1
            # a step with local data is a local step, one with the ensemble's targets a KD step
            trainer.budget.count_step(kd=bool(kd_total), local=bool(local_batch))
            trainer.budget.tokens_trained += sum(len(e.input_ids) for e, _ in batch) + sum(
                len(e.input_ids) for e in local_batch)
            losses.append(a_kd * temperature ** 2 * kl + (1.0 - a_kd) * ce)
            kl_terms.append(kl)
    report = TrainReport(steps=steps, examples=len(kd) * epochs,
                         mean_loss=float(np.mean(losses)) if losses else float("nan"),
                         seconds=time.perf_counter() - t0)
    logger.info("logit KD round=%d a_kd=%.3f T=%.2f steps=%d examples=%d loss=%.4f kl=%.4f %.1fs", round_idx,
                a_kd, temperature, steps, len(kd), report.mean_loss,
                float(np.mean(kl_terms)) if kl_terms else float("nan"), report.seconds)
    return report


# ---- answers as votes ---------------------------------------------------------------------------

def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalize_code(text: str) -> str:
    """A canonical form of a code answer, so formatting-only variants vote together.

    Parsable code (a function body is dedented first; ``return`` at top level parses) goes
    through ``ast.parse`` + ``ast.unparse``, which drops comments, docstrings, blank lines and
    layout. Anything else (a truncated answer) keeps its non-comment lines with runs of
    whitespace collapsed.
    """
    src = textwrap.dedent(text).strip("\n")
    try:
        return ast.unparse(_strip_docstrings(ast.parse(src)))
    except (SyntaxError, ValueError):
        lines = (" ".join(line.split()) for line in src.splitlines())
        return "\n".join(line for line in lines if line and not line.startswith("#"))


def weighted_vote(candidates: Sequence[tuple[str, float]]) -> tuple[str, float] | None:
    """Confidence-weighted majority over normalised code.

    Args:
        candidates: (answer text, confidence >= 0), one per voter; empty answers abstain.

    Returns:
        The winning class's most confident original text and the class's total weight; ties go
        to the class with more voters, then to the one seen first. None when everyone abstained.

    Raises:
        ValueError: a confidence is negative or not finite (weights must add up).
    """
    classes: dict[str, list[tuple[float, str]]] = {}
    for text, conf in candidates:
        if not math.isfinite(conf) or conf < 0:
            raise ValueError(f"confidence must be finite and >= 0, got {conf}")
        if text.strip():
            classes.setdefault(normalize_code(text), []).append((conf, text))
    if not classes:
        return None
    best = max(classes.values(), key=lambda members: (sum(c for c, _ in members), len(members)))
    return max(best, key=lambda m: m[0])[1], float(sum(c for c, _ in best))

"""Central-KD (FedMD-style): a server averages clients' predictions on X_u into one teacher.

FedMD (Li & Wang 2019) averages the clients' class scores on a public set and every client
distils the consensus. Our clients are causal LMs with different tokenizers, so "the same
prediction" only exists between identical vocabularies. The paper is silent (SPEC "Baselines");
what we build, per round:

1. **One shared completion per prompt.** Every client answers X_u greedily
   (``generate_answers``; the answers pass its guardrail before upload). Every client scores
   every distinct answer by its mean token log-probability; the *consensus answer* of a prompt
   is the one with the highest score averaged over all clients. It plays two parts: it is the
   sequence the logit ensemble is evaluated on, and the text teacher for clients that cannot
   join a logit ensemble. One shared completion (rather than each member's own answer) keeps
   the cost linear in the group size (each member runs one forward pass per prompt instead of
   one per member answer) and puts the teacher's distributions on a sequence the whole
   federation finds likely, which is what FedMD's consensus on shared inputs means.
2. **Logit ensembles within tokenizer groups.** Clients whose tokenizers map tokens to ids
   identically (sha256 of ``tokenizer.get_vocab()``: e.g. several SmolLM2 clients, or Qwen
   with Qwen; the tiny presets ``tiny-llama``/``tiny-qwen2`` share one and
   ``tiny-gpt2``/``tiny-gptneox`` another) form a group. In a group of two or more, each
   member uploads its per-token distribution softmax(z / T) at every completion token of
   (prompt + consensus answer), T rising linearly 1.5 -> 2.5 over the rounds (SPEC); the server
   averages them (members included in their own teacher, as in FedMD) and sends the average
   back; each member then takes KD steps on its own AdamW and warmup state on
   ``(1 - a_KD) * CE(local shard) + a_KD * T^2 * KL(ensemble || student_T)`` over completion
   tokens, a_KD 0.2 -> 0.5 (``a_kd_schedule``). Uploads and downloads are sparse by default:
   each distribution is cut to its top-k tokens (``top_k``, default 64; 0 = dense), sent as
   int32 token ids with fp16 probabilities (6 bytes an entry); the rest of the vocabulary is
   one implicit "other" bucket (1 - sum), which the KL term compares with the student's mass
   outside the top-k, so a student that matches the teacher has zero KD loss. The ensemble is
   the average of what was uploaded, cut to top-k again for the download.
3. **Text fallback ("aligned by text").** A client alone in its tokenizer group has nobody to
   average logits with; it distils the consensus answers as text (``backend.distill``, SPEC
   Eq. 2), the only form in which the federation's ensemble reaches another vocabulary.

``kd_loss`` is the mean per-step objective: the combined logit loss above for group members,
Eq. 2's combined loss (``backend.distill``) for text students, as a P2P student reports it.

Bytes per client (``ClientStep``): sent = its answers (``package_bytes``) + 4 bytes per score
it reports + its top-k distributions; received = the pool of all answers it scores
(``package_bytes``) + a 4-byte consensus index per prompt + the ensemble's distributions.

Settings (``[methods.central-kd]``): ``top_k`` (64), ``temperature_start`` (1.5),
``temperature_end`` (2.5).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from knexa_node.backend import Answer
from knexa_node.training import Example, a_kd_schedule

from .base import Client, ClientStep, RoundContext, check_settings, package_bytes
from .logit_kd import (
    answer_logprobs,
    distill_logits,
    encode_completions,
    ensemble_mean,
    output_vocab,
    quantize,
    teacher_dists,
    top_k_dist,
    vocab_key,
)

__all__ = ["CentralKD", "CentralKDSettings", "consensus_answers", "transfer_set"]

logger = logging.getLogger(__name__)
_STATE = "central_kd.json"
_SCORE_BYTES = 4


@dataclass(frozen=True, slots=True)
class CentralKDSettings:
    top_k: int = 64
    temperature_start: float = 1.5
    temperature_end: float = 2.5

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError("central-kd top_k must be >= 0 (0 = dense)")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("central-kd temperatures must be > 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CentralKDSettings:
        check_settings("central-kd", data, (f.name for f in fields(cls)))
        return cls(**dict(data))


def transfer_set(clients: Sequence[Client]) -> list[tuple[str, str]]:
    """X_u as every client sees it; a federation whose clients disagree on it is misconfigured.

    Raises:
        ValueError: two clients hold different transfer prompts.
    """
    prompts = clients[0].backend.transfer_prompts()
    for c in clients[1:]:
        if c.backend.transfer_prompts() != prompts:
            raise ValueError(f"{c.name} holds a different transfer set X_u than {clients[0].name}")
    return prompts


def consensus_answers(prompts: Sequence[tuple[str, str]], pools: Sequence[Sequence[str]],
                      scores: Sequence[np.ndarray]) -> list[Answer]:
    """Per prompt, the pool answer with the highest score averaged over all scoring clients.

    Args:
        prompts: X_u as (task_id, prompt).
        pools: per prompt, the distinct candidate answers.
        scores: per client, its scores of the flattened pools (prompt-major), -inf = unscored.

    Returns:
        One answer per prompt that has candidates (ties go to the earlier candidate).
    """
    stacked = np.stack(scores) if scores else np.zeros((0, sum(len(p) for p in pools)))
    scored = np.isfinite(stacked)
    totals, counts = np.where(scored, stacked, 0.0).sum(0), scored.sum(0)
    mean = np.where(counts > 0, totals / np.maximum(counts, 1), -np.inf)
    out, offset = [], 0
    for (task_id, _), pool in zip(prompts, pools, strict=True):
        if pool:
            out.append(Answer(task_id, pool[int(np.argmax(mean[offset:offset + len(pool)]))]))
        offset += len(pool)
    return out


class CentralKD:
    """FedMD-style ensemble distillation within tokenizer groups; text KD across them."""

    name: ClassVar[str] = "central-kd"
    local_training: ClassVar[bool] = True

    def __init__(self) -> None:
        self.settings = CentralKDSettings()
        self.groups: list[list[int]] = []
        self._names: dict[int, str] = {}
        self._local: dict[int, list[Example]] = {}

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        self.settings = CentralKDSettings.from_mapping(settings)
        by_key: dict[str, list[int]] = {}
        for c in clients:
            by_key.setdefault(vocab_key(c.backend.tokenizer), []).append(c.index)
        self.groups = list(by_key.values())
        self._names = {c.index: c.name for c in clients}
        self._local = {}
        logger.info("central-kd tokenizer groups: %s", [[self._names[i] for i in g] for g in self.groups])

    def _local_examples(self, client: Client) -> list[Example]:
        if client.index not in self._local:
            self._local[client.index] = encode_completions(
                client.backend, [(p["prompt"], p["canonical_solution"]) for p in client.backend.data.train])
        return self._local[client.index]

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        t0 = time.perf_counter()
        clients = {c.index: c for c in ctx.clients}
        prompts = transfer_set(ctx.clients)
        text_of = dict(prompts)
        steps = {i: ClientStep(role="server_student", partner="server") for i in clients}

        # 1. answers -> pool -> everyone scores the pool -> consensus answer per prompt
        pools: list[list[str]] = [[] for _ in prompts]
        slot = {task_id: k for k, (task_id, _) in enumerate(prompts)}
        for i, c in clients.items():
            answers, _ = c.backend.filter_outgoing(c.backend.generate_answers(prompts))
            steps[i].bytes_sent += package_bytes(answers)
            for a in answers:
                if a.text.strip() and a.text not in pools[slot[a.task_id]]:
                    pools[slot[a.task_id]].append(a.text)
        flat = [(text_of[task_id], cand) for (task_id, _), pool in zip(prompts, pools, strict=True) for cand in pool]
        pool_bytes = package_bytes([Answer(task_id, cand) for (task_id, _), pool in zip(prompts, pools, strict=True)
                                    for cand in pool])
        scores = []
        for i, c in clients.items():
            scores.append(answer_logprobs(c.backend, flat))
            steps[i].bytes_received += pool_bytes + _SCORE_BYTES * len(prompts)
            steps[i].bytes_sent += _SCORE_BYTES * len(flat)
        consensus = consensus_answers(prompts, pools, scores)
        logger.info("central-kd round=%d: %d candidates for %d prompts, consensus on %d (answers and scores "
                    "%.1fs)", ctx.round_idx, len(flat), len(prompts), len(consensus), time.perf_counter() - t0)

        temperature = a_kd_schedule(ctx.round_idx, ctx.total_rounds, self.settings.temperature_start,
                                    self.settings.temperature_end)
        for group in self.groups:
            members = [clients[i] for i in group if i in clients]
            if len(members) >= 2:
                self._logit_round(members, consensus, text_of, temperature, ctx, steps)
            else:
                for c in members:
                    report = c.backend.distill(consensus, ctx.round_idx, ctx.total_rounds)
                    steps[c.index].kd_loss = report.mean_loss if report.steps else None
        return steps

    def _logit_round(self, members: Sequence[Client], consensus: Sequence[Answer], text_of: Mapping[str, str],
                     temperature: float, ctx: RoundContext, steps: dict[int, ClientStep]) -> None:
        """Upload top-k distributions, average them, send the ensemble back, distil (module step 2)."""
        if not consensus:
            return
        # identical vocabularies: one encoding serves every member, so positions line up
        examples = encode_completions(members[0].backend, [(text_of[a.task_id], a.text) for a in consensus])
        vocab = min(output_vocab(c.backend) for c in members)
        uploads = {}
        for c in members:
            uploads[c.index] = [quantize(d) for d in teacher_dists(c.backend, examples, temperature,
                                                                   self.settings.top_k, vocab)]
            steps[c.index].bytes_sent += sum(d.wire_bytes() for d in uploads[c.index])
        ensemble = [quantize(top_k_dist(ensemble_mean([uploads[c.index][k] for c in members], vocab),
                                        self.settings.top_k)) for k in range(len(examples))]
        down = sum(d.wire_bytes() for d in ensemble)
        for c in members:
            cfg = c.backend.cfg
            horizon = ctx.total_rounds if ctx.total_rounds > 1 else cfg.total_rounds
            a_kd = a_kd_schedule(ctx.round_idx, horizon, cfg.a_kd_start, cfg.a_kd_end)
            report = distill_logits(c.backend.trainer, list(zip(examples, ensemble, strict=True)),
                                    self._local_examples(c), a_kd, temperature, ctx.round_idx,
                                    epochs=cfg.kd_epochs, vocab_size=vocab)
            steps[c.index].bytes_received += down
            steps[c.index].kd_loss = report.mean_loss if report.steps else None

    def save(self, directory: Path) -> None:
        """The tokenizer groups (the only state; clients' adapters are the engine's)."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {"groups": [[self._names[i] for i in g] for g in self.groups], "settings": {
            f.name: getattr(self.settings, f.name) for f in fields(self.settings)}}
        (directory / _STATE).write_text(json.dumps(state, indent=2))

    def load(self, directory: Path) -> None:
        """Check the resumed federation groups the same way it did before the interruption.

        Raises:
            FileNotFoundError: nothing was saved there. ValueError: the groups differ.
        """
        state = json.loads((directory / _STATE).read_text())
        groups = [[self._names[i] for i in g] for g in self.groups]
        if state["groups"] != groups:
            raise ValueError(f"central-kd: saved tokenizer groups {state['groups']} differ from this "
                             f"federation's {groups}; resume with the same clients and models")

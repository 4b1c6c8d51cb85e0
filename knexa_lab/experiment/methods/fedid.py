"""FedID-CentralKD: a server model learns from a confidence-weighted vote, then teaches by text.

Per round (SPEC "Baselines"):

1. Every client answers X_u (``generate_answers``, then its guardrail) and attaches a
   confidence per answer: exp(mean token log-probability of the answer under its own model),
   the geometric-mean token probability. The exponential matters: log-probabilities are
   negative, and a vote that *sums* them would make more supporters weigh less.
2. Per prompt the server votes: answers are normalised (``normalize_code``: comments,
   docstrings and layout removed) and each class weighs the sum of its voters' confidences;
   the heaviest class's most confident original text is the pseudo-label.
3. The server model (``server_model``: an alias as a client would name it; default the first
   client's model) holds its own LoRA adapter, fresh at :meth:`FedIDCentralKD.setup` and
   checkpointed by :meth:`~FedIDCentralKD.save`, and only public data (X_u; no private shard,
   no test set). It trains ``server_epochs`` epochs of completion-token CE on the
   (prompt, pseudo-label) pairs with its own AdamW, at the local learning rate.
4. The server answers X_u and every client distils those answers by AKD (SPEC Eq. 2,
   ``backend.distill``), which works across any tokenizers.

Bytes per client (``ClientStep``): sent = its answers (``package_bytes``) + 4 bytes per
confidence; received = the server's answers (``package_bytes``).

Settings (``[methods.fedid-centralkd]``): ``server_model`` ("" = first client's model),
``server_epochs`` (1), ``server_seed`` (-1 = the first client's learning seed + 1000003).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from knexa_node.backend import Answer
from knexa_node.data import NodeData
from knexa_node.models import LoraSettings, ModelSpec, default_cache_dir, load_model, resolve_model

from .base import Client, ClientStep, RoundContext, check_settings, package_bytes
from .central_kd import transfer_set
from .logit_kd import answer_logprobs, encode_completions, weighted_vote

if TYPE_CHECKING:
    from knexa_node.torch_backend import TorchBackend

__all__ = ["FedIDCentralKD", "FedIDSettings", "build_server"]

logger = logging.getLogger(__name__)
_SERVER = "server"
_STATE = "fedid.json"
_CONFIDENCE_BYTES = 4


@dataclass(frozen=True, slots=True)
class FedIDSettings:
    server_model: str = ""
    server_epochs: int = 1
    server_seed: int = -1

    def __post_init__(self) -> None:
        if self.server_epochs < 1:
            raise ValueError("fedid-centralkd server_epochs must be >= 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FedIDSettings:
        check_settings("fedid-centralkd", data, (f.name for f in fields(cls)))
        return cls(**dict(data))


def _server_spec(model: str, clients: Sequence[Client]) -> ModelSpec:
    """A client's own spec when one runs that model (same checkpoint), else resolved afresh."""
    for c in clients:
        if c.backend.model_name == model:
            return c.backend.spec
    first = clients[0].backend.spec
    cache = first.path.parent if first.kind in ("tiny", "embedded") else default_cache_dir()
    return resolve_model(model, cache_dir=cache)


def build_server(model: str, clients: Sequence[Client], seed: int) -> TorchBackend:
    """A TorchBackend on ``model`` with a fresh LoRA (seeded by ``seed``) and only X_u as data.

    Learning settings are the first client's (same LoRA rank, learning rates, lengths), with
    this seed and no evaluation problems.

    Raises:
        ModelLoadError: the model cannot be resolved or loaded offline.
    """
    from knexa_node.torch_backend import TorchBackend

    first = clients[0].backend
    cfg = replace(first.cfg, seed=seed, eval_problems=0)
    spec = _server_spec(model, clients)
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    loaded = load_model(spec, lora=LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets),
                        device=cfg.device, threads=cfg.threads, seed=cfg.seed,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    data = NodeData(train=[], val=[], test=[], transfer=list(first.data.transfer))
    return TorchBackend(spec, loaded, data, cfg)


class FedIDCentralKD:
    """A server model trained on the clients' voted answers teaches every client by text."""

    name: ClassVar[str] = "fedid-centralkd"
    local_training: ClassVar[bool] = True

    def __init__(self) -> None:
        self.settings = FedIDSettings()
        self.server: TorchBackend | None = None
        self.server_model = ""
        #: last round's server training loss (logged and saved for inspection)
        self.last_server_loss: float | None = None

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        self.settings = FedIDSettings.from_mapping(settings)
        self.server_model = self.settings.server_model or clients[0].backend.model_name
        seed = self.settings.server_seed if self.settings.server_seed >= 0 else clients[0].backend.cfg.seed + 1_000_003
        self.server = build_server(self.server_model, clients, seed)
        logger.info("fedid server: %s (seed %d), %d transfer prompts", self.server_model, seed,
                    len(self.server.transfer_prompts()))

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        if self.server is None:
            raise RuntimeError("fedid-centralkd: communicate() before setup()")
        prompts = transfer_set(ctx.clients)
        if self.server.transfer_prompts() != prompts:
            raise ValueError("fedid-centralkd: the server's X_u differs from the clients'")
        text_of = dict(prompts)
        steps = {c.index: ClientStep(role="server_student", partner="server") for c in ctx.clients}

        # 1-2. answers + confidences up, vote per prompt
        ballots: dict[str, list[tuple[str, float]]] = {task_id: [] for task_id, _ in prompts}
        for c in ctx.clients:
            answers, _ = c.backend.filter_outgoing(c.backend.generate_answers(prompts))
            logp = answer_logprobs(c.backend, [(text_of[a.task_id], a.text) for a in answers])
            confidence = np.nan_to_num(np.exp(logp), nan=0.0, posinf=0.0)
            for a, conf in zip(answers, confidence, strict=True):
                ballots[a.task_id].append((a.text, float(conf)))
            steps[c.index].bytes_sent += package_bytes(answers) + _CONFIDENCE_BYTES * len(answers)
        labels = []
        for task_id, _ in prompts:
            won = weighted_vote(ballots[task_id])
            if won is not None:
                labels.append(Answer(task_id, won[0]))
        logger.info("fedid round=%d: pseudo-labels for %d of %d prompts", ctx.round_idx, len(labels), len(prompts))

        # 3. the server learns the vote, 4. then answers X_u for every client
        server = self.server
        if labels:
            examples = encode_completions(server, [(text_of[a.task_id], a.text) for a in labels])
            epochs = self.settings.server_epochs
            reports = [server.trainer.train_epoch(examples, ctx.round_idx * epochs + e) for e in range(epochs)]
            self.last_server_loss = float(np.mean([r.mean_loss for r in reports]))
            logger.info("fedid round=%d: server CE %.4f over %d pairs", ctx.round_idx, self.last_server_loss,
                        len(examples))
        teaching = [a for a in server.generate_answers(prompts) if a.text.strip()]
        down = package_bytes(teaching)
        for c in ctx.clients:
            report = c.backend.distill(teaching, ctx.round_idx, ctx.total_rounds)
            steps[c.index].bytes_received += down
            steps[c.index].kd_loss = report.mean_loss if report.steps else None
        return steps

    def save(self, directory: Path) -> None:
        """The server's adapter and optimiser (TorchBackend checkpoint) and what it was built from."""
        if self.server is None:
            raise RuntimeError("fedid-centralkd: save() before setup()")
        directory.mkdir(parents=True, exist_ok=True)
        self.server.save_checkpoint(directory / _SERVER)
        (directory / _STATE).write_text(json.dumps({"server_model": self.server_model,
                                                    "last_server_loss": self.last_server_loss}, indent=2))

    def load(self, directory: Path) -> None:
        """Restore the server model saved by :meth:`save`.

        Raises:
            FileNotFoundError: no server checkpoint there. ValueError: it was another model.
        """
        if self.server is None:
            raise RuntimeError("fedid-centralkd: load() before setup()")
        state = json.loads((directory / _STATE).read_text())
        if state["server_model"] != self.server_model:
            raise ValueError(f"fedid-centralkd: saved server model {state['server_model']!r}, "
                             f"configured {self.server_model!r}")
        if not self.server.load_checkpoint(directory / _SERVER):
            raise FileNotFoundError(f"fedid-centralkd: no server checkpoint in {directory / _SERVER}")
        self.last_server_loss = state["last_server_loss"]

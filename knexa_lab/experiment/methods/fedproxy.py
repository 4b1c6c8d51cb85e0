"""FedProxy (Fan et al., 2026): clients fine-tune a compressed proxy SLM; the server TIES-merges it.

One round (the LLM itself is never trained, hence ``local_training = False``):

1. every client trains its proxy's LoRA for ``epochs`` passes over its private train set, with
   the same completion-token CE, prompt format and optimiser settings as its LLM
   (:class:`knexa_node.training.Trainer`), and sends the delta ``after - before`` up;
2. the server merges the deltas of clients running the same model (same name, hence the same
   shapes) with TIES (:func:`knexa_lab.experiment.proxy.ties_merge`); a client alone with its
   model keeps its own delta and exchanges nothing;
3. every client adds the merged delta to its proxy (all proxies of a group stay identical) and,
   training-free, to its LLM's LoRA in the mapped layers (:func:`~knexa_lab.experiment.proxy.plug_in`).

Setup compresses each LLM into a proxy (:func:`~knexa_lab.experiment.proxy.build_proxy`: first,
last and every ``stride``-th layer, or ``keep_layers`` evenly spaced) and plays the server's
distribution of one proxy per group: the group's first client's adapter of the mapped layers is
copied into the other members' LLMs and proxies. That copy is function-preserving only while
their LoRA ``B`` tensors are all zero (a fresh adapter: ``B A = 0`` whatever ``A``), so it is done
only then; a resumed run skips it and :meth:`FedProxy.load` restores the proxies. Without one
common starting adapter, summing deltas of separately initialised LoRA factors would be
meaningless. Invariant kept every round: a client's proxy LoRA equals its LLM's LoRA in the mapped
layers, so the plug-in lands on exactly the tensors the proxy was trained against.

Settings (``[methods.fedproxy]``): ``stride`` (2), ``keep_layers`` (unset; wins over stride),
``trim_frac`` (0.2: TIES's k, the share of each delta's entries kept) and ``epochs`` (1).

Simplified against the paper, and why:

* compression is layer dropping only; the paper's server-guided compression may also align the
  proxy with the LLM on server data (emulator distillation, as in Offsite-Tuning). That needs a
  server corpus and a training stage per architecture, which this CPU-sized benchmark skips.
  The cost is real: on one client's validation shard SmolLM2-135M scores a completion CE of
  1.13, its stride-2 proxy (16 of 30 layers) 11.8, a 24-layer proxy 3.6 and a 27-layer one
  2.1 (measured once while building this module), so deltas learnt on a heavily dropped proxy
  are a weak signal for the LLM; ``keep_layers`` trades compression for fidelity;
* the proxy is tuned through a LoRA with the client's rank and targets, not fully, so that its
  delta has the shapes of the LLM's adapter and the plug-in is a plain addition;
* TIES runs on LoRA factors ``A`` and ``B`` separately (like FedAvg of LoRA), not on ``B A``;
  the merged factors are what is plugged in;
* with 2-layer tiny presets the proxy keeps both layers (first and last), so on the ``tiny``
  preset FedProxy is TIES-merged LoRA without compression; compression shows on deeper models.

The proxy's mean training loss of the round goes into ``ctx.extras["train_loss"]`` (client
index -> loss) and :attr:`FedProxy.train_losses`, for an engine that wants a ``train_loss`` column.

Wire sizes: a client sends its dense delta and receives the dense merge, both counted as
safetensors blobs; the one-off proxy distribution at setup is not counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..proxy import (
    Proxy,
    build_proxy,
    layer_mapping,
    lora_delta,
    payload_bytes,
    plug_in,
    ties_merge,
)
from .base import Client, ClientStep, RoundContext, check_settings

__all__ = ["FedProxy", "FedProxySettings", "private_examples"]

logger = logging.getLogger(__name__)
_ADAPTER = "proxy_adapter.safetensors"
_TRAINER = "proxy_trainer.pt"
_META = "fedproxy.json"


class FedProxySettings:
    """The ``[methods.fedproxy]`` table, validated (unknown keys are an error)."""

    KNOWN: ClassVar[tuple[str, ...]] = ("stride", "keep_layers", "trim_frac", "epochs")

    def __init__(self, settings: Mapping[str, Any]) -> None:
        check_settings("fedproxy", settings, self.KNOWN)
        self.stride = int(settings.get("stride", 2))
        keep = settings.get("keep_layers")
        self.keep_layers = None if keep is None else int(keep)
        self.trim_frac = float(settings.get("trim_frac", 0.2))
        self.epochs = int(settings.get("epochs", 1))
        problems = []
        if self.stride < 1:
            problems.append("stride must be >= 1")
        if self.keep_layers is not None and self.keep_layers < 2:
            problems.append("keep_layers must be >= 2 (first and last layer)")
        if not 0.0 < self.trim_frac <= 1.0:
            problems.append("trim_frac must be in (0, 1]")
        if self.epochs < 1:
            problems.append("epochs must be >= 1")
        if problems:
            raise ValueError("fedproxy: " + "; ".join(problems))


def private_examples(backend: Any) -> list[Any]:
    """The client's train set encoded exactly as its own local epoch encodes it.

    Same prompt format (raw or chat), same completion target and same tokenizer, so the proxy
    minimises the completion-token CE the LLM would.
    """
    from knexa_node.generation import format_prompt, training_target, uses_chat

    mode = backend.cfg.prompt_format
    chat = uses_chat(backend.tokenizer, mode)
    return backend.trainer.encode_pairs([
        (format_prompt(backend.tokenizer, p["prompt"], mode), training_target(p["prompt"], p["canonical_solution"], chat))
        for p in backend.data.train])


def _fresh_adapter(llm: Any, names: Sequence[str]) -> bool:
    """Whether every LoRA ``B`` among ``names`` is zero (so rewriting the ``A``s changes nothing)."""
    params = dict(llm.named_parameters())
    return all(not params[n].any() for n in names if ".lora_B." in n)


class FedProxy:
    """See the module docstring."""

    name: ClassVar[str] = "fedproxy"
    local_training: ClassVar[bool] = False

    def __init__(self) -> None:
        self.settings: FedProxySettings | None = None
        self.proxies: dict[int, Proxy] = {}
        self.trainers: dict[int, Any] = {}
        self.examples: dict[int, list[Any]] = {}
        #: model name -> client indices, in client order
        self.groups: dict[str, list[int]] = {}
        self.names: dict[int, str] = {}
        #: the last round's mean proxy train loss per client
        self.train_losses: dict[int, float] = {}

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        from knexa_node.training import Trainer

        self.settings = s = FedProxySettings(settings)
        self.proxies, self.trainers, self.examples, self.groups = {}, {}, {}, {}
        self.names = {c.index: c.name for c in clients}
        for c in clients:
            self.groups.setdefault(c.backend.model_name, []).append(c.index)
        by_index = {c.index: c for c in clients}
        for model_name, members in self.groups.items():
            for i in members:
                b = by_index[i].backend
                n_layers = int(b.model.config.num_hidden_layers)
                mapping = layer_mapping(n_layers, stride=s.stride, keep_layers=s.keep_layers)
                self.proxies[i] = build_proxy(b.model, mapping, gradient_checkpointing=b.cfg.gradient_checkpointing)
                self.trainers[i] = Trainer(self.proxies[i].model, b.tokenizer, b.trainer.settings, seed=b.cfg.seed,
                                           model_type=b.loaded.model_type, device=b.loaded.device)
                self.examples[i] = private_examples(b)
            self._distribute(model_name, [by_index[i] for i in members])

    def _distribute(self, model_name: str, members: Sequence[Client]) -> None:
        """The server hands one starting proxy to a group: the first member's (see module doc)."""
        if len(members) < 2:
            return
        leader = self.proxies[members[0].index]
        others = members[1:]
        if not all(_fresh_adapter(c.backend.model, list(self.proxies[c.index].llm_names.values())) for c in others):
            logger.warning("fedproxy: %s clients have trained adapters; keeping their own proxies "
                           "(a resumed run restores them in load)", model_name)
            return
        start = leader.lora_state()
        with torch.no_grad():
            for c in others:
                proxy = self.proxies[c.index]
                proxy.set_lora(start)
                params = dict(c.backend.model.named_parameters())
                for name, llm_name in proxy.llm_names.items():
                    params[llm_name].copy_(start[name])
        logger.info("fedproxy: %s proxy of %s distributed to %d clients", model_name, members[0].name, len(members))

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        if self.settings is None:
            raise RuntimeError("fedproxy: setup() was not called")
        by_index = {c.index: c for c in ctx.clients}
        missing = sorted(set(by_index) - set(self.proxies))
        if missing:
            raise RuntimeError(f"fedproxy: clients {missing} were not set up")
        befores: dict[int, dict[str, torch.Tensor]] = {}
        deltas: dict[int, dict[str, torch.Tensor]] = {}
        epochs = self.settings.epochs
        for i in by_index:
            proxy = self.proxies[i]
            befores[i] = proxy.lora_state()
            reports = [self.trainers[i].train_epoch(self.examples[i], ctx.round_idx * epochs + e)
                       for e in range(epochs)]
            self.train_losses[i] = float(np.mean([r.mean_loss for r in reports]))
            deltas[i] = lora_delta(befores[i], proxy.lora_state())
        ctx.extras.setdefault("train_loss", {}).update({i: self.train_losses[i] for i in by_index})

        steps: dict[int, ClientStep] = {}
        for members in self.groups.values():
            members = [i for i in members if i in by_index]
            if not members:
                continue
            merged = (ties_merge([deltas[i] for i in members], self.settings.trim_frac)
                      if len(members) > 1 else deltas[members[0]])
            down = payload_bytes(merged) if len(members) > 1 else 0
            for i in members:
                proxy = self.proxies[i]
                proxy.set_lora({n: befores[i][n] + merged[n] for n in merged})
                plug_in(by_index[i].backend.model, merged, proxy.llm_names)
                if len(members) > 1:
                    steps[i] = ClientStep(role="aggregated", partner=None, kd_loss=None,
                                          bytes_sent=payload_bytes(deltas[i]), bytes_received=down)
                else:
                    steps[i] = ClientStep(role="local", kd_loss=None)
            logger.info("fedproxy round=%d: %s merged over %s (proxy loss %s)", ctx.round_idx,
                        by_index[members[0]].backend.model_name, [self.names[i] for i in members],
                        ", ".join(f"{self.train_losses[i]:.4f}" for i in members))
        return steps

    # ---- persistence --------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"clients": {self.names[i]: {"model": model, "mapping": list(self.proxies[i].mapping)}
                            for model, members in self.groups.items() for i in members}}

    def save(self, directory: Path) -> None:
        """Each proxy's LoRA (peft names, safetensors) and optimiser state, plus the layer maps."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        for i, proxy in self.proxies.items():
            sub = directory / self.names[i]
            sub.mkdir(parents=True, exist_ok=True)
            weights = get_peft_model_state_dict(proxy.model, save_embedding_layers=False)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(sub / _ADAPTER))
            torch.save(self.trainers[i].state_dict(), sub / _TRAINER)
        tmp = directory / f".{_META}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self._meta(), indent=2, sort_keys=True))
        os.replace(tmp, directory / _META)  # written last: its presence marks a complete save

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote into the proxies set up by :meth:`setup`.

        Raises:
            FileNotFoundError: no complete save in ``directory``.
            ValueError: the save belongs to other clients, models or layer maps.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        saved = json.loads((directory / _META).read_text())
        if saved != self._meta():
            raise ValueError(f"fedproxy state in {directory} does not match this run's clients, models "
                             f"or layer maps (saved {saved['clients']}, now {self._meta()['clients']})")
        for i, proxy in self.proxies.items():
            sub = directory / self.names[i]
            device = self.trainers[i].device
            result = set_peft_model_state_dict(proxy.model, load_file(str(sub / _ADAPTER), device=str(device)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{sub}: unexpected proxy adapter keys {result.unexpected_keys[:3]}")
            self.trainers[i].load_state_dict(torch.load(sub / _TRAINER, map_location=device, weights_only=True))

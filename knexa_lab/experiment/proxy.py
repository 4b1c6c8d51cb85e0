"""FedProxy's model operations: a layer-dropped proxy of a LoRA LLM, TIES merging, plug-in.

Pure ML code with no experiment bookkeeping; the method (``methods/fedproxy.py``) wires it into
rounds, and the tests drive it on hand-built tensors and tiny models.

Compression (:func:`build_proxy`). A proxy keeps the LLM's embeddings, final norm and LM head,
and the decoder layers ``mapping`` picks (:func:`layer_mapping`: always the first and the last,
plus every ``stride``-th layer in between, or ``keep_layers`` evenly spaced ones). It is built
from the LLM's own config with ``num_hidden_layers = len(mapping)`` (``layer_types`` remapped the
same way), on the ``meta`` device, then given the LLM's frozen tensors by ``load_state_dict(...,
assign=True)``: proxy layer ``j`` *is* LLM layer ``mapping[j]`` (same parameter objects, no copy),
so a proxy costs only its LoRA and activations. That is safe because base weights are frozen and
nothing here merges LoRA into them. Building from config (instead of slicing the LLM's
``ModuleList``) gives every attention module its proxy position as ``layer_idx``, which is what
the KV cache indexes. The decoder ``ModuleList`` is found generically (``model.layers`` for
llama/qwen2, ``transformer.h`` for gpt2, ``gpt_neox.layers``): the shallowest ``ModuleList`` with
``num_hidden_layers`` entries.

The proxy then gets a LoRA with the LLM's own peft config (rank, alpha, targets), so the LoRA
tensors of proxy layer ``j`` have exactly the shapes of the LLM's LoRA tensors in layer
``mapping[j]``; :attr:`Proxy.llm_names` records that correspondence parameter by parameter, and
the proxy's LoRA starts as a copy of those LLM tensors.

Aggregation (:func:`ties_merge`): TIES-Merging (Yadav et al., 2023) per parameter over the
clients' LoRA deltas: trim each delta to its largest-magnitude ``trim_frac`` of entries, elect
each entry's sign by summed mass, and average only the kept entries that agree with it (peft's
``merge_utils`` primitives).

Plug-in (:func:`plug_in`): the merged delta is added to the LLM's LoRA tensors of the mapped
layers; unmapped layers and every base weight stay as they were.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Proxy",
    "build_proxy",
    "decoder_layers",
    "layer_mapping",
    "lora_delta",
    "payload_bytes",
    "plug_in",
    "ties_merge",
]

logger = logging.getLogger(__name__)

#: config fields holding one entry per decoder layer (remapped with the layers)
_PER_LAYER_FIELDS = ("layer_types",)


def layer_mapping(n_layers: int, *, stride: int = 2, keep_layers: int | None = None) -> tuple[int, ...]:
    """Which LLM layers a proxy keeps, in order: the first, the last, and strided middle ones.

    Args:
        n_layers: decoder layers of the LLM.
        stride: keep every ``stride``-th layer from 0 (1 keeps all); ignored with ``keep_layers``.
        keep_layers: keep this many layers, evenly spaced from first to last (>= 2).

    Raises:
        ValueError: non-positive sizes, or ``keep_layers`` < 2 (first and last are always kept).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if keep_layers is not None:
        if keep_layers < 2:
            raise ValueError(f"keep_layers must be >= 2 (first and last layer), got {keep_layers}")
        picks = np.round(np.linspace(0, n_layers - 1, min(keep_layers, n_layers))).astype(int)
        return tuple(sorted({int(i) for i in picks}))
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return tuple(sorted({*range(0, n_layers, stride), n_layers - 1}))


def _num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module) of the decoder-layer ``ModuleList`` of a causal LM or PeftModel.

    The shallowest ``ModuleList`` with ``config.num_hidden_layers`` entries: ``model.layers``
    (llama, qwen2, mistral), ``transformer.h`` (gpt2), ``gpt_neox.layers``, ``transformer.h`` of
    bloom, each under peft's ``base_model.model.`` prefix when wrapped.

    Raises:
        ValueError: no such list, or two at the same depth (the message names them).
    """
    n = _num_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if name and isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"{type(model).__name__}: no ModuleList of {n} decoder layers")
    depth = min(name.count(".") for name, _ in found)
    top = [(name, m) for name, m in found if name.count(".") == depth]
    if len(top) > 1:
        raise ValueError(f"{type(model).__name__}: ambiguous decoder layers {[name for name, _ in top]}")
    return top[0]


def _base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _frozen_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's base tensors under the plain transformers names (peft's LoRA wrappers removed)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _base_of(llm).state_dict(keep_vars=True).items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if isinstance(value, nn.Parameter) and value.requires_grad:
            raise ValueError(f"{key} is trainable: the proxy may only share frozen base tensors")
        out[".".join(p for p in parts if p != "base_layer")] = value
    return out


def _remap(name: str, prefix: str, mapping: Sequence[int]) -> str:
    """Proxy name -> LLM name: ``<prefix>.<j>.rest`` becomes ``<prefix>.<mapping[j]>.rest``."""
    head = prefix + "."
    if not name.startswith(head):
        return name
    index, _, rest = name[len(head):].partition(".")
    return f"{head}{mapping[int(index)]}.{rest}" if rest else f"{head}{mapping[int(index)]}"


@dataclass
class Proxy:
    """A client's proxy SLM: a peft model sharing the LLM's frozen tensors, and its layer map."""

    model: Any  #: peft.PeftModel over the layer-dropped base
    #: proxy layer j -> LLM layer mapping[j]
    mapping: tuple[int, ...]
    #: proxy LoRA parameter name -> the LLM LoRA parameter name it corresponds to
    llm_names: dict[str, str]

    def lora_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the proxy's trainable (LoRA) tensors, by parameter name."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def set_lora(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the proxy's LoRA tensors (every one must be given, shapes must match)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"proxy LoRA mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, value in state.items():
            params[name].copy_(value)


def build_proxy(llm: Any, mapping: Sequence[int], *, gradient_checkpointing: bool = False) -> Proxy:
    """Compress a peft LoRA LLM into a proxy keeping the decoder layers ``mapping`` (see module doc).

    The proxy's frozen tensors are the LLM's own (shared, not copied); its LoRA (the LLM's peft
    config) starts equal to the LLM's LoRA in the mapped layers. The global torch RNG is left as
    it was (peft's LoRA init draws from it).

    Raises:
        ValueError: ``mapping`` is empty, unsorted or out of range, or the model has no
            recognisable decoder-layer list.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    mapping = tuple(int(i) for i in mapping)
    base = _base_of(llm)
    n_layers = _num_layers(base)
    if not mapping or list(mapping) != sorted(set(mapping)) or mapping[0] < 0 or mapping[-1] >= n_layers:
        raise ValueError(f"mapping must be strictly increasing layer indices in [0, {n_layers}), got {mapping}")
    layers_name, _ = decoder_layers(base)

    config = copy.deepcopy(base.config)
    config.num_hidden_layers = len(mapping)
    for field in _PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == n_layers:
            setattr(config, field, [values[i] for i in mapping])

    frozen = _frozen_state(llm)
    with torch.device("meta"):
        proxy_base = AutoModelForCausalLM.from_config(config)
    state = {key: frozen[_remap(key, layers_name, mapping)] for key in proxy_base.state_dict()}
    proxy_base.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (rotary inv_freq, ...) are not in a state dict: take the LLM's
    llm_buffers = dict(base.named_buffers())
    for key, _ in list(proxy_base.named_buffers()):
        owner, _, leaf = key.rpartition(".")
        module = proxy_base.get_submodule(owner) if owner else proxy_base
        module._buffers[leaf] = llm_buffers[_remap(key, layers_name, mapping)].clone()
    leftover = [n for n, t in (*proxy_base.named_parameters(), *proxy_base.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"proxy tensors without a source in the LLM: {leftover[:3]}")
    proxy_base.generation_config = copy.deepcopy(base.generation_config)
    if gradient_checkpointing:
        proxy_base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    peft_config = copy.deepcopy(llm.peft_config[llm.active_adapter])
    with torch.random.fork_rng(devices=[]):
        proxy_model = get_peft_model(proxy_base, peft_config)
    proxy_layers, _ = decoder_layers(proxy_model)
    llm_layers, _ = decoder_layers(llm)
    llm_params = dict(llm.named_parameters())
    llm_names: dict[str, str] = {}
    for name, param in proxy_model.named_parameters():
        if not param.requires_grad:
            continue
        target = _remap(name, proxy_layers, mapping).replace(proxy_layers, llm_layers, 1)
        source = llm_params.get(target)
        if source is None or source.shape != param.shape:
            raise ValueError(f"proxy LoRA {name} has no LLM counterpart of shape {tuple(param.shape)} "
                             f"(looked for {target})")
        llm_names[name] = target
    proxy = Proxy(proxy_model, mapping, llm_names)
    proxy.set_lora({n: llm_params[t] for n, t in llm_names.items()})
    logger.info("proxy of %s: %d of %d layers %s, %d LoRA tensors", type(base).__name__, len(mapping),
                n_layers, list(mapping), len(llm_names))
    return proxy


def lora_delta(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``after - before`` per tensor (same names required)."""
    if set(before) != set(after):
        raise ValueError("before and after hold different tensors")
    return {n: after[n] - before[n] for n in after}


def ties_merge(deltas: Sequence[Mapping[str, torch.Tensor]], trim_frac: float = 0.2,
               sign_method: str = "total") -> dict[str, torch.Tensor]:
    """TIES-merge clients' deltas per tensor: trim, elect sign, disjoint mean.

    Args:
        deltas: one ``name -> tensor`` map per client, identical names and shapes.
        trim_frac: TIES's *k*: each delta keeps its ``trim_frac`` largest-magnitude entries per
            tensor (peft calls it ``density``); 1 keeps all, 0 keeps none.
        sign_method: "total" (sign of the summed mass, TIES) or "frequency" (majority by count).

    Returns:
        ``name -> merged``: per entry, the mean of the kept values whose sign matches the elected
        one (0 where none is kept). With one delta and ``trim_frac`` 1 this is that delta; when
        all clients agree in sign and nothing is trimmed it is the plain mean.

    Raises:
        ValueError: no deltas, different names or shapes, or ``trim_frac`` outside [0, 1].
    """
    from peft.utils.merge_utils import (
        calculate_majority_sign_mask,
        disjoint_merge,
        magnitude_based_pruning,
    )

    if not deltas:
        raise ValueError("ties_merge needs at least one delta")
    if not 0.0 <= trim_frac <= 1.0:
        raise ValueError(f"trim_frac must be in [0, 1], got {trim_frac}")
    names = set(deltas[0])
    merged: dict[str, torch.Tensor] = {}
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != names:
            raise ValueError(f"delta {i} holds different tensors than delta 0")
    for name in deltas[0]:
        shapes = {tuple(d[name].shape) for d in deltas}
        if len(shapes) > 1:
            raise ValueError(f"{name}: deltas of different shapes {sorted(shapes)} (different architectures?)")
        kept = [d[name] if trim_frac >= 1.0 else magnitude_based_pruning(d[name], trim_frac) for d in deltas]
        stacked = torch.stack(kept, dim=0)
        merged[name] = disjoint_merge(stacked, calculate_majority_sign_mask(stacked, method=sign_method)).to(
            deltas[0][name].dtype)
    return merged


@torch.no_grad()
def plug_in(llm: nn.Module, delta: Mapping[str, torch.Tensor], llm_names: Mapping[str, str]) -> None:
    """Add a proxy LoRA delta into the LLM's LoRA tensors of the mapped layers (no training).

    Raises:
        KeyError: a delta name absent from ``llm_names`` or from the LLM.
    """
    params = dict(llm.named_parameters())
    for name, value in delta.items():
        target = params[llm_names[name]]
        if not target.requires_grad:
            raise ValueError(f"{llm_names[name]} is a frozen base tensor; plug-in only touches LoRA")
        target.add_(value.to(device=target.device, dtype=target.dtype))


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Wire size of ``tensors`` as a safetensors blob (what a client or the server would send)."""
    from safetensors.torch import save

    return len(save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}))

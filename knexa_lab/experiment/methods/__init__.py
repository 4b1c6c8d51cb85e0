"""Federated-learning methods compared by `knexa-lab experiment` (contract: ``base.py``).

The registry maps a method's name (the ``method`` column of ``metrics.jsonl``) to
``"module:Class"``; classes are imported only when a method is created, so the registry imports
even when one method's module is missing or its dependencies are not installed, and one broken
method never stops the others from running.

- ``local.py``: ``local-only`` (no collaboration).
- ``p2p.py``: ``random-p2p``, ``heuristic-p2p``, ``knexa-fl`` (LinUCB, interaction context) and
  ``knexa-fl-concat`` (LinUCB, the paper's concatenated context), ``knexa-fl-hybrid`` (the CPM's
  ``hybrid`` policy: Thompson sampling with per-teacher effects), ``knexa-fl-skills`` (hybrid, with
  nodes that share their validation Pass@1 per category), ``knexa-fl-compact`` (the same with the
  compact hybrid), ``knexa-fl-prior`` (compact, starting from a prior that the shared skill gap
  pays; ``knexa-fl-prior-greedy`` without the Thompson draw, ``knexa-fl-prior-adaptive`` with
  teacher effects whose spread is learned) and ``skill-gap-p2p`` (no learning, matched on the shared skill gaps): one class driving the daemon's learning path with a ``knexa_cpm.policies``
  matchmaker.
- ``fedavg.py``: ``fedavg``, LoRA adapters averaged within same-architecture groups.
- ``fedproxy.py``: ``fedproxy`` (a proxy SLM trained and aggregated instead of the LLM).
- ``central_kd.py``: ``central-kd`` (FedMD-style ensemble teacher on X_u).
- ``fedid.py``: ``fedid-centralkd`` (a server model learns from clients' text by vote, then teaches).
- ``oracle.py``: ``oracle-p2p``, the P2P exchange matched on true per-category skill gaps measured
  on a hidden probe set (skills benchmark only): the upper bound of what matching can buy.

To add a method: implement :class:`base.Method` with a no-argument constructor and call
:func:`register` (or add a line to ``REGISTRY``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

__all__ = [
    "P2P_METHODS",
    "REGISTRY",
    "MethodUnavailableError",
    "UnknownMethodError",
    "check_names",
    "create_method",
    "method_class",
    "method_names",
    "register",
]

_PKG = "knexa_lab.experiment.methods"

#: name -> "module:Class", in the order tables list them
REGISTRY: dict[str, str] = {
    "local-only": f"{_PKG}.local:LocalOnly",
    "random-p2p": f"{_PKG}.p2p:RandomP2P",
    "heuristic-p2p": f"{_PKG}.p2p:HeuristicP2P",
    "knexa-fl": f"{_PKG}.p2p:KnexaFL",
    "knexa-fl-concat": f"{_PKG}.p2p:KnexaFLConcat",
    "knexa-fl-hybrid": f"{_PKG}.p2p:KnexaFLHybrid",
    "knexa-fl-skills": f"{_PKG}.p2p:KnexaFLSkills",
    "knexa-fl-compact": f"{_PKG}.p2p:KnexaFLCompact",
    "knexa-fl-prior": f"{_PKG}.p2p:KnexaFLPrior",
    "knexa-fl-prior-greedy": f"{_PKG}.p2p:KnexaFLPriorGreedy",
    "knexa-fl-prior-adaptive": f"{_PKG}.p2p:KnexaFLPriorAdaptive",
    "skill-gap-p2p": f"{_PKG}.p2p:SkillGapP2P",
    "fedavg": f"{_PKG}.fedavg:FedAvg",
    "central-kd": f"{_PKG}.central_kd:CentralKD",
    "fedid-centralkd": f"{_PKG}.fedid:FedIDCentralKD",
    "fedproxy": f"{_PKG}.fedproxy:FedProxy",
    "oracle-p2p": f"{_PKG}.oracle:OracleP2P",
}

#: the methods `--mode daemons` can run through the real knexa-cpm / knexa-node processes
P2P_METHODS: tuple[str, ...] = ("random-p2p", "heuristic-p2p", "knexa-fl", "knexa-fl-concat", "knexa-fl-hybrid",
                                 "knexa-fl-skills", "knexa-fl-compact", "knexa-fl-prior",
                                 "knexa-fl-prior-greedy", "knexa-fl-prior-adaptive", "skill-gap-p2p")


class UnknownMethodError(ValueError):
    """A method name that is not registered (the message lists the registered ones)."""


class MethodUnavailableError(ImportError):
    """A registered method whose module or class cannot be imported."""


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def register(name: str, target: str) -> None:
    """Register (or replace) ``name`` -> ``"package.module:Class"``."""
    module, sep, cls = target.partition(":")
    if not sep or not module or not cls:
        raise ValueError(f"method target must look like 'package.module:Class', got {target!r}")
    REGISTRY[name] = target


def check_names(names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`UnknownMethodError` naming every unknown method at once."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UnknownMethodError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                 f"known: {', '.join(REGISTRY)}")


def method_class(name: str) -> type[Method]:
    """Import and return the class registered as ``name``.

    Raises:
        UnknownMethodError: ``name`` is not registered.
        MethodUnavailableError: its module or class cannot be imported (the cause is chained).
    """
    check_names([name])
    module_name, _, cls_name = REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken method module (any error) must not stop the others
        raise MethodUnavailableError(f"method {name!r}: cannot import {module_name} "
                                     f"({type(exc).__name__}: {exc})") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise MethodUnavailableError(f"method {name!r}: {module_name} has no class {cls_name}")
    return cls


def create_method(name: str) -> Method:
    """A fresh instance of the method called ``name`` (one per (method, seed) run)."""
    return method_class(name)()

"""Per-round checkpoints of a (method, seed) run and the experiment's progress file.

Layout under the results directory::

    runs/<method>/seed-<s>/progress.json           rounds done and the committed checkpoint
    runs/<method>/seed-<s>/checkpoint/round-<k>/   the state after k completed rounds:
        client-<i>/     TorchBackend.save_checkpoint (adapter, optimiser, torch RNG, meta)
        method/         Method.save
        engine.json     evaluation histories and the process RNG states

Commit protocol (a kill at any instant leaves a resumable state): write ``round-<k>`` in full,
then atomically rewrite the run's ``progress.json`` to point at it, then delete older ``round-*`` folders.
A crash before the progress write leaves the previous round as the truth (the half-written
folder is deleted on resume); after it, round k is. Metrics rows beyond the checkpointed round
are dropped on resume (:func:`knexa_lab.experiment.metrics.drop_rows`).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knexa_runtime.atomic import atomic_write_json

from .methods.base import Client, Method

__all__ = ["PROGRESS_FILE", "Progress", "RunState", "prune_checkpoints", "restore_round", "run_key", "save_round"]

PROGRESS_FILE = "progress.json"
_ENGINE = "engine.json"


def run_key(method: str, seed: int) -> str:
    return f"{method}/seed-{seed}"


@dataclass(frozen=True, slots=True)
class RunState:
    rounds_done: int
    total_rounds: int
    #: checkpoint folder relative to the results directory (None before the first round)
    checkpoint: str | None = None

    @property
    def done(self) -> bool:
        return self.rounds_done >= self.total_rounds


class Progress:
    """Every run's ``progress.json`` (``runs/<method>/seed-<s>/progress.json``).

    One file per run, each rewritten atomically by the only process that runs it, so parallel
    runs (``jobs > 1``) never write the same file.
    """

    def __init__(self, results_dir: Path) -> None:
        self.root = Path(results_dir)
        self.runs: dict[str, RunState] = {}
        for path in sorted(self.root.glob(f"runs/*/seed-*/{PROGRESS_FILE}")):
            self.runs[f"{path.parent.parent.name}/{path.parent.name}"] = RunState(**json.loads(path.read_text()))

    def path(self, key: str) -> Path:
        return self.root / "runs" / key / PROGRESS_FILE

    def get(self, key: str) -> RunState | None:
        return self.runs.get(key)

    def set(self, key: str, state: RunState) -> None:
        self.runs[key] = state
        atomic_write_json(self.path(key), asdict(state))

    def rounds_done(self, key: str) -> int:
        state = self.runs.get(key)
        return state.rounds_done if state else 0


def _rng_state() -> dict[str, Any]:
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "python": [version, list(internal), gauss],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_round(results_dir: Path, run_dir: Path, rounds_done: int, clients: Sequence[Client], method: Method,
               history: Mapping[int, Sequence[Any]]) -> str:
    """Write the complete state after ``rounds_done`` rounds; returns its path relative to
    ``results_dir`` (to be committed with :meth:`Progress.set`)."""
    folder = run_dir / "checkpoint" / f"round-{rounds_done:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    for c in clients:
        c.backend.save_checkpoint(folder / c.name)
    (folder / "method").mkdir(parents=True, exist_ok=True)
    method.save(folder / "method")
    atomic_write_json(folder / _ENGINE, {
        "rounds_done": rounds_done,
        "history": {str(i): [asdict(ev) for ev in evs] for i, evs in history.items()},
        "rng": _rng_state(),
    })
    return str(folder.relative_to(results_dir))


def restore_round(results_dir: Path, state: RunState, clients: Sequence[Client], method: Method) -> dict[int, list[Any]]:
    """Load what :func:`save_round` wrote into freshly built clients and a set-up method.

    Returns:
        The evaluation histories by client index.
    Raises:
        FileNotFoundError: the checkpoint is missing (the results directory was tampered with).
    """
    from knexa_node.backend import EvalReport

    if state.checkpoint is None:
        raise FileNotFoundError("no checkpoint recorded for this run")
    folder = Path(results_dir) / state.checkpoint
    if not (folder / _ENGINE).is_file():
        raise FileNotFoundError(f"checkpoint {folder} is missing or incomplete")
    for c in clients:
        if not c.backend.load_checkpoint(folder / c.name):
            raise FileNotFoundError(f"checkpoint {folder / c.name} is missing")
    method.load(folder / "method")
    engine = json.loads((folder / _ENGINE).read_text())
    _set_rng_state(engine["rng"])
    return {int(i): [EvalReport(**ev) for ev in evs] for i, evs in engine["history"].items()}


def prune_checkpoints(run_dir: Path, keep: str | None, results_dir: Path) -> None:
    """Delete every ``round-*`` folder of the run except ``keep`` (relative to ``results_dir``)."""
    root = run_dir / "checkpoint"
    if not root.is_dir():
        return
    keep_path = (Path(results_dir) / keep).resolve() if keep else None
    for d in root.iterdir():
        if d.resolve() != keep_path:
            shutil.rmtree(d, ignore_errors=True)

"""The experiment loop: every method on the same split, seeds and budget, checkpointed per round.

For each seed: one split (``data/seed-<s>/``, :func:`prepare_split`). For each method: fresh
clients (the same models, data and per-client seeds for every method), ``method.setup``, then per
round (SPEC "One round t"): each client's local epoch (unless ``method.local_training`` is
False), ``method.communicate``, an evaluation of every client (greedy Pass@1, CodeBLEU, val loss;
sampled Pass@5/10 when configured), one metrics row per client, and a checkpoint
(:mod:`.checkpoint`). Models are freed between methods.

Randomness: the split from the seed; client i's learning seed ``seed * 1000 + i``; the method's
round generator from (seed, round, method name). Training, generation and evaluation seed
themselves per phase and round (``knexa_node.training.phase_seed``), so a resumed run replays
exactly what an uninterrupted one would have done.

``jobs > 1`` runs several (method, seed) runs at once in worker processes (:mod:`.parallel`);
``mode="daemons"`` runs the P2P methods through real ``knexa-cpm``/``knexa-node`` processes
instead (:mod:`.daemons`), writing the same metrics rows.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from knexa_runtime.atomic import atomic_write_json

from .checkpoint import Progress, RunState, prune_checkpoints, restore_round, run_key, save_round
from .config import ExperimentConfig, client_seed, config_to_dict, learning_config
from .methods import P2P_METHODS, MethodUnavailableError, create_method, method_class
from .methods.base import Client, ClientStep, Method, RoundContext
from .metrics import METRICS_CSV, METRICS_JSONL, append_rows, drop_rows, read_rows, write_csv

__all__ = ["Events", "ExperimentError", "RunJob", "build_clients", "prepare_split", "run_experiment", "run_one"]

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run-info.json"
MODES = ("sim", "daemons")


class ExperimentError(Exception):
    """The experiment cannot start or continue (the message is one line for the user)."""


# ---- data and clients ---------------------------------------------------------------------------

def prepare_split(cfg: ExperimentConfig, seed: int, out_dir: Path) -> Path:
    """Write (once) the seed's split: test, transfer, and per-client shards capped as configured."""
    from knexa_node.data import load_problems, make_split, write_split

    if (out_dir / "manifest.json").is_file():
        return out_dir
    e = cfg.experiment
    if e.problems == "skills":
        from knexa_lab.skills.split import make_skills_split, write_skills_split

        split = make_skills_split(cfg.skills.split_settings(len(e.models)), seed)
        write_skills_split(split, out_dir)
        logger.info("skills split seed=%d: test=%d transfer=%d probe=%d; training problems per client and "
                    "category: %s", seed, len(split.test), len(split.transfer), len(split.probe), split.counts)
        return out_dir
    split = make_split(load_problems(e.problems), n_nodes=len(e.models), seed=seed,
                       test_size=e.test_size or None, transfer_size=e.transfer_size, alpha=e.dirichlet_alpha)
    # shards are already shuffled, so a prefix keeps each client's category mix in expectation
    nodes = [(train[:e.train_cap] if e.train_cap else train, val[:e.val_cap] if e.val_cap else val)
             for train, val in split.nodes]
    write_split(dataclasses.replace(split, nodes=nodes), out_dir)
    logger.info("split seed=%d: test=%d transfer=%d train per client=%s", seed, len(split.test),
                len(split.transfer), [len(t) for t, _ in nodes])
    return out_dir


def build_clients(cfg: ExperimentConfig, seed: int, data_dir: Path, cache_dir: Path | None) -> list[Client]:
    """Fresh clients for one (method, seed) run: same models, shards and seeds for every method."""
    from knexa_node.torch_backend import TorchBackend

    clients = []
    for i, model in enumerate(cfg.experiment.models):
        if cfg.experiment.problems == "skills":
            model = str(skills_model(cfg, seed, model, data_dir / f"node-{i}", cache_dir))
        backend = TorchBackend.create(model, data_dir / f"node-{i}", learning_config(cfg, seed, i),
                                      cache_dir=cache_dir, public_dir=data_dir / "public")
        clients.append(Client(index=i, name=f"client-{i}", backend=backend, seed=client_seed(seed, i)))
    return clients


def skills_model(cfg: ExperimentConfig, seed: int, name: str, node_dir: Path, cache_dir: Path | None) -> Path:
    """The client's own pre-trained model (its family's public base fine-tuned on its shard)."""
    from knexa_lab.skills.models import build_client_model, skills_family
    from knexa_node.data import read_jsonl
    from knexa_node.models import default_cache_dir

    settings = cfg.skills.pretrain_settings(int(cfg.learning.get("threads", 1)) or 1)
    cache = Path(cache_dir or default_cache_dir()) / "skills"
    return build_client_model(skills_family(name), read_jsonl(node_dir / "train.jsonl"), cache, seed, settings)


def _free(clients: list[Client]) -> None:
    clients.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ---- results directory --------------------------------------------------------------------------

def _open_results(out: Path, cfg: ExperimentConfig, mode: str, argv: list[str] | None) -> None:
    from .provenance import git_commit, package_versions, run_info, version_differences

    out.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    cfg_path, info_path = out / CONFIG_FILE, out / RUN_INFO_FILE
    if cfg_path.exists():
        saved = _with_defaults(json.loads(cfg_path.read_text()))
        diff = _differences(_comparable(saved), _comparable(data))
        if diff:
            raise ExperimentError(f"{out} holds an experiment with another configuration (differs in "
                                  f"{', '.join(diff)}); resume it with --resume {out} or pick another --out")
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if info.get("mode", mode) != mode:
            raise ExperimentError(f"{out} was run with --mode {info['mode']}, not {mode}")
        # when, and from which code: a run continued by a later commit says so (its rows must not change)
        info.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        info.setdefault("resumed_git", []).append(git_commit())
        changed = version_differences(info.get("packages"), package_versions())
        if changed:  # continuing is allowed (the finished rounds stay valid) but never silent
            logger.warning("resuming %s with other package versions than it started with (%s): the rounds run "
                           "now may not match what the old versions would have given", out, ", ".join(changed))
            info.setdefault("resumed_versions", []).append({"at": info["resumed"][-1], "changed": changed})
        atomic_write_json(info_path, info)
        return
    atomic_write_json(cfg_path, data)
    atomic_write_json(info_path, run_info(preset=cfg.preset, seeds=list(cfg.experiment.seeds), mode=mode,
                                          argv=argv))


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings added since it was written at their defaults, so an
    experiment saved by an older version resumes (the defaults are what it ran with)."""
    from .config import ConfigError, config_from_dict

    try:
        return config_to_dict(config_from_dict(saved))
    except ConfigError:  # an invalid old config is compared as saved, and the difference named
        return saved


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config without its execution settings (jobs may change between sessions)."""
    return {**data, "experiment": {k: v for k, v in data.get("experiment", {}).items() if k != "jobs"}}


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested tables."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def _check_methods(cfg: ExperimentConfig, mode: str) -> None:
    problems = []
    for name in cfg.experiment.methods:
        try:
            method_class(name)
        except MethodUnavailableError as exc:
            problems.append(str(exc))
    if mode == "daemons":
        other = [m for m in cfg.experiment.methods if m not in P2P_METHODS]
        if other:
            problems.append(f"--mode daemons runs only the P2P methods ({', '.join(P2P_METHODS)}), not "
                            f"{', '.join(other)}")
    if problems:
        raise ExperimentError("; ".join(problems))


# ---- one round ----------------------------------------------------------------------------------

def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _round(cfg: ExperimentConfig, name: str, seed: int, r: int, clients: Sequence[Client], method: Method,
           settings: Mapping[str, Any], history: dict[int, list[Any]], workdir: Path,
           data_dir: Path | None = None) -> list[dict[str, Any]]:
    e = cfg.experiment
    spent = {c.index: 0.0 for c in clients}
    budget0 = {c.index: c.backend.budget() for c in clients}
    train: dict[int, Any] = {}
    if method.local_training:
        for c in clients:
            t0 = time.perf_counter()
            train[c.index] = c.backend.train_local_epoch(r)
            spent[c.index] += time.perf_counter() - t0
    rng = np.random.default_rng(np.random.SeedSequence([seed, r, zlib.crc32(name.encode())]))
    ctx = RoundContext(round_idx=r, total_rounds=e.rounds, clients=clients, rng=rng,
                       history={i: tuple(h) for i, h in history.items()}, settings=settings, workdir=workdir,
                       extras={"data_dir": data_dir})
    t0 = time.perf_counter()
    steps: dict[int, ClientStep] = method.communicate(ctx) or {}
    share = (time.perf_counter() - t0) / len(clients)
    stray = sorted(set(steps) - {c.index for c in clients})
    if stray:
        raise ValueError(f"{name}.communicate returned steps for unknown client indices {stray}")
    spent_budget = {c.index: {k: v - budget0[c.index][k] for k, v in c.backend.budget().items()} for c in clients}
    rows = []
    sample = e.passk_samples > 0 and (e.passk_when == "every" or r == e.rounds - 1)
    for c in clients:
        t0 = time.perf_counter()
        ev = c.backend.evaluate(r)
        pk = (c.backend.evaluate_pass_at_k(e.passk_samples, ks=(5, 10), temperature=e.passk_temperature,
                                           round_idx=r) if sample else {})
        spent[c.index] += time.perf_counter() - t0
        history[c.index].append(ev)
        step = steps.get(c.index, ClientStep())
        tr = train.get(c.index)
        rows.append({
            "method": name, "seed": seed, "round": r + 1, "client": c.name, "model": c.backend.model_name,
            "family": c.backend.family, "pass_at_1": ev.pass_at_1, "pass_at_5": pk.get(5),
            "pass_at_10": pk.get(10), "codebleu": ev.codebleu, "val_loss": _finite(ev.val_loss),
            "train_loss": _finite(tr.mean_loss) if tr is not None and tr.steps else None,
            "role": step.role, "partner": step.partner, "reward": _finite(step.reward),
            "kd_loss": _finite(step.kd_loss), "bytes_sent": int(step.bytes_sent),
            "bytes_received": int(step.bytes_received),
            # the round's budget (equal-budget check): steps on local data, steps with a teacher's
            # text, tokens trained on, tokens generated for teaching
            **spent_budget[c.index],
            "categories": getattr(ev, "per_category", None) or None,
            # the client's share of the round: its local epoch and evaluation plus 1/N of the
            # collaboration step, so the rows of a round sum to its wall time
            "wall_s": round(spent[c.index] + share, 3),
        })
    return rows


# ---- one (method, seed) run ---------------------------------------------------------------------

@dataclass(frozen=True)
class RunJob:
    """Everything one (method, seed) run needs; picklable, so it can run in a worker process."""

    cfg: ExperimentConfig
    out: Path
    name: str
    seed: int
    data_dir: Path
    cache_dir: Path | None
    mode: str = "sim"

    @property
    def key(self) -> str:
        return run_key(self.name, self.seed)


#: ``events(kind, key, round)``: kind "start" before a round (1-based), "done" after its commit
Events = Callable[[str, str, int], None]


def run_one(job: RunJob, events: Events) -> None:
    """Run (or continue from its last checkpoint) one (method, seed)."""
    if job.mode == "daemons":
        from .daemons import run_daemons

        progress = Progress(job.out)
        events("start", job.key, 1)
        run_daemons(job.cfg, job.out, job.name, job.seed, job.data_dir, progress, job.cache_dir)
        for r in range(job.cfg.experiment.rounds):
            events("done", job.key, r + 1)
        return
    _run_sim(job, events)


def _run_sim(job: RunJob, events: Events) -> None:
    cfg, out, name, seed, e = job.cfg, job.out, job.name, job.seed, job.cfg.experiment
    progress = Progress(out)
    key = job.key
    run_dir = out / "runs" / name / f"seed-{seed}"
    workdir = run_dir / "work"
    state = progress.get(key)
    prune_checkpoints(run_dir, state.checkpoint if state else None, out)
    if state is None:
        shutil.rmtree(workdir, ignore_errors=True)  # leftovers of a run that never checkpointed
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(cfg.methods.get(name, {}))
    clients = build_clients(cfg, seed, job.data_dir, job.cache_dir)
    method: Method | None = None
    try:
        base = {c.index: c.backend.base_fingerprint() for c in clients}
        method = create_method(name)
        method.setup(clients, settings, workdir)
        history: dict[int, list[Any]] = {c.index: [] for c in clients}
        start = 0
        if state is not None and state.rounds_done:
            history = restore_round(out, state, clients, method)
            start = state.rounds_done
            logger.info("%s seed=%d: resuming after round %d of %d", name, seed, start, e.rounds)
        for r in range(start, e.rounds):
            events("start", key, r + 1)
            t0 = time.perf_counter()
            rows = _round(cfg, name, seed, r, clients, method, settings, history, workdir, job.data_dir)
            if r + 1 == e.rounds:  # before the last commit, so a run that broke this never counts as done
                changed = [c.name for c in clients if c.backend.base_fingerprint() != base[c.index]]
                if changed:
                    raise RuntimeError(f"{name} changed the frozen base weights of {', '.join(changed)}")
            append_rows(out / METRICS_JSONL, rows)
            ckpt = save_round(out, run_dir, r + 1, clients, method, history)
            progress.set(key, RunState(rounds_done=r + 1, total_rounds=e.rounds, checkpoint=ckpt))
            prune_checkpoints(run_dir, ckpt, out)
            events("done", key, r + 1)
            losses = [x["val_loss"] for x in rows if x["val_loss"] is not None]
            logger.info("%s seed=%d round %d/%d: mean Pass@1 %.3f, val loss %s, %.1fs", name, seed, r + 1,
                        e.rounds, float(np.mean([x["pass_at_1"] for x in rows])),
                        f"{np.mean(losses):.4f}" if losses else "n/a", time.perf_counter() - t0)
    finally:
        method = None  # drop the method's references to models before collecting
        _free(clients)


def run_experiment(cfg: ExperimentConfig, out: Path, *, mode: str = "sim", cache_dir: Path | None = None,
                   progress: bool = True, argv: list[str] | None = None, jobs: int | None = None) -> list[str]:
    """Run (or continue) the experiment in ``out``; returns the keys of runs that failed.

    Args:
        jobs: (method, seed) runs at once, each in its own process (sim mode); 1 = all in this
            process; None = ``cfg.experiment.jobs``. Results do not depend on it: every run
            seeds itself.

    A run (method, seed) that raises is logged with its traceback and recorded as failed; the
    others go on, and a later call retries it from its last checkpoint. KeyboardInterrupt stops
    at once: every completed round is checkpointed, so calling again resumes.

    Raises:
        ExperimentError: ``out`` holds another experiment, a method cannot be imported, or a
            daemons-mode method is not a P2P method.
    """
    if mode not in MODES:
        raise ExperimentError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    _check_methods(cfg, mode)
    out = Path(out)
    _open_results(out, cfg, mode, argv)
    state = Progress(out)
    e = cfg.experiment
    jobs = e.jobs if jobs is None else jobs
    logger.info("experiment %s (%s): %d methods x %d seeds x %d rounds, %d clients, %d job%s -> %s",
                cfg.preset or "", mode, len(e.methods), len(e.seeds), e.rounds, len(e.models), jobs,
                "s" if jobs > 1 else "", out)

    def beyond_checkpoint(row: dict[str, Any]) -> bool:
        return row["round"] > state.rounds_done(run_key(row["method"], row["seed"]))

    dropped = drop_rows(out / METRICS_JSONL, beyond_checkpoint)
    if dropped:
        logger.info("dropped %d metrics rows written after the last checkpoint", dropped)
    todo = []
    for seed in e.seeds:
        data_dir = prepare_split(cfg, seed, out / "data" / f"seed-{seed}")
        for name in e.methods:
            run = state.get(run_key(name, seed))
            if run is None or not run.done:
                todo.append(RunJob(cfg, out, name, seed, data_dir, cache_dir, mode))
    total = len(e.methods) * len(e.seeds) * e.rounds
    done = sum(min(state.rounds_done(run_key(m, s)), e.rounds) for m in e.methods for s in e.seeds)
    failed: list[str] = []
    with tqdm(total=total, initial=done, desc="rounds", unit="round", disable=not progress,
              dynamic_ncols=True) as bar:

        def events(kind: str, key: str, r: int) -> None:
            if kind == "start":
                bar.set_postfix_str(f"{key} round {r}/{e.rounds}")
            else:
                bar.update(1)

        if jobs > 1 and mode == "sim" and len(todo) > 1:
            from .parallel import run_parallel

            failed = run_parallel(todo, jobs, events)
        else:
            for job in todo:
                try:
                    run_one(job, events)
                except Exception:
                    logger.exception("%s seed=%d failed; the other runs go on (re-run to retry it)",
                                     job.name, job.seed)
                    failed.append(job.key)
    # a run that failed mid-round may have left rows past its checkpoint; its retry rewrites them
    state = Progress(out)
    drop_rows(out / METRICS_JSONL, beyond_checkpoint)
    write_csv(out / METRICS_JSONL, out / METRICS_CSV)
    logger.info("metrics: %d rows in %s", len(read_rows(out / METRICS_JSONL)), out / METRICS_JSONL)
    return failed

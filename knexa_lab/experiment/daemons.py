"""``--mode daemons``: the P2P methods through real ``knexa-cpm serve`` + ``knexa-node start``.

Each (method, seed) is one federation on loopback (:func:`knexa_lab.launcher.run_federation`)
on the seed's split, with the same per-client learning seeds as the simulation and the CPM's
policy/context taken from the method (``random-p2p`` -> random, ``knexa-fl-concat`` -> linucb +
concat, ...). The nodes' ``rounds.jsonl`` become the same metrics rows as in-process runs.

Alignment with the simulation's rows: a node logs round r's role, partner, reward, bytes and KD
loss in its round-r entry, but evaluates *before* the exchange (after the local epoch). Row
``round = r + 1`` therefore takes its Pass@1, CodeBLEU and val loss from the node's next
evaluation, the one of round r + 1 (which follows one more local epoch), or for the last round
from ``final.json`` (after the last exchange, exactly as in-process). Sampled Pass@5/10 is not
available here (None). ``wall_s`` is the node's own round time; nodes run concurrently, so the
rows of a round do not add up to its wall time as they do in-process. A node left unmatched is
``local`` (the node logs "idle"); ``no_directive`` means the CPM's directive never arrived.

A federation interrupted mid-way is started again from scratch on resume (the daemons' own
state is not matched to the experiment's checkpoints); finished ones are skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Progress, RunState, run_key
from .config import ExperimentConfig, client_seed
from .methods.p2p import SETTINGS, policy_seed
from .metrics import METRICS_JSONL, append_rows

__all__ = ["DAEMON_SETTINGS", "rows_from_nodes", "run_daemons"]

logger = logging.getLogger(__name__)

#: P2P settings the daemons can honour: method setting -> (section, key) of their configs
DAEMON_SETTINGS: dict[str, tuple[str, str]] = {
    "policy": ("cpm", "policy"), "context": ("cpm", "context"), "lam": ("cpm", "lam"),
    "beta0": ("cpm", "beta0"), "seed": ("cpm", "seed"),
    "gamma": ("node", "reward_gamma"), "delta": ("node", "reward_delta"),
    "profile_decimals": ("node", "profile_decimals"), "profile_epsilon": ("node", "profile_epsilon"),
    "share_skills": ("node", "share_skills"),
    "skill_prior": ("cpm", "skill_prior"), "reward_scale": ("cpm", "reward_scale"), "explore": ("cpm", "explore"),
    "adaptive_effects": ("cpm", "adaptive_effects"),
}  # fmt: skip


def _daemon_configs(cfg: ExperimentConfig, name: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from .methods import method_class

    cls: Any = method_class(name)
    table = dict(cfg.methods.get(name, {}))
    unsupported = sorted(k for k, v in table.items() if k not in DAEMON_SETTINGS and SETTINGS.get(k, object()) != v)
    if unsupported:
        raise ValueError(f"{name}: settings {unsupported} are not available in --mode daemons "
                         f"(only {', '.join(DAEMON_SETTINGS)})")
    s = {**SETTINGS, **cls.defaults, **table}
    s["policy"] = s["policy"] or cls.policy_name
    s["context"] = s["context"] or cls.context
    if s["seed"] is None:
        s["seed"] = policy_seed([client_seed(seed, i) for i in range(len(cfg.experiment.models))])
    cpm: dict[str, Any] = {}
    node: dict[str, Any] = {"final_eval": True, "directive_timeout_s": cfg.daemons.directive_timeout_s,
                            "package_timeout_s": cfg.daemons.package_timeout_s}
    for key, (section, field) in DAEMON_SETTINGS.items():
        (cpm if section == "cpm" else node)[field] = s[key]
    return cpm, node


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_from_nodes(method: str, seed: int, node_dirs: Sequence[Path], rounds: int) -> list[dict[str, Any]]:
    """Metrics rows (METRIC_FIELDS) from each node's ``rounds.jsonl`` and ``final.json``.

    Raises:
        ValueError: a node did not log every round (it failed or was stopped).
    """
    logs = [{e["round"]: e for e in _read_jsonl(d / "rounds.jsonl")} for d in node_dirs]
    names = {e["node"]: f"client-{i}" for i, log in enumerate(logs) for e in log.values()}
    rows = []
    for i, (d, log) in enumerate(zip(node_dirs, logs, strict=True)):
        missing = [r for r in range(rounds) if r not in log]
        if missing:
            raise ValueError(f"node-{i} ({d}) logged no entry for rounds {missing}; see its node.log")
        final_path = d / "final.json"
        final = json.loads(final_path.read_text()) if final_path.exists() else log[rounds - 1]
        for r in range(rounds):
            e = log[r]
            ev = log[r + 1] if r + 1 < rounds else final
            role = e.get("role", "idle")
            role = "local" if role == "idle" else role  # matched with nobody: the simulation's word
            nbytes = int(e.get("package_bytes", 0) or 0)
            rows.append({
                "method": method, "seed": seed, "round": r + 1, "client": f"client-{i}", "model": e["model"],
                "family": e["family"], "pass_at_1": ev["pass_at_1"], "pass_at_5": None, "pass_at_10": None,
                "codebleu": ev["codebleu"], "val_loss": ev["val_loss"], "train_loss": e.get("train_loss"),
                "role": role, "partner": names.get(e.get("partner"), e.get("partner")),
                "reward": e.get("reward"), "kd_loss": e.get("kd_loss"),
                "bytes_sent": nbytes if role == "teacher" else 0,
                "bytes_received": nbytes if role == "student" else 0,
                "wall_s": e.get("seconds"),
                **{k: (e.get("budget") or {}).get(k) for k in ("local_steps", "kd_steps", "tokens_trained",
                                                               "tokens_generated")},
                "categories": None,
            })
    return rows


def run_daemons(cfg: ExperimentConfig, out: Path, name: str, seed: int, data_dir: Path, progress: Progress,
                cache_dir: Path | None) -> None:
    """Run one (method, seed) as a real federation and append its metrics rows.

    Raises:
        knexa_lab.launcher.LaunchError: the CPM died or the federation timed out.
        RuntimeError: a node exited with an error.
    """
    from knexa_lab.launcher import FederationSpec, run_federation
    from knexa_node.models import default_cache_dir, prepare_model

    e = cfg.experiment
    if e.passk_samples:
        logger.warning("%s seed=%d: sampled Pass@5/10 is not measured in --mode daemons (left empty)", name, seed)
    fed_dir = out / "runs" / name / f"seed-{seed}" / "federation"
    shutil.rmtree(fed_dir, ignore_errors=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    models = list(e.models)
    if e.problems == "skills":  # each client's own pre-trained model, as in simulation
        from .engine import skills_model

        models = [str(skills_model(cfg, seed, m, data_dir / f"node-{i}", cache_dir)) for i, m in enumerate(models)]
    for model in dict.fromkeys(models):
        prepare_model(model, cache_dir=cache)  # once here, not raced by N nodes
    cpm, node = _daemon_configs(cfg, name, seed)
    spec = FederationSpec(out=fed_dir, data=data_dir, models=models, rounds=e.rounds,
                          learning=dict(cfg.learning), cache=cache,
                          node_seeds=[client_seed(seed, i) for i in range(len(e.models))], cpm=cpm, node=node,
                          federation=f"knexa-{name}-{seed}", round_timeout_s=cfg.daemons.round_timeout_s,
                          timeout_s=cfg.daemons.timeout_s, progress=False)
    fed = run_federation(spec, lambda msg: logger.info("%s seed=%d: %s", name, seed, msg))
    if fed.failed:
        raise RuntimeError(f"{name} seed={seed}: nodes {', '.join(fed.failed)} failed (see {fed_dir}/node-*/node.log)")
    append_rows(out / METRICS_JSONL, rows_from_nodes(name, seed, fed.node_dirs, e.rounds))
    progress.set(run_key(name, seed), RunState(rounds_done=e.rounds, total_rounds=e.rounds, checkpoint=None))

"""`knexa-lab run`: a whole federation on loopback, as separate OS processes.

Steps: split the data once (seeded), prepare the models (build tiny ones, convert the embedded
GGUF once), create every identity up front (so each node gets the roster and bootstrap list),
start `knexa-cpm serve`, then N `knexa-node start`, follow their round logs with a progress bar,
print the per-round table and a summary, and stop everything. Children get PDEATHSIG, so even a
SIGKILLed launcher leaves no daemon behind.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from tqdm import tqdm

from .procs import Child, spawn
from .results import collect, format_round_table, format_summary, write_results

__all__ = ["Federation", "FederationSpec", "LaunchError", "RunOptions", "load_preset", "run", "run_federation"]


class LaunchError(Exception):
    """The federation could not be started or did not finish."""


@dataclass(frozen=True)
class RunOptions:
    preset: str = "embedded"
    nodes: int | None = None
    rounds: int | None = None
    model: str | None = None
    out: Path | None = None
    federation: str = "knexa-local"
    timeout_s: float = 3600.0
    cache_dir: Path | None = None
    progress: bool = True


def load_preset(name: str) -> dict[str, Any]:
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return tomllib.loads(path.read_text())
    try:
        text = resources.files("knexa_lab.presets").joinpath(f"{name}.toml").read_text()
    except FileNotFoundError as exc:
        raise LaunchError(f"unknown preset {name!r} (built in: tiny, embedded; or a .toml path)") from exc
    return tomllib.loads(text)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _models_for(preset: dict[str, Any], opts: RunOptions) -> list[str]:
    models = list(preset["run"]["models"])
    n = opts.nodes or len(models)
    if opts.model:
        return [opts.model] * n
    return [models[i % len(models)] for i in range(n)]


def _prepare(out: Path, models: list[str], preset: dict[str, Any], cache: Path, say: Any) -> Path:
    from knexa_node.data import load_problems, make_split, write_split
    from knexa_node.models import prepare_model

    run = preset["run"]
    say(f"splitting HumanEval across {len(models)} nodes (Dirichlet alpha={run['dirichlet_alpha']}, seed={run['seed']})")
    split = make_split(load_problems(), n_nodes=len(models), seed=run["seed"], test_size=run["test_size"],
                       transfer_size=run["transfer_size"], alpha=run["dirichlet_alpha"])
    # optional caps keep a CPU demo short: the first N of each (already shuffled) shard
    train_cap, val_cap = int(run.get("train_cap", 0)), int(run.get("val_cap", 0))
    if train_cap or val_cap:
        split = dataclasses.replace(split, nodes=[(train[:train_cap or None], val[:val_cap or None])
                                                  for train, val in split.nodes])
    data = out / "data"
    write_split(split, data)
    for name in sorted(set(models)):
        say(f"preparing model {name}")
        prepare_model(name, cache_dir=cache)
    return data


@dataclass(frozen=True)
class FederationSpec:
    """One federation of real processes on loopback: the data is already split under ``data``."""

    out: Path
    data: Path
    models: list[str]
    rounds: int
    #: the shared [learning] table; each node adds its own ``seed`` (node_seeds) and total_rounds
    learning: dict[str, Any]
    node_seeds: list[int]
    cache: Path
    #: extra [cpm] / [node] keys (policy, context, seed; reward_gamma, timeouts, ...)
    cpm: dict[str, Any] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)
    federation: str = "knexa-local"
    round_timeout_s: float = 120.0
    timeout_s: float = 3600.0
    progress: bool = True


@dataclass(frozen=True)
class Federation:
    """What a finished federation left behind."""

    cpm_dir: Path
    cpm_addr: str
    node_dirs: list[Path]
    roster: list[str]
    #: names of nodes that exited non-zero (see their node.log)
    failed: list[str]


def run_federation(spec: FederationSpec, say: Any) -> Federation:
    """Start `knexa-cpm serve` and one `knexa-node start` per model, follow them to the end, stop
    every child (also on Ctrl-C, which propagates as KeyboardInterrupt).

    Raises:
        LaunchError: the CPM died, or the federation did not finish within ``spec.timeout_s``.
    """
    from knexa_p2p.identity import load_or_create_identity

    out, models = spec.out, spec.models
    ports = _free_ports(len(models) + 1)
    cpm_dir = out / "cpm"
    cpm_id = load_or_create_identity(cpm_dir / "identity.key")
    node_dirs = [out / f"node-{i}" for i in range(len(models))]
    node_ids = [load_or_create_identity(d / "identity.key") for d in node_dirs]
    roster = [str(i.peer_id) for i in node_ids]
    cpm_addr = f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{cpm_id.peer_id}"
    node_addrs = [f"/ip4/127.0.0.1/tcp/{p}/p2p/{i.peer_id}" for p, i in zip(ports[1:], node_ids, strict=True)]

    cpm_cfg = {"cpm": {"federation": spec.federation, "listen": [f"/ip4/127.0.0.1/tcp/{ports[0]}"],
                       "state_dir": str(cpm_dir), "roster": roster, "round_timeout_s": float(spec.round_timeout_s),
                       **spec.cpm}}
    (cpm_dir / "cpm.toml").write_text(tomli_w.dumps(cpm_cfg))
    env = {"KNEXA_CACHE": str(spec.cache), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(spec.learning.get("threads", 1) or 1)}
    children: list[Child] = []
    try:
        cpm = spawn("cpm", [sys.executable, "-m", "knexa_cpm", "serve", "--config", str(cpm_dir / "cpm.toml")],
                    cpm_dir / "cpm.log", env)
        children.append(cpm)
        cpm.wait_for_line("listening on", 60)
        say(f"cpm listening on {cpm_addr}")
        for i, (model, d) in enumerate(zip(models, node_dirs, strict=True)):
            node_cfg = {
                "node": {"federation": spec.federation, "model": model, "state_dir": str(d),
                         "data_dir": str(spec.data / f"node-{i}"), "public_dir": str(spec.data / "public"),
                         "listen": [f"/ip4/127.0.0.1/tcp/{ports[i + 1]}"], "cpm": cpm_addr,
                         "bootstrap": [a for j, a in enumerate(node_addrs) if j != i],
                         "roster": roster, "rounds": spec.rounds, **spec.node},
                "learning": {**spec.learning, "seed": int(spec.node_seeds[i]), "total_rounds": spec.rounds},
            }
            (d / "node.toml").write_text(tomli_w.dumps(node_cfg))
            children.append(spawn(f"node-{i}", [sys.executable, "-m", "knexa_node", "start", "--config",
                                                str(d / "node.toml")], d / "node.log", env))
        for c, model in zip(children[1:], models, strict=True):
            line = c.wait_for_line("listening on", 600)
            say(f"{c.name} ({model}) {line.split('listening on', 1)[1].strip()}")
        names = {str(i.peer_id): f"node-{k}" for k, i in enumerate(node_ids)}
        _follow(children, node_dirs, spec.rounds, spec.timeout_s, spec.progress, say, names)
    finally:
        for c in reversed(children):
            c.stop()
    failed = [c.name for c in children[1:] if c.proc.returncode not in (0, None)]
    return Federation(cpm_dir=cpm_dir, cpm_addr=cpm_addr, node_dirs=node_dirs, roster=roster, failed=failed)


def run(opts: RunOptions) -> int:
    preset = load_preset(opts.preset)
    models = _models_for(preset, opts)
    if len(models) < 2:
        raise LaunchError("a federation needs at least 2 nodes")
    rounds = opts.rounds or int(preset["run"]["rounds"])
    out = (opts.out or Path("results") / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = (opts.cache_dir or Path.home() / ".cache" / "knexa").resolve()

    def say(msg: str) -> None:
        print(f"[knexa-lab] {msg}", flush=True)

    t_start = time.monotonic()
    say(f"results -> {out}")
    if preset["run"].get("expected"):
        say(f"expected duration: {preset['run']['expected']}")
    data = _prepare(out, models, preset, cache, say)
    seed = int(preset["run"]["seed"])
    spec = FederationSpec(out=out, data=data, models=models, rounds=rounds, learning=dict(preset.get("learning", {})),
                          node_seeds=[seed + i for i in range(len(models))], cache=cache,
                          cpm=dict(preset.get("cpm", {})), node=dict(preset.get("node", {})),
                          federation=opts.federation,
                          round_timeout_s=float(preset["run"].get("round_timeout_s", 120.0)),
                          timeout_s=opts.timeout_s, progress=opts.progress)
    try:
        fed = run_federation(spec, say)
    except KeyboardInterrupt:
        say("interrupted: stopping all daemons")
        return 130
    named = [(f"node-{i}", d) for i, d in enumerate(fed.node_dirs)]
    rounds_log, finals = collect(named)
    meta = {"preset": opts.preset, "models": models, "rounds": rounds, "federation": opts.federation,
            "cpm": fed.cpm_addr, "nodes": dict(zip([n for n, _ in named], fed.roster, strict=True))}
    write_results(out, rounds_log, finals, meta)
    print()
    print("Per-round matches (teacher -> student), reward (Eq. 3), student's validation loss, Pass@1 teacher/student")
    print(format_round_table(rounds_log))
    print()
    print("Summary")
    print(format_summary(rounds_log, finals))
    phases = phase_table(rounds_log)
    if phases:
        print("\nWhere the time went: mean seconds per round in each phase")
        print(phases)
    cpm_state = _cpm_summary(fed.cpm_dir)
    if cpm_state:
        print(f"\nCPM: {cpm_state}")
    print(f"\nresults: {out}/results.json, {out}/rounds.csv; logs: {out}/*/*.log")
    elapsed = time.monotonic() - t_start
    say(f"finished in {int(elapsed // 60)} min {int(elapsed % 60)} s")
    if fed.failed:
        say(f"nodes that failed: {fed.failed} (see their node.log)")
        return 1
    return 0


def _cpm_summary(cpm_dir: Path) -> str:
    from knexa_cpm.state import load_state

    try:
        state = load_state(cpm_dir)
    except Exception as exc:  # the summary is informative only
        return f"state unreadable ({exc})"
    if not state:
        return ""
    s = state["stats"]
    return f"rounds closed={s['rounds_closed']} bandit updates={s['updates']} rejected={s['rejected'] or 'none'}"


def match_line(entry: dict[str, Any], names: dict[str, str]) -> str | None:
    """One line for a student's finished round, printed as it happens: who taught whom, reward."""
    if entry.get("role") != "student":
        return None
    teacher = names.get(str(entry.get("partner")), str(entry.get("partner"))[-6:])
    student = names.get(str(entry.get("node")), str(entry.get("node"))[-6:])
    if "reward" not in entry:
        return f"round {entry['round']}: {teacher} -> {student} failed ({entry.get('error', 'no reward')})"
    # the reward compares the same steps without and with the teacher, in the node's measure
    measure = str(entry.get("reward_measure", "val_loss")).replace("_", " ")
    without = entry.get("val_loss_without", entry.get("val_loss_pre"))
    return (f"round {entry['round']}: {teacher} -> {student}  reward {entry['reward']:+.4f}  "
            f"student {measure} {without:.4f} without the teacher -> {entry['val_loss_post']:.4f} with it  "
            f"({entry.get('seconds', 0):.0f} s round)")


#: phases in the order a round runs them (service.NodeService._phase names)
_PHASE_ORDER = ("train", "evaluate", "profile", "wait_directive", "teach_generate", "teach_send",
                "learn_wait_package", "learn_distill", "integrate_local", "checkpoint")


def phase_table(rounds: list[dict[str, Any]]) -> str:
    """Mean seconds per round in each phase (rows) per node (columns), from rounds.jsonl."""
    by_node: dict[str, list[dict[str, float]]] = {}
    for e in rounds:
        if isinstance(e.get("phase_seconds"), dict):
            by_node.setdefault(e["name"], []).append(e["phase_seconds"])
    seen = {k for ps in by_node.values() for p in ps for k in p}
    phases = [p for p in _PHASE_ORDER if p in seen] + sorted(seen - set(_PHASE_ORDER))
    if not phases:
        return ""
    nodes = sorted(by_node)
    header = f"{'phase':<20}" + "".join(f"{n:>9}" for n in nodes)
    lines = [header, "-" * len(header)]
    for k in phases:
        lines.append(f"{k:<20}" + "".join(f"{sum(p.get(k, 0.0) for p in by_node[n]) / len(by_node[n]):>9.1f}"
                                          for n in nodes))
    return "\n".join(lines)


def _follow(children: list[Child], node_dirs: list[Path], rounds: int, timeout_s: float, progress: bool,
            say: Any, names: dict[str, str] | None = None) -> None:
    import json

    total = rounds * len(node_dirs)
    deadline = time.monotonic() + timeout_s
    seen = [0] * len(node_dirs)
    with tqdm(total=total, desc="node-rounds", unit="round", disable=not progress, file=sys.stdout) as bar:
        done = 0
        while True:
            for k, d in enumerate(node_dirs):
                path = d / "rounds.jsonl"
                lines = path.read_text().splitlines() if path.exists() else []
                for line in lines[seen[k]:]:
                    try:
                        text = match_line(json.loads(line), names or {})
                    except (ValueError, KeyError, TypeError):
                        text = None  # a line being written; the summary reads it again at the end
                    if text and progress:  # above the progress bar, in the launcher's voice
                        bar.write(f"[knexa-lab] {text}", file=sys.stdout)
                    elif text:  # the caller decides where it goes (a log for experiments)
                        say(text)
                seen[k] = len(lines)
            n = sum(seen)
            if n > done:
                bar.update(n - done)
                done = n
            nodes = children[1:]
            if all(c.poll() is not None for c in nodes):
                break
            if children[0].poll() is not None:
                raise LaunchError(f"the CPM exited with {children[0].proc.returncode}; see {children[0].log}")
            if time.monotonic() > deadline:
                raise LaunchError(f"federation did not finish within {timeout_s:.0f}s")
            time.sleep(0.5)
    for c in children[1:]:
        if c.proc.returncode != 0:
            tail = "\n    ".join(c.log_text().splitlines()[-3:])
            say(f"{c.name} exited with {c.proc.returncode}:\n    {tail}")

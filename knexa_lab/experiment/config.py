"""Experiment presets: TOML -> a frozen :class:`ExperimentConfig`, with ``--set`` overrides.

A preset (built in: ``knexa_lab/experiments/{tiny,embedded,paper}.toml``, or any ``.toml`` path)
has these tables; defaults live only in the dataclasses below::

    [experiment]          methods, seeds, rounds, models (one per client), the split
                          (problems, dirichlet_alpha, test_size, transfer_size, train_cap,
                          val_cap), sampled Pass@k (passk_samples, passk_temperature, passk_when)
                          and jobs (runs in parallel processes)
    [learning]            knexa_node.torch_backend.LearningConfig fields, shared by all clients;
                          ``seed`` and ``total_rounds`` are set by the engine (client i of
                          experiment seed s gets seed ``s * 1000 + i``)
    [methods.<name>]      settings handed to that method's ``setup`` (e.g. gamma, beta0, groups)
    [daemons]             timeouts of ``--mode daemons``
    [skills]              the skills benchmark (``experiment.problems = "skills"``): split sizes,
                          Dirichlet alpha over categories and the models' pre-training
                          (:class:`SkillsSection`, ``docs/skills.md``)
    [quick]               overrides (same tables) that ``--quick`` applies: a CI-sized variant

Every problem found (unknown keys, wrong types, bad values, unknown methods) is reported in one
:class:`~knexa_runtime.config.ConfigError`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from knexa_runtime.config import ConfigError, load_config, parse_overrides, to_toml_dict

__all__ = [
    "BUILTIN_PRESETS",
    "ConfigError",
    "DaemonsSection",
    "SkillsSection",
    "ExperimentConfig",
    "ExperimentSection",
    "check_models",
    "client_seed",
    "config_from_dict",
    "config_to_dict",
    "learning_config",
    "load_preset",
    "parse_overrides",
    "resolve_config",
]

BUILTIN_PRESETS: tuple[str, ...] = ("tiny", "embedded", "paper", "skills", "skills-smollm2")
_PASSK_WHEN = ("final", "every")


@dataclass(frozen=True, slots=True)
class ExperimentSection:
    """What is compared, on which data, for how long."""

    #: registry names (knexa_lab.experiment.methods.REGISTRY), run in this order
    methods: tuple[str, ...] = ()
    #: one full comparison per seed: its own split, client seeds and method randomness
    seeds: tuple[int, ...] = (42,)
    rounds: int = 20
    #: one model alias/path per client (the same name twice = two independent clients)
    models: tuple[str, ...] = ()
    #: "humaneval" (embedded), "skills" (the generated benchmark, knexa_lab.skills; models are
    #: then skills-gpt2 / skills-gptneox / skills-llama) or a local .jsonl / Hugging Face
    #: dataset path (knexa_node.data)
    problems: str = "humaneval"
    dirichlet_alpha: float = 0.1
    #: global test set size (0 = a quarter of the problems); only the first
    #: learning.eval_problems of it are evaluated each round
    test_size: int = 0
    #: public transfer set X_u; learning.transfer_size caps how much of it a package covers
    transfer_size: int = 16
    #: at most this many train / val problems per client (0 = the whole Dirichlet shard); sizes
    #: a run without changing who holds which categories (the shard is shuffled first)
    train_cap: int = 0
    val_cap: int = 0
    #: sampled Pass@5/10: candidates per problem (0 = off: pass_at_5/10 stay None), sampling
    #: temperature, and whether to sample after the "final" round only or "every" round
    passk_samples: int = 0
    passk_temperature: float = 0.8
    passk_when: str = "final"
    #: (method, seed) runs at once, each in its own process (in-process when 1); an execution
    #: setting: results do not depend on it, and a resumed experiment may change it
    jobs: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not self.methods:
            problems.append("methods must name at least one method")
        if len(set(self.methods)) != len(self.methods):
            problems.append(f"methods has duplicates: {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
        if any(s < 0 for s in self.seeds):
            problems.append("seeds must be >= 0")
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        if len(self.models) < 2:
            problems.append("models must list at least 2 clients")
        if self.dirichlet_alpha <= 0:
            problems.append("dirichlet_alpha must be > 0")
        for k in ("test_size", "transfer_size", "train_cap", "val_cap", "passk_samples"):
            if getattr(self, k) < 0:
                problems.append(f"{k} must be >= 0")
        if self.passk_samples and self.passk_samples < 5:
            problems.append("passk_samples must be 0 (off) or >= 5 (Pass@5 needs 5 candidates)")
        if self.passk_samples and self.passk_temperature <= 0:
            problems.append("passk_temperature must be > 0 (greedy samples are all identical)")
        if self.jobs < 1:
            problems.append("jobs must be >= 1")
        if self.passk_when not in _PASSK_WHEN:
            problems.append(f"passk_when must be one of {_PASSK_WHEN}, got {self.passk_when!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class DaemonsSection:
    """``--mode daemons``: limits for each (method, seed) federation of real processes."""

    round_timeout_s: float = 600.0
    directive_timeout_s: float = 1800.0
    package_timeout_s: float = 1800.0
    #: give up on one (method, seed) federation after this long
    timeout_s: float = 7200.0


@dataclass(frozen=True, slots=True)
class SkillsSection:
    """The skills benchmark's split and pre-training (see knexa_lab.skills)."""

    #: Dirichlet concentration over the 12 categories (small: each client holds a few)
    alpha: float = 0.2
    train_per_client: int = 64
    val_per_category: int = 2
    test_per_category: int = 20
    transfer_per_category: int = 8
    probe_per_category: int = 4
    hidden: int = 128
    layers: int = 2
    public_examples: int = 3000
    base_steps: int = 400
    client_steps: int = 150
    #: batch and peak learning rate of both pre-training stages (a real model wants a far lower
    #: rate than a tiny one: the skills-smollm2 preset sets its own)
    batch: int = 32
    lr: float = 3e-3

    def __post_init__(self) -> None:
        bad = [k for k in ("train_per_client", "val_per_category", "test_per_category", "transfer_per_category",
                           "probe_per_category", "hidden", "layers", "public_examples", "base_steps", "client_steps",
                           "batch")
               if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 1")
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")

    def split_settings(self, clients: int) -> Any:
        """The :class:`knexa_lab.skills.split.SplitSettings` this table describes."""
        from knexa_lab.skills.split import SplitSettings

        return SplitSettings(clients=clients, **{f: getattr(self, f) for f in SplitSettings.__dataclass_fields__
                                                 if f != "clients"})

    def pretrain_settings(self, threads: int) -> Any:
        """The :class:`knexa_lab.skills.models.PretrainSettings` this table describes."""
        from knexa_lab.skills.models import PretrainSettings

        return PretrainSettings(threads=threads, **{f: getattr(self, f) for f in PretrainSettings.__dataclass_fields__
                                                    if f in SkillsSection.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    skills: SkillsSection = field(default_factory=SkillsSection)
    learning: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    daemons: DaemonsSection = field(default_factory=DaemonsSection)
    #: where it came from (informational; shown in run-info.json and the report)
    preset: str = ""
    description: str = ""


def client_seed(seed: int, index: int) -> int:
    """Client ``index``'s learning seed under experiment seed ``seed`` (same for every method)."""
    return seed * 1000 + index


def learning_config(cfg: ExperimentConfig, seed: int, index: int) -> Any:
    """Client ``index``'s :class:`~knexa_node.torch_backend.LearningConfig` for experiment ``seed``."""
    from knexa_node.torch_backend import LearningConfig

    return LearningConfig.from_dict({**cfg.learning, "seed": client_seed(seed, index),
                                     "total_rounds": cfg.experiment.rounds})


def load_preset(name: str | Path) -> tuple[str, dict[str, Any]]:
    """(label, raw tables) of a built-in preset name or a ``.toml`` file.

    Raises:
        ConfigError: unknown preset, missing file, or invalid TOML.
    """
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        try:
            return str(path), tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"preset file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if str(name) not in BUILTIN_PRESETS:
        raise ConfigError(f"unknown preset {str(name)!r}; built in: {', '.join(BUILTIN_PRESETS)} "
                          "(or a path to a .toml file)")
    text = resources.files("knexa_lab.experiments").joinpath(f"{name}.toml").read_text()
    return str(name), tomllib.loads(text)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_tables(data: dict[str, Any]) -> list[str]:
    """What the dataclasses cannot see: method names, method tables, engine-owned settings."""
    from .methods import REGISTRY

    exp = data.get("experiment") if isinstance(data.get("experiment"), dict) else {}
    methods = exp.get("methods") if isinstance(exp.get("methods"), list) else []
    errors = [f"experiment.methods: unknown method {m!r} (known: {', '.join(REGISTRY)})"
              for m in methods if m not in REGISTRY]
    tables = data.get("methods", {})
    if not isinstance(tables, dict):
        return [*errors, "[methods] must hold one table per method"]
    for name, table in tables.items():
        if name not in REGISTRY:
            errors.append(f"[methods.{name}]: no such method (known: {', '.join(REGISTRY)})")
        elif not isinstance(table, dict):
            errors.append(f"[methods.{name}] must be a table")
    learning = data.get("learning", {})
    for key in ("seed", "total_rounds"):
        if isinstance(learning, dict) and key in learning:
            errors.append(f"learning.{key} is set by the engine (from experiment.seeds / rounds); remove it")
    return errors


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and fully validate a config from plain tables (a preset, or a saved config.json).

    Raises:
        ConfigError: listing every problem.
    """
    errors = _check_tables(data)
    cfg = None
    try:
        cfg = load_config(ExperimentConfig, None, data)
    except ConfigError as exc:
        errors = [line.strip() for line in str(exc).splitlines()[1:]] + errors
    if cfg is not None and not errors:
        try:
            learning_config(cfg, cfg.experiment.seeds[0], 0)
        except (TypeError, ValueError) as exc:
            errors.append(f"learning: {exc}")
    if len(errors) == 1:  # the common case stays one line
        raise ConfigError(errors[0])
    if errors or cfg is None:
        raise ConfigError(f"{len(errors)} problems in the experiment configuration:\n  " + "\n  ".join(errors))
    return cfg


def resolve_config(preset: str | Path, overrides: dict[str, Any] | None = None, *,
                   quick: bool = False) -> ExperimentConfig:
    """Load ``preset``, apply its ``[quick]`` table when ``quick``, then ``overrides`` (``--set``
    and flags, as nested tables), and validate.

    Raises:
        ConfigError: also when ``quick`` is asked of a preset without a ``[quick]`` table.
    """
    label, data = load_preset(preset)
    quick_table = data.pop("quick", None)
    if quick:
        if not isinstance(quick_table, dict):
            raise ConfigError(f"preset {label!r} has no [quick] variant")
        data = _merge(data, quick_table)
        label = f"{label} (quick)"
    data = _merge(data, overrides or {})
    data.setdefault("preset", label)
    return config_from_dict(data)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain JSON-safe tables; ``config_from_dict(config_to_dict(c)) == c``."""
    return json.loads(json.dumps(to_toml_dict(cfg)))


def check_models(cfg: ExperimentConfig, cache_dir: Path) -> None:
    """Resolve every model name without loading anything (milliseconds; never downloads).

    Raises:
        ConfigError: one line per unusable model.
    """
    from knexa_node.models import ModelLoadError, resolve_model

    failed: list[tuple[str, str]] = []
    if cfg.experiment.problems == "skills":
        from knexa_lab.skills.models import skills_family

        for name in cfg.experiment.models:
            try:
                skills_family(name)
            except ValueError as exc:
                failed.append((name, str(exc)))
    for name in dict.fromkeys(() if cfg.experiment.problems == "skills" else cfg.experiment.models):
        try:
            resolve_model(name, cache_dir=cache_dir)
        except ModelLoadError as exc:
            failed.append((name, str(exc)))
    if failed:  # the first reason in full (it says what works offline), then the other names
        more = f" (also unusable: {', '.join(n for n, _ in failed[1:])})" if len(failed) > 1 else ""
        raise ConfigError(failed[0][1] + more)

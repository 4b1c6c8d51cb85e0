"""`knexa-lab`: run a local federation (`run`), compare FL methods (`experiment`), rebuild
tables and plots from saved results (`report`), or join an experiment run in parts (`merge`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knexa-lab", description="KNEXA-FL experiments on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a small federation on loopback and print per-round results",
        description="Start one knexa-cpm and N knexa-node processes on 127.0.0.1, run R rounds of "
        "KNEXA-FL, print who taught whom with rewards, validation loss and Pass@1, and write "
        "results.json / rounds.csv into the results directory. Ctrl-C stops every daemon.",
    )
    run.add_argument("--preset", default="embedded", help="tiny | embedded | path to a preset .toml (default: embedded)")
    run.add_argument("--nodes", type=int, help="number of nodes (default: from the preset)")
    run.add_argument("--rounds", type=int, help="number of rounds (default: from the preset)")
    run.add_argument("--model", help="use this model for every node instead of the preset's mix")
    run.add_argument("--out", type=Path, help="results directory (default: results/run-<timestamp>)")
    run.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_experiment(sub)
    report = sub.add_parser(
        "report", help="rebuild the tables (and an experiment's plots) from a results directory",
        description="Without re-running anything: for an experiment directory (metrics.jsonl) write "
        "the Table-4-shaped markdown, per-client tables and PNG plots and print Table 4; for a "
        "`knexa-lab run` directory (results.json) print the per-round table and summary again.")
    report.add_argument("results_dir", type=Path)
    merge = sub.add_parser(
        "merge", help="join results directories that ran one experiment in parts (e.g. seeds on two machines)",
        description=_MERGE_HELP,
        epilog="example:\n  knexa-lab experiment --preset skills --seeds 1,2 --out a   # machine 1\n"
        "  knexa-lab experiment --preset skills --seeds 3,4,5 --out b # machine 2\n"
        "  knexa-lab merge skills-all a b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("out", type=Path, help="new results directory")
    merge.add_argument("parts", type=Path, nargs="+", metavar="PART", help="results directories to join")
    merge.add_argument("--mixed-versions", action="store_true", help="merge parts whose recorded package "
                       "versions differ (noted; refused by default: versions can change results)")
    unfinished = merge.add_mutually_exclusive_group()
    unfinished.add_argument("--partial", action="store_true", help="also take unfinished runs, as they are "
                            "(noted in run-info.json)")
    unfinished.add_argument("--finished-only", action="store_true", help="leave unfinished runs out (noted); "
                            "with one PART: the finished runs of an experiment still in progress")
    return parser


_EXPERIMENT_HELP = """\
Run every method of a preset on the same split, seeds and budget: per seed one Dirichlet split of
HumanEval, then for each method fresh clients (same models, shards and per-client seeds), R rounds
of local epoch -> collaboration step -> evaluation. Writes into the results directory:
metrics.jsonl/.csv (one row per method, seed, round and client), config.json, run-info.json (git
commit, package versions), per-round checkpoints, and the report (Table 4 with 95% CIs over
seeds, per-client tables, plots).

Presets: tiny (random tiny models, seconds; the CI test), embedded (4 x SmolLM2-135M on CPU; the
preset states its measured time), paper (6 clients on the paper's ~0.5B backbones, 20 rounds;
needs a GPU), skills (the generated benchmark whose ground truth is known: 8 small clients of 3
families, 12 categories, Oracle-P2P as the upper bound; --quick for its CI-sized variant),
skills-smollm2 (the same benchmark with 4 SmolLM2-135M clients: real models, fewer problems and
rounds), or a path to your own .toml.

Methods: {methods}.

Interrupting (Ctrl-C, kill) loses at most the running round: continue with --resume DIR (or run
the same command with the same --out). --mode daemons runs the P2P methods through real
knexa-cpm/knexa-node processes on loopback instead of in-process.

examples:
  knexa-lab experiment --preset tiny
  knexa-lab experiment --preset skills --quick
  knexa-lab experiment --preset embedded --methods local-only,random-p2p,knexa-fl --seeds 1,2
  knexa-lab experiment --preset tiny --set learning.lr=1e-4 --set methods.knexa-fl.beta0=0.5
  knexa-lab experiment --resume results/experiment-embedded-20250101-120000
"""


_MERGE_HELP = """\
Write OUT as one experiment holding every (method, seed) run of the PARTs, then its report. Each
run is independent, so a long preset can run its seeds or methods on several machines or sessions
(same preset and --set, different --seeds/--methods/--out) and be reported together.

Refused, with the reason: configurations that differ beyond methods, seeds and jobs; package
versions that differ (unless --mixed-versions: another tokenizers can change numbers); an unfinished
run (finish it with --resume, pass --partial to keep it as it is, or --finished-only to leave it
out); a run present in two parts with different rows (wall time and model cache paths aside).
run-info.json keeps each part's command and commits. With one PART and --finished-only, OUT holds
the finished runs of an experiment still in progress.
"""


def _add_experiment(sub: Any) -> None:
    from .experiment.methods import method_names

    exp = sub.add_parser(
        "experiment", help="compare FL methods (Table 4): same split, seeds and budget, with CIs",
        description=_EXPERIMENT_HELP.format(methods=", ".join(method_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("--preset", help="tiny | embedded | paper | skills | skills-smollm2 | path to a .toml preset")
    exp.add_argument("--quick", action="store_true", help="the preset's CI-sized variant (its [quick] table; "
                     "skills has one)")
    exp.add_argument("--methods", help="comma-separated method names (default: the preset's)")
    exp.add_argument("--seeds", help="comma-separated integer seeds (default: the preset's)")
    exp.add_argument("--rounds", type=int, help="rounds per run (default: the preset's)")
    exp.add_argument("--mode", choices=("sim", "daemons"), default="sim",
                     help="sim: in-process, every method (default); daemons: the P2P methods as real "
                     "knexa-cpm + knexa-node processes")
    exp.add_argument("--out", type=Path, help="results directory (default: results/experiment-<preset>-<time>); "
                     "an existing one with the same configuration is continued")
    exp.add_argument("--resume", type=Path, metavar="DIR", help="continue the experiment saved in DIR as configured there")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a preset value, e.g. --set learning.lr=1e-4 --set experiment.train_cap=8 "
                     "--set methods.knexa-fl.gamma=2 (values are read as TOML)")
    exp.add_argument("--jobs", type=int, help="(method, seed) runs at once in separate processes, sim mode "
                     "(default: the preset's experiment.jobs); results do not depend on it")
    exp.add_argument("--cache-dir", type=Path, help="where tiny/embedded models are built (default: $KNEXA_CACHE "
                     "or ~/.cache/knexa)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp.add_argument("--verbose", action="store_true", help="also show the learning stack's log on the console")


def _fail(msg: str, code: int = 2) -> int:
    print(f"knexa-lab: {msg}", file=sys.stderr)
    return code


def _experiment_config(args: argparse.Namespace) -> tuple[Any, Path, str]:
    """(config, results dir, mode) from the flags; raises ConfigError for user mistakes."""
    from .experiment.config import ConfigError, config_from_dict, parse_overrides, resolve_config
    from .experiment.methods import P2P_METHODS

    if args.resume:
        given = [f for f in ("preset", "methods", "seeds", "rounds", "out", "set", "quick") if getattr(args, f)]
        if given:
            raise ConfigError(f"--resume continues the experiment as saved; drop --{', --'.join(given)}")
        path = args.resume / "config.json"
        if not path.is_file():
            raise ConfigError(f"no experiment in {args.resume} (config.json missing)")
        info_path = args.resume / "run-info.json"
        try:
            mode = json.loads(info_path.read_text()).get("mode", "sim") if info_path.is_file() else "sim"
            return config_from_dict(json.loads(path.read_text())), args.resume, mode
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args.resume}: unreadable config.json or run-info.json ({exc})") from exc
    if not args.preset:
        raise ConfigError("choose --preset tiny|embedded|paper|skills|skills-smollm2|FILE.toml, or --resume DIR")
    overrides = parse_overrides(args.set)
    exp = overrides.setdefault("experiment", {})
    if args.methods:
        exp["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds:
        try:
            exp["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError as exc:
            raise ConfigError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from exc
    if args.rounds is not None:
        exp["rounds"] = args.rounds
    cfg = resolve_config(args.preset, overrides, quick=args.quick)
    if args.mode == "daemons" and not args.methods:  # the preset lists every method; daemons run the P2P ones
        exp["methods"] = [m for m in cfg.experiment.methods if m in P2P_METHODS]
        cfg = resolve_config(args.preset, overrides, quick=args.quick)
    stem = Path(args.preset).stem if str(args.preset).endswith(".toml") else args.preset
    stem += "-quick" if args.quick else ""
    out = args.out or Path("results") / time.strftime(f"experiment-{stem}-%Y%m%d-%H%M%S")
    return cfg, out, args.mode


_CONSOLE_LOGGERS = ("knexa_lab.experiment.engine", "knexa_lab.experiment.daemons")


class _TqdmHandler(logging.Handler):
    """Console log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _setup_experiment_logging(out: Path, verbose: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    file = logging.FileHandler(out / "experiment.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("[knexa-lab] %(message)s"))
    # the console gets the engine's round lines and the lab's warnings; everything is in the file
    console.addFilter(lambda r: verbose or r.levelno >= logging.ERROR or r.name in _CONSOLE_LOGGERS or (
        r.name.startswith("knexa_lab") and r.levelno >= logging.WARNING))
    root.addHandler(file)
    root.addHandler(console)
    logging.captureWarnings(True)  # library FutureWarnings go to the log file, not the console
    for name in ("libp2p", "multiaddr", "async_service", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _experiment(args: argparse.Namespace) -> int:
    import os

    from .experiment.config import ConfigError, check_models
    from .experiment.engine import ExperimentError, run_experiment

    try:
        cfg, out, mode = _experiment_config(args)
        env_cache = os.environ.get("KNEXA_CACHE")
        cache = args.cache_dir or (Path(env_cache).expanduser() if env_cache else Path.home() / ".cache" / "knexa")
        check_models(cfg, cache)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.jobs is not None and args.jobs < 1:
        return _fail("--jobs must be >= 1")
    out = out.resolve()
    _setup_experiment_logging(out, args.verbose)
    try:
        failed = run_experiment(cfg, out, mode=mode, cache_dir=cache, progress=not args.no_progress,
                                argv=["knexa-lab", *sys.argv[1:]], jobs=args.jobs)
    except ExperimentError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail(f"interrupted; every finished round is saved. Continue with: knexa-lab experiment "
                     f"--resume {out}", 130)
    code = _experiment_report(out, missing_ok=True)
    if failed:
        return _fail(f"runs failed: {', '.join(failed)} (tracebacks in {out}/experiment.log); retry them with "
                     f"knexa-lab experiment --resume {out}", 1)
    return code


def _experiment_report(out: Path, *, missing_ok: bool = False) -> int:
    """Write the report files and print Table 4 (``missing_ok``: after an experiment, whose
    metrics are safe without a report module, so that is a warning, not a failure)."""
    try:
        from .experiment.report import format_table4, write_report
    except ImportError as exc:
        msg = f"report module unavailable ({exc}); the metrics are in {out / 'metrics.jsonl'}"
        return _fail(msg, 0 if missing_ok else 1)
    try:
        paths = write_report(out)
        table = format_table4(out)
    except Exception as exc:
        logging.getLogger(__name__).exception("report failed")
        return _fail(f"report failed: {type(exc).__name__}: {exc} (metrics are in {out / 'metrics.jsonl'})", 1)
    print(table)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .experiment.merge import MergeError, merge_results

    try:
        unfinished = "keep" if args.partial else "drop" if args.finished_only else "refuse"
        flags = {"keep": ["--partial"], "drop": ["--finished-only"], "refuse": []}[unfinished]
        flags += ["--mixed-versions"] if args.mixed_versions else []
        info = merge_results(args.parts, args.out, unfinished=unfinished, mixed_versions=args.mixed_versions,
                             argv=["knexa-lab", "merge", *flags, *map(str, [args.out, *args.parts])])
    except MergeError as exc:
        return _fail(str(exc))
    for note in info["notes"]:
        print(f"[knexa-lab] {note}")
    return _experiment_report(args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "report":
        from .results import format_round_table, format_summary

        if (args.results_dir / "metrics.jsonl").exists():
            return _experiment_report(args.results_dir)
        path = args.results_dir / "results.json"
        if not path.exists():
            print(f"knexa-lab: no metrics.jsonl (experiment) or results.json (run) in {args.results_dir}",
                  file=sys.stderr)
            return 2
        data = json.loads(path.read_text())
        print(format_round_table(data["rounds"]))
        print()
        print(format_summary(data["rounds"], data["final"]))
        return 0
    from .launcher import LaunchError, RunOptions, run

    try:
        return run(RunOptions(preset=args.preset, nodes=args.nodes, rounds=args.rounds, model=args.model,
                              out=args.out, timeout_s=args.timeout, progress=not args.no_progress))
    except LaunchError as exc:
        print(f"knexa-lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`knexa-lab`: run a local federation (`run`) or rebuild tables from saved results (`report`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    report = sub.add_parser("report", help="print the tables of a finished run again",
                            description="Regenerate the per-round table and summary from a results directory.")
    report.add_argument("results_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from .results import format_round_table, format_summary

        path = args.results_dir / "results.json"
        if not path.exists():
            print(f"knexa-lab: no results.json in {args.results_dir}", file=sys.stderr)
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

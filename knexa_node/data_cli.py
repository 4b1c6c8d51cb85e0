"""`knexa-node data ...`: the data commands, kept out of cli.py so the daemon's CLI stays thin."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import ExitCode

__all__ = ["configure_parser", "configure_public_set_parser", "run", "run_public_set"]


def configure_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    data = sub.add_parser("data", help="prepare this organization's own problems as a node's private data",
                          description="Data commands. See docs/data.md for formats and checks.")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare", help="check, dedupe, validate and split problem files into a --data folder",
        description="Read HumanEval-style or MBPP-style jsonl, local Hugging Face datasets folders or "
        "files (json, jsonl, parquet) and CSV with named columns; keep each problem whose reference "
        "solution passes its own tests in the sandbox and that is neither a duplicate nor part of the "
        "federation's public sets; split train/val with --seed; write train.jsonl, val.jsonl, "
        "manifest.json (with the category histogram) and rejected.jsonl (file, line, reason of every "
        "row not kept) into --out, the folder `knexa-node start --data` reads.")
    prep.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="file or folder (repeatable)")
    prep.add_argument("--out", type=Path, required=True, metavar="DIR", help="the node's private data folder")
    prep.add_argument("--public", type=Path, metavar="DIR",
                      help="the federation's public set (test.jsonl, transfer.jsonl), e.g. the folder "
                      "`knexa-node public-set fetch` printed; rows overlapping it are rejected")
    prep.add_argument("--no-public-check", action="store_true",
                      help="prepare without --public (overlap with the public sets is then NOT checked)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    prep.add_argument("--val-fraction", type=float, default=0.15, help="share held out for validation")
    prep.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                      help="read FIELD (prompt, canonical_solution, test, entry_point, task_id, text, code, "
                      "test_list) from COLUMN (repeatable)")
    prep.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per reference solution")
    prep.add_argument("--workers", type=int, default=2, help="sandboxes run in parallel")
    prep.add_argument("--force", action="store_true", help="replace train/val/manifest/rejected files in --out")


def configure_public_set_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ps = sub.add_parser("public-set", help="fetch the federation's public sets (transfer X_u + test) from the CPM",
                        description="Public-set commands. The daemon fetches and verifies the public set by itself; "
                        "this lets an organization get it before its first start, e.g. for `data prepare --public`.")
    pss = ps.add_subparsers(dest="public_set_command", required=True)
    fetch = pss.add_parser("fetch", help="fetch and verify the CPM's current public set; print its folder",
                           description="Connect to the CPM with this node's identity (it must be on the roster), "
                           "fetch the announced public set if this node has none, verify its digest, and print "
                           "the folder holding test.jsonl and transfer.jsonl.")
    fetch.add_argument("--config", type=Path, required=True, help="the node's config file (from `knexa-node init`)")


def run_public_set(args: argparse.Namespace) -> int:
    import trio

    from knexa_p2p.host import DialError
    from knexa_runtime.config import ConfigError, load_config
    from knexa_runtime.exceptions import leaf_of
    from protocol import RemoteProtocolError

    from .config import NodeConfig
    from .public_set import fetch_for_config, label

    try:
        cfg = load_config(NodeConfig, args.config).node
        if not cfg.cpm:
            raise ConfigError(f"{args.config}: no `cpm` address set")
        ann, folder = trio.run(fetch_for_config, cfg)
    except BaseException as exc:  # trio wraps failures in exception groups: report the leaf
        leaf = leaf_of(exc, (ConfigError, DialError, RemoteProtocolError, OSError))
        if leaf is None:
            raise
        if isinstance(leaf, ConfigError):
            print(f"knexa-node: {leaf}", file=sys.stderr)
            return ExitCode.CONFIG
        print(f"knexa-node: cannot get the public set from the CPM: {leaf}", file=sys.stderr)
        return ExitCode.NETWORK
    if ann is None:
        print("the CPM publishes no public set (its operator runs `knexa-cpm public-set add`)")
        return ExitCode.OK
    print(f"public set {label(ann)} in {folder}\n"
          f"remove your rows that overlap it with: knexa-node data prepare FILES --out DIR --public {folder}")
    return ExitCode.OK


def run(args: argparse.Namespace) -> int:
    from .data_prepare import PrepareError, format_summary, prepare

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    mapping: dict[str, str] = {}
    for item in args.map:
        target, sep, column = item.partition("=")
        if not sep or not target.strip() or not column.strip():
            print(f"knexa-node: --map {item!r}: expected FIELD=COLUMN", file=sys.stderr)
            return ExitCode.USAGE
        mapping[target.strip()] = column.strip()
    if args.public is None and not args.no_public_check:
        print("knexa-node: pass --public DIR (the federation's public set, from `knexa-node public-set fetch`) "
              "so rows that overlap it are removed, or --no-public-check to skip that check", file=sys.stderr)
        return ExitCode.USAGE
    try:
        result = prepare(args.sources, args.out, public_dir=args.public, seed=args.seed,
                         val_fraction=args.val_fraction, mapping=mapping, force=args.force,
                         timeout_s=args.timeout, workers=args.workers)
    except PrepareError as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(format_summary(result))
    return ExitCode.OK


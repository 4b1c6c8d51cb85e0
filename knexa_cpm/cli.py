"""`knexa-cpm`: run the matchmaker daemon, or the synthetic matchmaker study."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from knexa_runtime.config import ConfigError, dump_config, load_config, parse_overrides
from knexa_runtime.logs import setup_logging

from .config import CpmConfig
from .errors import ExitCode, StateError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knexa-cpm",
        description="KNEXA-FL Central Profiler/Matchmaker. It receives only sanitized profiles and "
        "scalar rewards, learns pairings with a LinUCB contextual bandit and publishes signed "
        "match directives over libp2p pubsub. It never sees models, data or knowledge packages.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the matchmaker daemon",
                           description="Run the CPM daemon until SIGTERM/SIGINT. Prints its multiaddr "
                           "(with /p2p/<peer-id>) once listening; state persists in --state-dir.")
    serve.add_argument("--config", type=Path, help="TOML config file ([cpm] table)")
    serve.add_argument("--listen", action="append", metavar="MULTIADDR",
                       help="listen address, e.g. /ip4/127.0.0.1/tcp/4001 (repeatable)")
    serve.add_argument("--state-dir", type=Path, help="where identity key and state live")
    serve.add_argument("--federation", help="federation id (topic and AAD namespace)")
    serve.add_argument("--roster", action="append", metavar="PEER_ID", help="allowed node peer id (repeatable)")
    serve.add_argument("--expected-nodes", type=int, help="federation size when no roster is given")
    serve.add_argument("--policy", choices=["linucb", "hybrid", "random", "heuristic", "round_robin"])
    serve.add_argument("--round-timeout", type=float, dest="round_timeout_s", help="seconds before a round closes without quorum")
    serve.add_argument("--roster-file", type=Path, help="roster file ([[peer]] id/name/addr), re-read on SIGHUP")
    serve.add_argument("--metrics", dest="metrics_listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics here (e.g. 127.0.0.1:9101)")
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as key=value text or JSON")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set cpm.lam=0.1")
    serve.add_argument("--print-config", action="store_true", help="print the effective config (TOML) and exit")

    init = sub.add_parser("init", help="create the state directory, identity key and a commented config",
                          description="Create STATE_DIR (0700) with a new Ed25519 identity (0600) and write a "
                          "commented config file. Prints the CPM's peer id: nodes pin it in their `cpm` address.")
    init.add_argument("--state-dir", type=Path, required=True)
    init.add_argument("--config", type=Path, required=True, help="where to write the config file")
    init.add_argument("--federation", default="knexa")
    init.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001", metavar="MULTIADDR")
    init.add_argument("--roster-file", type=Path, help="roster file path to name in the config")
    init.add_argument("--metrics", default="", metavar="HOST:PORT", help="Prometheus endpoint to configure")
    init.add_argument("--force", action="store_true", help="overwrite an existing config file")

    status = sub.add_parser("status", help="ask the running CPM for its round, peers and last matches",
                            description="Query the running daemon through its control socket "
                            "(STATE_DIR/control.sock) and print its state.")
    status.add_argument("--state-dir", type=Path, help="the daemon's state directory")
    status.add_argument("--config", type=Path, help="or: its config file (state_dir is read from it)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    from . import public_sets, simulate

    public_sets.configure_parser(sub)
    sim = sub.add_parser("simulate", help="run the synthetic matchmaker study (paper Fig. 2)",
                         description="Synthetic federation study: LinUCB (both context builders) vs random, "
                         "heuristic and an oracle, with CSV, plots and a markdown table.")
    simulate.configure_parser(sim)
    from . import privacy_study

    priv = sub.add_parser("privacy-study", help="matching quality against the profile noise's epsilon",
                          description="Fraction of the oracle's gain that LinUCB keeps when profiles carry "
                          "Laplace noise of each epsilon (the synthetic federation of `simulate`).")
    privacy_study.configure_parser(priv)

    return parser


def _cpm_config(args: argparse.Namespace) -> CpmConfig:
    overrides = parse_overrides(args.set)
    section = overrides.setdefault("cpm", {})
    for key in ("listen", "state_dir", "federation", "roster", "expected_nodes", "policy", "round_timeout_s",
                "roster_file", "metrics_listen", "log_format"):
        value = getattr(args, key, None)
        if value is not None:
            section[key] = str(value) if isinstance(value, Path) else value
    return load_config(CpmConfig, args.config, overrides)


async def _run_serve(args: argparse.Namespace, cfg: CpmConfig) -> None:
    from functools import partial

    from knexa_runtime.daemon import supervise

    from .service import CpmService, serve

    svc = CpmService(cfg.cpm)

    def reload() -> None:
        svc.reload(_cpm_config(args).cpm)

    await supervise(partial(serve, cfg.cpm, service=svc), name="knexa-cpm", reload=reload,
                    logger=logging.getLogger("knexa_cpm"))


def _init(args: argparse.Namespace) -> int:
    from knexa_p2p.identity import load_or_create_identity
    from knexa_runtime.initdir import InitError, create_state_dir, render_template, write_config

    state = create_state_dir(args.state_dir.resolve())
    identity = load_or_create_identity(state / "identity.key")
    text = render_template(Path(__file__).parent / "templates" / "cpm.toml.in", {
        "federation": args.federation, "listen": args.listen, "state_dir": str(state),
        "roster_file": str(args.roster_file.resolve()) if args.roster_file else "",
        "metrics_listen": args.metrics,
    })
    try:
        write_config(args.config, text, force=args.force)
    except InitError as exc:
        print(f"knexa-cpm: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(f"state dir: {state}\nconfig:    {args.config}\npeer id:   {identity.peer_id}")
    print(f"nodes reach this CPM at {args.listen}/p2p/{identity.peer_id} (use the host's public address)")
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    from knexa_runtime.status import print_status

    return print_status(lambda: args.state_dir or load_config(CpmConfig, args.config).cpm.state_dir,
                        as_json=args.json, prog="knexa-cpm", error_code=ExitCode.NETWORK)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        from . import simulate

        return simulate.run(args)
    if args.command == "privacy-study":
        from . import privacy_study

        return privacy_study.run(args)
    if args.command == "init":
        return _init(args)
    if args.command == "public-set":
        from . import public_sets

        return public_sets.run(args)
    if args.command == "status":
        return _status(args)
    try:
        cfg = _cpm_config(args)
    except ConfigError as exc:
        print(f"knexa-cpm: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.print_config:
        print(dump_config(cfg), end="")
        return ExitCode.OK
    setup_logging(cfg.cpm.log_level, fmt=cfg.cpm.log_format)
    from knexa_p2p.host import DialError
    from knexa_p2p.identity import IdentityError
    from knexa_runtime.exceptions import run_mapped
    from knexa_runtime.roster import RosterError

    known: dict[type[BaseException], ExitCode] = {
        StateError: ExitCode.STATE, IdentityError: ExitCode.CONFIG, RosterError: ExitCode.CONFIG,
        DialError: ExitCode.NETWORK, OSError: ExitCode.NETWORK,
    }
    return run_mapped(lambda: trio.run(_run_serve, args, cfg), known, "knexa-cpm")


if __name__ == "__main__":
    sys.exit(main())

"""`knexa-cpm`: run the matchmaker daemon, or the synthetic matchmaker study."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from knexa_runtime.config import ConfigError, load_config, parse_overrides
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
    serve.add_argument("--policy", choices=["linucb", "random", "heuristic", "round_robin"])
    serve.add_argument("--round-timeout", type=float, dest="round_timeout_s", help="seconds before a round closes without quorum")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set cpm.lam=0.1")
    serve.add_argument("--print-config", action="store_true", help="print the effective config and exit")

    from . import simulate

    sim = sub.add_parser("simulate", help="run the synthetic matchmaker study (paper Fig. 2)",
                         description="Synthetic federation study: LinUCB (both context builders) vs random, "
                         "heuristic and an oracle, with CSV, plots and a markdown table.")
    simulate.configure_parser(sim)

    return parser


def _cpm_config(args: argparse.Namespace) -> CpmConfig:
    overrides = parse_overrides(args.set)
    section = overrides.setdefault("cpm", {})
    for key in ("listen", "state_dir", "federation", "roster", "expected_nodes", "policy", "round_timeout_s"):
        value = getattr(args, key, None)
        if value is not None:
            section[key] = str(value) if isinstance(value, Path) else value
    return load_config(CpmConfig, args.config, overrides)


async def _run_serve(cfg: CpmConfig) -> None:
    from .service import serve

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(serve, cfg.cpm)
            for a in addrs:
                print(f"knexa-cpm listening on {a}", flush=True)
            async for signum in signals:
                logging.getLogger("knexa_cpm").info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        from . import simulate

        return simulate.run(args)
    try:
        cfg = _cpm_config(args)
    except ConfigError as exc:
        print(f"knexa-cpm: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.print_config:
        import json

        from knexa_runtime.config import to_toml_dict

        print(json.dumps(to_toml_dict(cfg), indent=2))
        return ExitCode.OK
    setup_logging(cfg.cpm.log_level)
    from knexa_p2p.host import DialError
    from knexa_p2p.identity import IdentityError
    from knexa_runtime.exceptions import run_mapped

    known: dict[type[BaseException], ExitCode] = {
        StateError: ExitCode.STATE, IdentityError: ExitCode.CONFIG, DialError: ExitCode.NETWORK,
        OSError: ExitCode.NETWORK,
    }
    return run_mapped(lambda: trio.run(_run_serve, cfg), known, "knexa-cpm")


if __name__ == "__main__":
    sys.exit(main())

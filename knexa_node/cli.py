"""`knexa-node`: run an organization's KNEXA-FL agent."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import trio

from knexa_runtime.config import ConfigError, load_config, parse_overrides, to_toml_dict
from knexa_runtime.logs import setup_logging

from .config import NodeConfig
from .errors import ExitCode, UnreachableError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("knexa_node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knexa-node",
        description="KNEXA-FL node: holds a frozen base LLM plus a LoRA adapter, trains on private "
        "data, sends a sanitized profile to the matchmaker (CPM), and exchanges signed, end-to-end "
        "encrypted distillation texts directly with matched peers over libp2p.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser(
        "start", help="run the node daemon",
        description="Run the node until SIGTERM/SIGINT (or --rounds rounds). Prints its multiaddr "
        "(with /p2p/<peer-id>) once listening. Models: a local path, a Hugging Face hub id already "
        "in the local cache, or an alias: qwen-0.5b, cerebras-590m, bloom-560m, pythia-410m, "
        "smollm2-135m (embedded, works offline), tiny-llama, tiny-qwen2, tiny-gptneox, tiny-gpt2.",
    )
    start.add_argument("--model", help="model alias, local path or hub id (default from config)")
    start.add_argument("--config", type=Path, help="TOML config file ([node] and [learning] tables)")
    start.add_argument("--cpm", metavar="MULTIADDR", help="CPM address ending in /p2p/<peer-id>")
    start.add_argument("--data", type=Path, dest="data_dir", help="this node's private shard folder")
    start.add_argument("--public-data", type=Path, dest="public_dir", help="public test/transfer sets folder")
    start.add_argument("--state-dir", type=Path, help="identity key, checkpoints and round log")
    start.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address (repeatable)")
    start.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="peer to dial (repeatable)")
    start.add_argument("--roster", action="append", metavar="PEER_ID", help="allowed peer id (repeatable)")
    start.add_argument("--federation", help="federation id")
    start.add_argument("--rounds", type=int, help="exit after this many rounds (0 = run until stopped)")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set learning.lr=1e-4 --set node.reward_delta=0")
    start.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    return parser


def _node_config(args: argparse.Namespace) -> NodeConfig:
    overrides = parse_overrides(args.set)
    section = overrides.setdefault("node", {})
    for key in ("model", "cpm", "data_dir", "public_dir", "state_dir", "listen", "bootstrap", "roster",
                "federation", "rounds"):
        value = getattr(args, key, None)
        if value is not None:
            section[key] = str(value) if isinstance(value, Path) else value
    return load_config(NodeConfig, args.config, overrides)


def _validate(cfg: NodeConfig) -> None:
    from .service import parse_peer

    n = cfg.node
    if not n.cpm:
        raise ConfigError("no CPM address: pass --cpm /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    try:
        parse_peer(n.cpm)
        for b in n.bootstrap:
            parse_peer(b)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if n.data_dir is None:
        raise ConfigError("no data: pass --data DIR (a node shard written by `knexa-lab split`)")
    if not (n.data_dir / "train.jsonl").is_file():
        raise ConfigError(f"--data {n.data_dir}: no train.jsonl there")


async def _run(cfg: NodeConfig) -> None:
    from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key

    from .backend_factory import create_backend
    from .service import run_node

    n = cfg.node
    n.state_dir.mkdir(parents=True, exist_ok=True)
    identity = load_or_create_identity(n.state_dir / "identity.key")
    kem = load_or_create_kem_key(n.state_dir / "kem.key")
    logger.info("node peer=%s model=%s federation=%s", identity.peer_id, n.model, n.federation)
    backend = await trio.to_thread.run_sync(create_backend, cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def node_then_stop(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                await run_node(n, backend, identity, kem, task_status=task_status)
                nursery.cancel_scope.cancel()

            for addr in await nursery.start(node_then_stop):
                print(f"knexa-node listening on {addr}", flush=True)

            async def watch_signals() -> None:
                async for signum in signals:
                    logger.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch_signals)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _node_config(args)
        if args.print_config:
            print(json.dumps(to_toml_dict(cfg), indent=2))
            return ExitCode.OK
        _validate(cfg)
    except ConfigError as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    setup_logging(cfg.node.log_level)
    from knexa_p2p.identity import IdentityError
    from knexa_runtime.exceptions import run_mapped

    from .models import ModelLoadError

    known: dict[type[BaseException], ExitCode] = {
        ModelLoadError: ExitCode.MODEL, ConfigError: ExitCode.CONFIG, IdentityError: ExitCode.CONFIG,
        UnreachableError: ExitCode.NETWORK, OSError: ExitCode.NETWORK,
    }
    return run_mapped(lambda: trio.run(_run, cfg), known, "knexa-node")


if __name__ == "__main__":
    sys.exit(main())

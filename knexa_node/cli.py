"""`knexa-node`: run an organization's KNEXA-FL agent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from knexa_runtime.config import ConfigError, dump_config, load_config, parse_overrides
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
        "(with /p2p/<peer-id>) once listening. Models: a local path, a Hugging Face hub id "
        "(downloaded into the HF cache on first use unless --offline; pin with NAME@REVISION), or an alias: qwen-0.5b, cerebras-590m, bloom-560m, pythia-410m, "
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
    start.add_argument("--roster-file", type=Path, help="roster file ([[peer]] id/name/addr), re-read on SIGHUP")
    start.add_argument("--metrics", dest="metrics_listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics here (e.g. 127.0.0.1:9102)")
    start.add_argument("--log-format", choices=["text", "json"], help="log lines as key=value text or JSON")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set learning.lr=1e-4 --set node.reward_delta=0")
    start.add_argument("--print-config", action="store_true", help="print the effective config (TOML) and exit")
    start.add_argument("--offline", action="store_true",
                       help="never download models: use only the local Hugging Face cache (= HF_HUB_OFFLINE=1)")

    init = sub.add_parser("init", help="create the state directory, identity keys and a commented config",
                          description="Create STATE_DIR (0700) with a new Ed25519 identity and X25519 package "
                          "key (0600 each) and write a commented config. Prints the node's peer id: add it "
                          "to the federation's roster file.")
    init.add_argument("--state-dir", type=Path, required=True)
    init.add_argument("--config", type=Path, required=True, help="where to write the config file")
    init.add_argument("--federation", default="knexa")
    init.add_argument("--model", default="smollm2-135m")
    init.add_argument("--cpm", default="", metavar="MULTIADDR", help="the CPM's address with /p2p/<peer-id>")
    init.add_argument("--data", type=Path, help="this node's private shard folder")
    init.add_argument("--public-data", type=Path, help="public test/transfer sets folder")
    init.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4002", metavar="MULTIADDR")
    init.add_argument("--roster-file", type=Path, help="roster file path to name in the config")
    init.add_argument("--metrics", default="", metavar="HOST:PORT", help="Prometheus endpoint to configure")
    init.add_argument("--force", action="store_true", help="overwrite an existing config file")

    fetch = sub.add_parser(
        "fetch-model", help="download a hub model into a folder (to copy to an air-gapped site)",
        description="Download what a node needs of a Hugging Face hub model (configs, tokenizer, one set "
        "of weights) into DIR, with a progress bar; a dropped connection resumes where it stopped, and a "
        "second run skips the files already complete. "
        "Copy DIR to the offline site and start the node there with --model DIR. NAME is an alias "
        "(qwen-0.5b, cerebras-590m, bloom-560m, pythia-410m) or owner/name, optionally @REVISION "
        "(branch, tag or commit). HF_ENDPOINT and HF_TOKEN are honoured.")
    fetch.add_argument("name", metavar="NAME")
    fetch.add_argument("--to", type=Path, required=True, metavar="DIR", help="destination folder")

    from . import data_cli

    data_cli.configure_parser(sub)
    data_cli.configure_public_set_parser(sub)

    status = sub.add_parser("status", help="ask the running node for its round, phase, peers and last matches",
                            description="Query the running daemon through its control socket "
                            "(STATE_DIR/control.sock) and print its state.")
    status.add_argument("--state-dir", type=Path, help="the daemon's state directory")
    status.add_argument("--config", type=Path, help="or: its config file (state_dir is read from it)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def _node_config(args: argparse.Namespace) -> NodeConfig:
    overrides = parse_overrides(args.set)
    section = overrides.setdefault("node", {})
    for key in ("model", "cpm", "data_dir", "public_dir", "state_dir", "listen", "bootstrap", "roster",
                "federation", "rounds", "roster_file", "metrics_listen", "log_format"):
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
        raise ConfigError("no data: pass --data DIR (your problems prepared by `knexa-node data prepare "
                          "FILES --out DIR`, see docs/data.md)")
    if not (n.data_dir / "train.jsonl").is_file():
        raise ConfigError(f"--data {n.data_dir}: no train.jsonl there")
    if n.roster_file is not None:
        from knexa_runtime.roster import RosterError, load_roster

        try:
            load_roster(n.roster_file)
        except RosterError as exc:
            raise ConfigError(str(exc)) from exc


async def _run(args: argparse.Namespace, cfg: NodeConfig) -> None:
    from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
    from knexa_runtime.daemon import supervise

    from .backend_factory import create_backend
    from .service import NodeService

    n = cfg.node
    n.state_dir.mkdir(parents=True, exist_ok=True)
    identity = load_or_create_identity(n.state_dir / "identity.key")
    kem = load_or_create_kem_key(n.state_dir / "kem.key")
    logger.info("node peer=%s model=%s federation=%s", identity.peer_id, n.model, n.federation)
    local_public = n.public_dir or (n.data_dir.parent / "public" if n.data_dir else None)
    if local_public is not None and (local_public / "test.jsonl").is_file() and (local_public / "transfer.jsonl").is_file():
        backend = await trio.to_thread.run_sync(create_backend, cfg)  # checked against the CPM's public set later
        svc = NodeService(n, backend, identity, kem)
    else:  # no public set here yet: fetch it from the CPM first, then load the model on it
        svc = NodeService(n, None, identity, kem, make_backend=lambda public_dir: create_backend(cfg, public_dir))

    def reload() -> None:
        svc.reload(_node_config(args).node)

    await supervise(svc.run, name="knexa-node", reload=reload, logger=logger, notifier=svc.notifier)


def _init(args: argparse.Namespace) -> int:
    from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
    from knexa_runtime.initdir import InitError, create_state_dir, render_template, write_config

    state = create_state_dir(args.state_dir.resolve())
    identity = load_or_create_identity(state / "identity.key")
    load_or_create_kem_key(state / "kem.key")
    text = render_template(Path(__file__).parent / "templates" / "node.toml.in", {
        "federation": args.federation, "model": args.model, "listen": args.listen, "state_dir": str(state),
        "data_dir": str(args.data.resolve()) if args.data else "", "cpm": args.cpm,
        "public_dir": str(args.public_data.resolve()) if args.public_data else "",
        "roster_file": str(args.roster_file.resolve()) if args.roster_file else "",
        "metrics_listen": args.metrics,
    })
    try:
        write_config(args.config, text, force=args.force)
    except InitError as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(f"state dir: {state}\nconfig:    {args.config}\npeer id:   {identity.peer_id}")
    print("add to the federation's roster file:\n"
          f"  [[peer]]\n  id = \"{identity.peer_id}\"\n  addr = \"{args.listen}/p2p/{identity.peer_id}\"")
    if not args.cpm or not args.data:
        print("then set `cpm` and `data_dir` in the config before `knexa-node start`")
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    from knexa_runtime.status import print_status

    return print_status(lambda: args.state_dir or load_config(NodeConfig, args.config).node.state_dir,
                        as_json=args.json, prog="knexa-node", error_code=ExitCode.NETWORK)


def _fetch_model(args: argparse.Namespace) -> int:
    from .models import ModelLoadError, fetch_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = fetch_model(args.name, args.to)
    except ModelLoadError as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.MODEL
    print(f"{args.name} -> {path}\nuse it offline with: knexa-node start --model {path} ...")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return _init(args)
    if args.command == "fetch-model":
        return _fetch_model(args)
    if args.command == "data":
        from . import data_cli

        return data_cli.run(args)
    if args.command == "public-set":
        from . import data_cli

        return data_cli.run_public_set(args)
    if getattr(args, "offline", False):
        import os

        os.environ["HF_HUB_OFFLINE"] = "1"  # read by models.hub_offline and by transformers
    if args.command == "status":
        return _status(args)
    try:
        cfg = _node_config(args)
        if args.print_config:
            print(dump_config(cfg), end="")
            return ExitCode.OK
        _validate(cfg)
    except ConfigError as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    setup_logging(cfg.node.log_level, fmt=cfg.node.log_format)
    from .sandbox import SandboxUnavailable, sandbox_backend

    try:  # Pass@k runs model-written code: refuse to start without a least-privilege sandbox
        sandbox_backend()
    except SandboxUnavailable as exc:
        print(f"knexa-node: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    from knexa_p2p.identity import IdentityError
    from knexa_runtime.exceptions import run_mapped
    from knexa_runtime.roster import RosterError
    from protocol import RemoteProtocolError

    from .models import ModelLoadError

    known: dict[type[BaseException], ExitCode] = {
        ModelLoadError: ExitCode.MODEL, ConfigError: ExitCode.CONFIG, IdentityError: ExitCode.CONFIG,
        RosterError: ExitCode.CONFIG, UnreachableError: ExitCode.NETWORK, OSError: ExitCode.NETWORK,
        RemoteProtocolError: ExitCode.NETWORK,  # e.g. a public set that fails its digest, or refused
    }
    return run_mapped(lambda: trio.run(_run, args, cfg), known, "knexa-node")


if __name__ == "__main__":
    sys.exit(main())

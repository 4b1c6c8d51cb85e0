"""deploy/: example configs are exactly what `init` writes, and the systemd units are valid."""

import shutil
import subprocess
from pathlib import Path

import pytest

from knexa_cpm.config import CpmConfig
from knexa_node.config import NodeConfig
from knexa_runtime.config import load_config
from knexa_runtime.initdir import render_template

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: the values the shipped examples were rendered with (regenerate them with these if a template changes)
CPM_EXAMPLE = {"federation": "knexa", "listen": "/ip4/0.0.0.0/tcp/4001", "state_dir": "/var/lib/knexa-cpm",
               "roster_file": "/etc/knexa/roster.toml", "metrics_listen": "127.0.0.1:9101"}
NODE_EXAMPLE = {"federation": "knexa", "model": "qwen-0.5b", "listen": "/ip4/0.0.0.0/tcp/4002",
                "state_dir": "/var/lib/knexa-node/acme", "data_dir": "/srv/acme/knexa-data/private",
                "public_dir": "/srv/acme/knexa-data/public",
                "cpm": "/dns4/cpm.example.org/tcp/4001/p2p/12D3KooWExampleCpmPeerIdReplaceMe",
                "roster_file": "/etc/knexa/roster.toml", "metrics_listen": "127.0.0.1:9102"}


def test_examples_are_the_rendered_templates():
    assert (DEPLOY / "config" / "cpm.example.toml").read_text() == render_template(
        ROOT / "knexa_cpm" / "templates" / "cpm.toml.in", CPM_EXAMPLE)
    assert (DEPLOY / "config" / "node.example.toml").read_text() == render_template(
        ROOT / "knexa_node" / "templates" / "node.toml.in", NODE_EXAMPLE)
    roster = (DEPLOY / "config" / "roster.example.toml").read_text()
    assert "[[peer]]" in roster


def test_init_writes_a_loadable_config_and_private_keys(tmp_path):
    from knexa_cpm.cli import main as cpm_main
    from knexa_node.cli import main as node_main

    assert cpm_main(["init", "--state-dir", str(tmp_path / "cpm"), "--config", str(tmp_path / "cpm.toml")]) == 0
    cfg = load_config(CpmConfig, tmp_path / "cpm.toml")
    assert cfg.cpm.state_dir == tmp_path / "cpm" and cfg.cpm.roster_file is None
    assert (tmp_path / "cpm").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "cpm" / "identity.key").stat().st_mode & 0o777 == 0o600
    # refusing to clobber an operator's edited config
    assert cpm_main(["init", "--state-dir", str(tmp_path / "cpm"), "--config", str(tmp_path / "cpm.toml")]) != 0
    assert node_main(["init", "--state-dir", str(tmp_path / "n"), "--config", str(tmp_path / "n.toml"),
                      "--model", "tiny-gpt2"]) == 0
    node = load_config(NodeConfig, tmp_path / "n.toml")
    assert node.node.model == "tiny-gpt2" and node.node.data_dir is None
    assert (tmp_path / "n" / "kem.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("unit", ["knexa-cpm.service", "knexa-node@.service"])
def test_units_are_hardened_notify_services(unit):
    text = (DEPLOY / "systemd" / unit).read_text()
    for line in ("Type=notify", "Restart=on-failure", "StateDirectory=", "ConfigurationDirectory=",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "ExecReload=/bin/kill -HUP $MAINPID",
                 "WatchdogSec="):
        assert line in text, f"{unit} lacks {line}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    venv_bin = Path(shutil.which("knexa-cpm") or ROOT / ".venv" / "bin" / "knexa-cpm").parent
    for unit in ("knexa-cpm.service", "knexa-node@.service"):
        text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/knexa/.venv/bin", str(venv_bin))
        (tmp_path / unit.replace("@.", "@acme.")).write_text(text)
    units = [str(tmp_path / "knexa-cpm.service"), str(tmp_path / "knexa-node@acme.service")]
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if str(tmp_path) in line]
    assert proc.returncode == 0 and not ours, "\n".join(ours) or proc.stderr


def test_node_start_refuses_a_broken_roster_file_before_loading_anything(tmp_path, capsys):
    from knexa_node.cli import main as node_main
    from knexa_node.errors import ExitCode
    from knexa_p2p.identity import Identity

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    (tmp_path / "roster.toml").write_text('[[peer]]\nid = "not-a-peer"\n')
    cpm = f"/ip4/127.0.0.1/tcp/4001/p2p/{Identity.from_seed(b'c' * 32).peer_id}"
    code = node_main(["start", "--cpm", cpm, "--data", str(tmp_path / "data"), "--state-dir", str(tmp_path / "s"),
                      "--roster-file", str(tmp_path / "roster.toml")])
    assert code == ExitCode.CONFIG
    assert "not an Ed25519 peer id" in capsys.readouterr().err
    assert not (tmp_path / "s").exists(), "nothing is created for a config that cannot run"

"""Shipped example configs load against the dataclasses; bad configs fail with every problem listed."""

from pathlib import Path

import pytest

from knexa_cpm.config import CpmConfig
from knexa_node.config import NodeConfig
from knexa_runtime.config import ConfigError, load_config, parse_overrides

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "config"


def test_examples_load():
    cpm = load_config(CpmConfig, DEPLOY / "cpm.example.toml")
    assert cpm.cpm.policy == "linucb"
    node = load_config(NodeConfig, DEPLOY / "node.example.toml")
    assert node.node.model == "qwen-0.5b" and node.node.roster_file is not None


def test_overrides_are_typed_and_take_precedence():
    cfg = load_config(CpmConfig, DEPLOY / "cpm.example.toml", parse_overrides(["cpm.lam=0.5", "cpm.policy=random"]))
    assert cfg.cpm.lam == 0.5 and cfg.cpm.policy == "random"


def test_all_errors_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[cpm]\nquorm = 1\nlam = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(CpmConfig, bad)
    assert "quorm: unknown setting" in str(info.value) and "lam: expected float" in str(info.value)
    with pytest.raises(ConfigError, match="quorum must be"):
        load_config(CpmConfig, None, {"cpm": {"quorum": 2.0}})
    bad.write_text("[cpm\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(CpmConfig, bad)


def test_operations_settings_are_validated():
    with pytest.raises(ConfigError) as info:
        load_config(NodeConfig, None, {"node": {"log_format": "xml", "metrics_listen": "9102",
                                                "log_level": "LOUD"}})
    text = str(info.value)
    assert "log_format must be text or json" in text and "metrics_listen: expected HOST:PORT" in text
    assert "log_level must be one of" in text
    with pytest.raises(ConfigError, match="metrics_listen"):
        load_config(CpmConfig, None, {"cpm": {"metrics_listen": "localhost:99999"}})
    cfg = load_config(CpmConfig, None, {"cpm": {"metrics_listen": "127.0.0.1:0", "log_format": "json"}})
    assert cfg.cpm.metrics_listen == "127.0.0.1:0"


def test_relay_limits_come_from_the_cpm_config():
    from knexa_cpm.service import relay_policy

    cfg = load_config(CpmConfig, DEPLOY / "cpm.example.toml",
                      {"cpm": {"relay_max_circuits_per_peer": 3, "relay_circuit_bytes": 1 << 20}})
    policy = relay_policy(cfg.cpm)
    assert policy is not None
    assert (policy.max_circuits_per_peer, policy.circuit_bytes) == (3, 1 << 20)
    assert policy.limits().max_circuit_conns == 3  # what py-libp2p's relay enforces
    assert relay_policy(load_config(CpmConfig, None, {"cpm": {"relay": False}}).cpm) is None
    with pytest.raises(ConfigError, match="relay limits must be > 0"):
        load_config(CpmConfig, None, {"cpm": {"relay_max_circuits_per_peer": 0}})

import json
import logging
import urllib.request

from knexa_runtime.logs import JsonFormatter
from knexa_runtime.metrics import DaemonMetrics


def test_metrics_endpoint_serves_this_daemons_registry():
    a, b = DaemonMetrics("node"), DaemonMetrics("cpm")
    a.rejected.labels("package", "bad_signature").inc(2)
    a.bytes_sent.inc(1234)
    a.rewards.observe(0.25)
    port = a.serve("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        a.close()
    assert 'knexa_rejected_messages_total{kind="package",reason="bad_signature"} 2.0' in text
    assert "knexa_bytes_sent_total 1234.0" in text
    assert "knexa_reward_count 1.0" in text
    assert 'knexa_up{daemon="node"} 1.0' in text
    assert "_created" not in text
    # registries are per daemon: the CPM's counters are untouched
    assert b.registry.get_sample_value("knexa_bytes_sent_total") == 0.0


def test_json_log_lines_carry_structured_fields():
    record = logging.LogRecord("knexa_node", logging.INFO, __file__, 1, "round=%d closed", (3,), None)
    record.round = 3
    record.peer = "abcd1234"
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["msg"] == "round=3 closed" and data["round"] == 3 and data["peer"] == "abcd1234"
    assert data["level"] == "info" and data["ts"].endswith("Z") and "\n" not in line


def test_key_value_pairs_in_messages_become_json_fields():
    record = logging.LogRecord("knexa_cpm", logging.INFO, __file__, 1,
                               "reward peer=%s round=%d teacher=%s reward=%.4f ok=%s", ("abc", 4, "def", -0.25, True), None)
    data = json.loads(JsonFormatter().format(record))
    assert (data["peer"], data["round"], data["teacher"], data["reward"], data["ok"]) == ("abc", 4, "def", -0.25, True)

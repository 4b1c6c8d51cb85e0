"""FedID-CentralKD: code normalisation, the confidence-weighted vote, and one real round."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from knexa_lab.experiment.methods.fedid import FedIDCentralKD
from knexa_lab.experiment.methods.logit_kd import normalize_code, weighted_vote
from tests.knexa_lab.central_fixtures import make_clients, round_context

BODY = "    result = a + b\n    return result\n"


@pytest.mark.parametrize("variant", [
    "    result = a + b   # add them\n\n    return result\n",
    "  result=a+b\n  return (result)\n",
    "    \"\"\"Sum.\"\"\"\n    result = a + b\n    return result\n",
    "\tresult = a + b\n\treturn result\n\n\n",
])
def test_formatting_only_variants_normalise_equal(variant: str) -> None:
    assert normalize_code(variant) == normalize_code(BODY)


def test_different_code_normalises_differently() -> None:
    assert normalize_code("    return a - b\n") != normalize_code("    return a + b\n")
    assert normalize_code("    s = '# not a comment'\n") != normalize_code("    s = ''\n")


def test_full_functions_lose_docstrings_and_comments() -> None:
    a = 'def f(x):\n    """Double x."""\n    # twice\n    return 2 * x\n'
    b = "def f(x):\n    return 2*x"
    assert normalize_code(a) == normalize_code(b)


def test_unparsable_answers_fall_back_to_whitespace_normalisation() -> None:
    cut = "    for x in xs:\n        if x >  0:\n"  # truncated mid-block: not valid Python
    assert normalize_code(cut) == normalize_code("    for x in xs:\n\n        if   x > 0:   \n")
    assert normalize_code(cut) != normalize_code("    for x in xs:\n        if x < 0:\n")
    assert normalize_code("  if x:\n  # note\n") == normalize_code("  if x:\n")


def test_vote_sums_confidence_over_normalised_classes() -> None:
    ballots = [("    return a+b\n", 0.3), ("    return a + b  # sum\n", 0.35), ("    return a - b\n", 0.6)]
    text, weight = weighted_vote(ballots)
    assert normalize_code(text) == normalize_code("return a + b") and weight == pytest.approx(0.65)
    assert text == "    return a + b  # sum\n"  # the class's most confident original text


def test_one_confident_voter_beats_two_unsure_ones() -> None:
    text, weight = weighted_vote([("return 1", 0.1), ("return  1", 0.15), ("return 2", 0.9)])
    assert text == "return 2" and weight == pytest.approx(0.9)


def test_vote_ties_go_to_more_voters_then_first_seen() -> None:
    assert weighted_vote([("return 1", 0.5), ("return 2", 0.25), ("return (2)", 0.25)])[0] == "return 2"
    assert weighted_vote([("return 3", 0.4), ("return 4", 0.4)])[0] == "return 3"


def test_empty_answers_abstain_and_bad_confidence_is_refused() -> None:
    assert weighted_vote([("", 0.9), ("   \n", 0.8)]) is None
    assert weighted_vote([("", 0.9), ("return 5", 0.1)]) == ("return 5", 0.1)
    with pytest.raises(ValueError):
        weighted_vote([("return 1", -0.1)])
    with pytest.raises(ValueError):
        weighted_vote([("return 1", float("nan"))])


def test_one_round_on_three_clients(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    cache = tmp_path_factory.mktemp("knexa-cache")
    clients = make_clients(tmp_path / "split", cache)
    method = FedIDCentralKD()
    method.setup(clients, {}, tmp_path / "work")
    server = method.server
    assert server is not None and server.model_name == clients[0].backend.model_name
    assert server.data.train == [] and server.data.val == [] and server.data.test == []
    assert server.transfer_prompts() == clients[0].backend.transfer_prompts()
    fresh_server = server.adapter_fingerprint()
    server_base = server.base_fingerprint()
    base = [c.backend.base_fingerprint() for c in clients]
    adapters = [c.backend.adapter_fingerprint() for c in clients]

    steps = method.communicate(round_context(clients, tmp_path / "work"))

    assert set(steps) == {0, 1, 2}
    received = {s.bytes_received for s in steps.values()}
    assert len(received) == 1 and received.pop() > 0  # everyone downloads the same server answers
    for i, c in enumerate(clients):
        s = steps[i]
        assert s.role == "server_student" and s.partner == "server"
        assert s.kd_loss is not None and math.isfinite(s.kd_loss)
        assert s.bytes_sent > 0
        assert c.backend.adapter_fingerprint() != adapters[i]
        assert c.backend.base_fingerprint() == base[i]
    assert method.last_server_loss is not None and math.isfinite(method.last_server_loss)
    trained_server = server.adapter_fingerprint()
    assert trained_server != fresh_server and server.base_fingerprint() == server_base

    method.save(tmp_path / "state")
    resumed = FedIDCentralKD()
    resumed.setup(clients, {}, tmp_path / "work")
    assert resumed.server is not None and resumed.server.adapter_fingerprint() == fresh_server
    resumed.load(tmp_path / "state")
    assert resumed.server.adapter_fingerprint() == trained_server
    assert resumed.server.trainer.step == server.trainer.step
    assert resumed.last_server_loss == method.last_server_loss

    other = FedIDCentralKD()  # a model no client runs: resolved in the clients' model cache
    other.setup(clients, {"server_model": "tiny-qwen2"}, tmp_path / "work")
    assert other.server is not None and other.server.loaded.model_type == "qwen2"
    with pytest.raises(ValueError, match="server model"):
        other.load(tmp_path / "state")


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown fedid-centralkd settings"):
        FedIDCentralKD().setup([], {"server": "x"}, tmp_path)

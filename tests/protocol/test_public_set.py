"""The public-set bundle: canonical bytes, digest, strict parsing, and its four wire messages."""

import contextlib
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as P


def problem(i: int, kind: str = "t") -> dict[str, str]:
    return {"task_id": f"{kind}/{i}", "prompt": f"def f{kind}{i}(x):\n", "canonical_solution": "    return x\n",
            "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": f"f{kind}{i}"}


TEST = [problem(i) for i in range(3)]
TRANSFER = [problem(i, "x") for i in range(2)]


def peer() -> bytes:
    return P.peer_id_from_public_key(Ed25519PrivateKey.generate().public_key())


def test_round_trip_and_digest_binds_version_and_content():
    data = P.encode_bundle(1, TEST, TRANSFER)
    bundle = P.decode_bundle(data, digest=P.bundle_digest(data))
    assert bundle.version == 1 and list(bundle.test) == TEST and list(bundle.transfer) == TRANSFER
    assert P.encode_bundle(1, reversed(TEST[::-1]), TRANSFER) == data  # deterministic
    assert P.bundle_digest(P.encode_bundle(2, TEST, TRANSFER)) != P.bundle_digest(data)
    edited = [dict(TEST[0], canonical_solution="    return 2\n"), *TEST[1:]]
    assert P.bundle_digest(P.encode_bundle(1, edited, TRANSFER)) != P.bundle_digest(data)


def test_tampered_or_non_canonical_bytes_are_refused():
    data = P.encode_bundle(1, TEST, TRANSFER)
    digest = P.bundle_digest(data)
    tampered = data.replace(b"return x", b"return y", 1)
    with pytest.raises(P.DecodeError, match="digest"):
        P.decode_bundle(tampered, digest=digest)
    pretty = json.dumps(json.loads(data), indent=1).encode()
    with pytest.raises(P.DecodeError, match="canonical"):
        P.decode_bundle(pretty)
    with pytest.raises(P.DecodeError, match="exactly the fields"):
        P.decode_bundle(json.dumps({"format": "knexa-public-set/1", "version": 1, "test": [{"x": 1}],
                                    "transfer": TRANSFER}).encode())


@pytest.mark.parametrize("test, transfer, match", [
    ([], TRANSFER, "non-empty"),
    (TEST, [TEST[0]], "overlap"),
    ([TEST[0], TEST[0]], TRANSFER, "repeats"),
    ([dict(TEST[0], extra="x")], TRANSFER, "exactly the fields"),
    ([dict(TEST[0], prompt=3)], TRANSFER, "not a string"),
])
def test_invalid_bundles_cannot_be_built(test, transfer, match):
    with pytest.raises(P.LocalProtocolError, match=match):
        P.encode_bundle(1, test, transfer)


def test_messages_round_trip_and_validate():
    a, digest = peer(), os.urandom(32)
    msgs = [P.PublicSetQuery("f", a), P.PublicSetAnnounce("f", a, 3, digest, 1000, 256, 1.0),
            P.PublicSetFetch("f", a, digest), P.PublicSetChunk(digest, 0, b"x" * 10)]
    for m in msgs:
        assert P.decode(P.encode(m)) == m
    assert msgs[1].chunks == 4
    with pytest.raises(P.LocalProtocolError, match="size"):
        P.PublicSetAnnounce("f", a, 1, digest, 64 * 1024 * 1024 + 1, 256, 1.0)
    with pytest.raises(P.LocalProtocolError, match="digest"):
        P.PublicSetFetch("f", a, b"short")
    with pytest.raises(P.LocalProtocolError, match="data"):
        P.PublicSetChunk(digest, 0, b"x" * (256 * 1024 + 1))
    with pytest.raises(P.LocalProtocolError, match="version"):
        P.PublicSetAnnounce("f", a, 0, digest, 10, 10, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_decode_to_a_bundle_or_decode_error(data):
    with contextlib.suppress(P.DecodeError):
        P.decode_bundle(data)

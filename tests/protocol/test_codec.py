import math
import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocol as P


def peer() -> bytes:
    return P.peer_id_from_public_key(Ed25519PrivateKey.generate().public_key())


def profile(**kw):
    args = {"federation": "f", "round": 3, "node": peer(), "vector": tuple([0.25] * 32)}
    args.update(kw)
    return P.Profile(**args)


def test_round_trip_every_message_type():
    a, b = peer(), peer()
    did = os.urandom(16)
    msgs = [
        profile(),
        P.Hello("f", a, os.urandom(32), 1.0),
        P.RewardReport("f", 1, did, a, b, -0.5, 1234),
        P.MatchDirective("f", 2, a, 3.0, (P.Match(did, a, b),), (a, b)),
        P.DirectiveRequest("f", 2, a),
        P.Reply(True, P.ReplyCode.OK, "", 4),
        P.PackageBody((P.PackageItem("HumanEval/0", "return 1"),), 0),
    ]
    for m in msgs:
        assert P.decode(P.encode(m)) == m


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -2.0])
def test_profile_rejects_non_finite_and_out_of_range(bad):
    vec = [0.1] * 32
    vec[5] = bad
    with pytest.raises(P.LocalProtocolError):
        profile(vector=tuple(vec))
    # the same values arriving from a peer are a DecodeError
    wire = msgpack.packb({"v": 1, "t": "profile", "f": {"federation": "f", "round": 1, "node": peer(), "vector": vec}})
    with pytest.raises(P.DecodeError):
        P.decode(wire)


def test_wrong_dimension_type_missing_and_extra_fields():
    base = {"federation": "f", "round": 1, "node": peer(), "vector": [0.1] * 32}
    cases = [
        {**base, "vector": [0.1] * 31},
        {**base, "round": "1"},
        {**base, "round": True},
        {k: v for k, v in base.items() if k != "node"},
        {**base, "extra": 1},
        {**base, "node": b"short"},
        {**base, "round": -1},
    ]
    for fields in cases:
        wire = msgpack.packb({"v": 1, "t": "profile", "f": fields}, use_bin_type=True)
        with pytest.raises(P.DecodeError):
            P.decode(wire)


def test_unknown_type_version_and_ext_types_rejected():
    good = P.encode(profile())
    obj = msgpack.unpackb(good)
    for mutate in ({"v": 2}, {"t": "nope"}, {"v": True}):
        with pytest.raises(P.DecodeError):
            P.decode(msgpack.packb({**obj, **mutate}, use_bin_type=True))
    with pytest.raises(P.DecodeError):
        P.decode(msgpack.packb(msgpack.ExtType(5, b"x")))
    with pytest.raises(P.DecodeError):
        P.decode(P.encode(profile()), P.RewardReport)


def test_oversize_rejected_before_decoding():
    with pytest.raises(P.OversizeError):
        P.decode(b"\x00" * 100, max_size=10)


def test_directive_invariants():
    a, b, c = peer(), peer(), peer()
    d1, d2 = os.urandom(16), os.urandom(16)
    with pytest.raises(P.LocalProtocolError):  # a peer in two pairs
        P.MatchDirective("f", 1, c, 1.0, (P.Match(d1, a, b), P.Match(d2, b, c)), (a, b, c))
    with pytest.raises(P.LocalProtocolError):  # duplicate directive id
        P.MatchDirective("f", 1, c, 1.0, (P.Match(d1, a, b), P.Match(d1, c, peer())), (a, b, c))
    with pytest.raises(P.LocalProtocolError):  # self pair
        P.Match(d1, a, a)
    assert math.isfinite(P.MatchDirective("f", 1, c, 1.0, (), ()).issued_at)

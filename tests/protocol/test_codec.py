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


def test_profile_skills_are_optional_on_the_wire_both_ways():
    """A node that shares no skills sends exactly what a node without the field sent, so peers of
    either version understand it; a node that shares them round-trips them."""
    plain, shared = profile(), profile(skills=tuple([0.5] * P.SKILLS_DIM))
    wire = msgpack.unpackb(P.encode(plain))
    assert "skills" not in wire["f"]
    assert P.decode(P.encode(plain)).skills == ()
    assert P.decode(P.encode(shared)) == shared
    assert msgpack.unpackb(P.encode(shared))["f"]["skills"] == [0.5] * P.SKILLS_DIM
    # a profile as an older node encodes it (no "skills" key at all) is still a valid profile
    old = {"v": wire["v"], "t": "profile", "f": {k: v for k, v in wire["f"].items() if k != "skills"}}
    assert P.decode(msgpack.packb(old, use_bin_type=True)) == plain
    # a required field is still required, and an unknown one still refused
    for broken in ({k: v for k, v in wire["f"].items() if k != "vector"}, {**wire["f"], "extra": 1}):
        with pytest.raises(P.DecodeError, match="missing|unknown"):
            P.decode(msgpack.packb({**old, "f": broken}, use_bin_type=True))


@pytest.mark.parametrize("skills", [(0.5,) * 11, (0.5,) * 13, (0.5,) * 11 + (1.5,), (0.5,) * 11 + (-0.1,),
                                    (0.5,) * 11 + (float("nan"),)])
def test_profile_rejects_malformed_skills_locally_and_from_the_wire(skills):
    with pytest.raises(P.LocalProtocolError, match="skills"):
        profile(skills=skills)
    wire = msgpack.unpackb(P.encode(profile()))
    wire["f"]["skills"] = list(skills)
    with pytest.raises(P.DecodeError, match="skills"):
        P.decode(msgpack.packb(wire, use_bin_type=True))

"""Any bytes into any decoder: a valid message or a RemoteProtocolError, nothing else."""

import contextlib
import os

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as P

KEY = Ed25519PrivateKey.generate()
ME = P.peer_id_from_public_key(KEY.public_key())
DID = b"\x01" * 16
SEEDS = [
    P.encode(P.Profile("f", 1, ME, tuple([0.5] * 32))),
    P.encode(P.RewardReport("f", 1, DID, ME, P.peer_id_from_public_key(Ed25519PrivateKey.generate().public_key()), 0.1, 10)),
    P.encode(P.sign(P.DirectiveRequest("f", 1, ME), KEY)),
    P.encode(P.PackageBody((P.PackageItem("t/1", "x"),), 0)),
    P.encode(P.Reply(False, "replay", "no", 3)),
]
FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_all_ways(data: bytes) -> None:
    for expect in (None, P.Profile, P.Signed, P.PackageBody):
        try:
            msg = P.decode(data, expect, max_size=64 * 1024)
        except P.RemoteProtocolError:
            continue
        assert isinstance(msg, P.Message)
        if isinstance(msg, P.Signed):
            with contextlib.suppress(P.RemoteProtocolError):
                P.open_signed(msg, (P.Profile, P.DirectiveRequest), authenticated=ME)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    _decode_all_ways(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 64))
def test_mutated_valid_messages(seed, flips, cut):
    data = bytearray(seed)
    for pos, val in flips:
        data[pos % len(data)] = val
    _decode_all_ways(bytes(data[: len(data) - cut]))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.sampled_from(sorted(P.MESSAGE_TYPES)), st.dictionaries(st.text(max_size=12), msgpack_values, max_size=9),
       st.integers(0, 3))
def test_structured_garbage(type_, fields, version):
    _decode_all_ways(msgpack.packb({"v": version, "t": type_, "f": fields}, use_bin_type=True))


@FUZZ
@given(st.binary(max_size=2048))
def test_frame_decoder_any_bytes(data):
    dec = P.FrameDecoder(max_size=1024)
    try:
        dec.receive_data(data)
        while dec.next_frame() is not P.NEED_DATA:
            pass
        dec.eof()
    except P.RemoteProtocolError:
        pass


def test_sealed_package_garbage_open():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    priv = X25519PrivateKey.generate()
    for _ in range(200):
        sp = P.SealedPackage("f", 1, os.urandom(16), ME, ME, os.urandom(32), os.urandom(12), os.urandom(64))
        with contextlib.suppress(P.RemoteProtocolError):
            P.open_package(sp, priv)

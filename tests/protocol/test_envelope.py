import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import protocol as P


def ident():
    k = Ed25519PrivateKey.generate()
    return k, P.peer_id_from_public_key(k.public_key())


def kem():
    k = X25519PrivateKey.generate()
    return k, k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


BODY = P.PackageBody((P.PackageItem("HumanEval/1", "    return sorted(x)\n"),), 0)


def sealed_for(sender, recipient, pub, **kw):
    args = {"federation": "fed", "round": 4, "directive_id": b"d" * 16, "sender": sender, "recipient": recipient,
            "recipient_kem_public": pub}
    args.update(kw)
    return P.seal_package(BODY, **args)


def test_sign_verify_binds_authenticated_peer():
    k, me = ident()
    _, other = ident()
    s = P.sign(P.DirectiveRequest("f", 1, me), k)
    assert P.open_signed(s, P.DirectiveRequest, authenticated=me, sender_of=lambda m: m.node).round == 1
    with pytest.raises(P.SignatureError):  # valid signature, wrong authenticated peer
        P.open_signed(s, P.DirectiveRequest, authenticated=other)


def test_valid_signature_claiming_another_sender_rejected():
    k, me = ident()
    _, victim = ident()
    s = P.sign(P.DirectiveRequest("f", 1, victim), k)
    with pytest.raises(P.SignatureError):
        P.open_signed(s, P.DirectiveRequest, authenticated=me, sender_of=lambda m: m.node)


def test_flipped_bit_in_signed_body_or_signature_rejected():
    k, me = ident()
    s = P.sign(P.Reply(True, "ok", "", 1), k)
    for field in ("body", "signature"):
        raw = bytearray(getattr(s, field))
        raw[len(raw) // 2] ^= 1
        bad = P.Signed(**{**s.field_values(), field: bytes(raw)})
        with pytest.raises(P.RemoteProtocolError):
            P.open_signed(bad, P.Reply, authenticated=me)


def test_seal_open_round_trip_and_every_tamper_fails():
    _, a = ident()
    _, b = ident()
    priv, pub = kem()
    sealed = sealed_for(a, b, pub)
    assert P.open_package(sealed, priv) == BODY
    tampered = []
    for name in ("ciphertext", "nonce", "ephemeral_public"):
        raw = bytearray(getattr(sealed, name))
        raw[0] ^= 1
        tampered.append(P.SealedPackage(**{**sealed.field_values(), name: bytes(raw)}))
    _, c = ident()
    tampered += [
        P.SealedPackage(**{**sealed.field_values(), "round": 5}),
        P.SealedPackage(**{**sealed.field_values(), "directive_id": b"e" * 16}),
        P.SealedPackage(**{**sealed.field_values(), "recipient": c}),
        P.SealedPackage(**{**sealed.field_values(), "sender": c}),
        P.SealedPackage(**{**sealed.field_values(), "federation": "other"}),
    ]
    for t in tampered:
        with pytest.raises(P.DecryptError):
            P.open_package(t, priv)
    other_priv, _ = kem()
    with pytest.raises(P.DecryptError):
        P.open_package(sealed, other_priv)


def test_fresh_ephemeral_key_per_package():
    _, a = ident()
    _, b = ident()
    _, pub = kem()
    assert sealed_for(a, b, pub).ephemeral_public != sealed_for(a, b, pub).ephemeral_public


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    seed = os.urandom(32)
    kp = create_new_key_pair(seed)
    ours = P.peer_id_from_public_key(Ed25519PrivateKey.from_private_bytes(seed).public_key())
    assert ID.from_pubkey(kp.public_key).to_bytes() == ours
    assert P.peer_id_str(ours) == ID.from_pubkey(kp.public_key).to_string()

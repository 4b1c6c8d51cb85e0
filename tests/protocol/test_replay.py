import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocol as P


def peer():
    return P.peer_id_from_public_key(Ed25519PrivateKey.generate().public_key())


def test_directive_book_consumes_once_and_checks_roles_and_rounds():
    a, b, cpm = peer(), peer(), peer()
    did = os.urandom(16)
    book = P.DirectiveBook(window=2)
    d = P.MatchDirective("f", 5, cpm, 1.0, (P.Match(did, a, b),), (a, b))
    assert book.add_directive(d)
    assert not book.add_directive(d)  # duplicate delivery (gossip replays) is ignored
    with pytest.raises(P.ReplayError):
        book.lookup(os.urandom(16), 5)  # never issued
    with pytest.raises(P.ReplayError):
        book.lookup(did, 4)  # moved to another round
    with pytest.raises(P.UnauthorizedError):
        book.consume(did, 5, teacher=b, student=a)  # roles swapped
    book.consume(did, 5, teacher=a, student=b)
    with pytest.raises(P.ReplayError):
        book.consume(did, 5, teacher=a, student=b)  # replay
    for r in (6, 7, 8, 9):
        book.add_directive(P.MatchDirective("f", r, cpm, 1.0, (), ()))
    with pytest.raises(P.ReplayError):
        book.add_directive(d.__class__(**{**d.field_values(), "round": 1}))  # stale round

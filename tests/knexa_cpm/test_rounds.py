import itertools
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocol as P
from knexa_cpm.rounds import RoundMachine, RoundSettings


def peer():
    return P.peer_id_from_public_key(Ed25519PrivateKey.generate().public_key())


NODES = [peer() for _ in range(4)]
CPM = peer()


def machine(**kw):
    args = {"federation": "f", "cpm": CPM, "roster": frozenset(NODES), "expected_nodes": 4, "quorum": 1.0,
            "round_timeout_s": 10.0, "min_participants": 2}
    args.update(kw)
    return RoundMachine(RoundSettings(**args))


def prof(node, round_=0, value=0.5):
    return P.Profile("f", round_, node, tuple([value] * 32))


def pair_first_two(matrix, round_):
    return [(0, 1)] if len(matrix) >= 2 else []


def ids():
    counter = itertools.count()
    return lambda: next(counter).to_bytes(16, "big")


def test_quorum_closes_round_and_directive_names_reporters():
    m = machine()
    for i, n in enumerate(NODES[:3]):
        assert m.submit_profile(n, prof(n), now=float(i)).ok
    assert not m.ready_to_close(now=3.0)
    assert m.submit_profile(NODES[3], prof(NODES[3]), now=3.0).ok
    assert m.ready_to_close(now=3.0)
    d = m.close_round(4.0, pair_first_two, ids())
    assert d.round == 0 and m.round == 1
    assert set(d.participants) == set(NODES)
    assert len(d.pairs) == 1


def test_timeout_closes_with_min_participants_and_late_profile_is_stale():
    m = machine()
    m.submit_profile(NODES[0], prof(NODES[0]), now=0.0)
    assert not m.ready_to_close(now=100.0)  # one node cannot form a pair
    m.submit_profile(NODES[1], prof(NODES[1]), now=1.0)
    assert not m.ready_to_close(now=5.0)
    assert m.ready_to_close(now=10.5)
    m.close_round(11.0, pair_first_two, ids())
    late = m.submit_profile(NODES[2], prof(NODES[2], round_=0), now=12.0)
    assert not late.ok and late.code == P.ReplyCode.STALE_ROUND and late.round == 1


def test_unknown_peer_refused():
    m = machine()
    stranger = peer()
    r = m.submit_profile(stranger, prof(stranger), now=0.0)
    assert not r.ok and r.code == P.ReplyCode.UNAUTHORIZED


def test_reward_only_from_student_once():
    m = machine(quorum=0.5)
    for n in NODES[:2]:
        m.submit_profile(n, prof(n), now=0.0)
    d = m.close_round(1.0, pair_first_two, ids())
    match = d.pairs[0]
    report = P.RewardReport("f", 0, match.directive_id, match.teacher, match.student, 0.3, 100)
    reply, entry = m.submit_reward(match.teacher, report)  # the teacher cannot report
    assert not reply.ok and entry is None
    reply, entry = m.submit_reward(match.student, report)
    assert reply.ok and entry is not None and entry.teacher == match.teacher
    reply, entry = m.submit_reward(match.student, report)  # replay
    assert not reply.ok and reply.code == P.ReplyCode.REPLAY
    forged = P.RewardReport("f", 0, os.urandom(16), match.teacher, match.student, 0.3, 100)
    assert not m.submit_reward(match.student, forged)[0].ok  # never issued


def test_state_round_trip_is_exact():
    m = machine(quorum=0.5)
    for n in NODES[:2]:
        m.submit_profile(n, prof(n), now=0.0)
    m.close_round(1.0, pair_first_two, ids())
    m.submit_profile(NODES[2], prof(NODES[2], round_=1), now=2.0)
    restored = RoundMachine.from_state(m.settings, m.to_state())
    assert restored.to_state() == m.to_state()
    assert restored.directive_for(0) == m.directive_for(0)


def test_a_participants_resent_profile_is_acknowledged_for_its_closed_round():
    """The first ack was lost: the node must learn its round closed with it, not skip the round."""
    m = machine()
    for i, n in enumerate(NODES[:2]):
        m.submit_profile(n, prof(n), now=float(i))
    m.close_round(11.0, pair_first_two, ids())
    again = m.submit_profile(NODES[0], prof(NODES[0], round_=0), now=12.0)
    assert again.ok and again.round == 0 and m.round == 1
    assert NODES[0] not in m.profiles, "the resend is not counted again in the open round"


def test_rows_carry_shared_skills_and_mark_unshared_ones_unknown_across_a_restart():
    from knexa_cpm.policies import ROW_DIM, SKILLS_SLICE, UNKNOWN_SKILL

    m = machine()
    sharing = P.Profile("f", 0, NODES[0], tuple([0.5] * 32), skills=tuple([0.25] * P.SKILLS_DIM))
    assert m.submit_profile(NODES[0], sharing, now=0.0).ok
    assert m.submit_profile(NODES[1], prof(NODES[1]), now=0.0).ok
    seen = []
    m.close_round(1.0, lambda matrix, r: seen.append(matrix) or [(0, 1)], ids())
    matrix = seen[0]
    assert matrix.shape == (2, ROW_DIM)
    by_node = dict(zip(sorted(NODES[:2]), matrix, strict=True))
    assert list(by_node[NODES[0]][SKILLS_SLICE]) == [0.25] * P.SKILLS_DIM
    assert list(by_node[NODES[1]][SKILLS_SLICE]) == [UNKNOWN_SKILL] * P.SKILLS_DIM
    # a state written before rows carried skills (32 values per row) loads as "not shared"
    state = m.to_state()
    entry = next(iter(state["pending"].values()))
    entry[3], entry[4] = entry[3][:32], entry[4][:32]
    state["profiles"] = {NODES[2]: [0.5] * 32}
    back = RoundMachine.from_state(m.settings, state)
    assert back.profiles[NODES[2]][32:] == [UNKNOWN_SKILL] * P.SKILLS_DIM
    pending = next(iter(back.pending.values()))
    assert len(pending.teacher_profile) == len(pending.student_profile) == ROW_DIM

import pytest

from knexa_p2p.identity import Identity
from knexa_runtime.daemon import merged_roster
from knexa_runtime.roster import RosterError, load_roster, peer_id_ok


def _pid(i: int) -> str:
    return str(Identity.from_seed(bytes([i]) * 32).peer_id)


def test_loads_entries_and_merges(tmp_path):
    a, b = _pid(1), _pid(2)
    f = tmp_path / "roster.toml"
    f.write_text(f'# members\n[[peer]]\nid = "{a}"\nname = "acme"\n'
                 f'addr = "/ip4/10.0.0.1/tcp/4002/p2p/{a}"\n\n[[peer]]\nid = "{b}"\n')
    entries = load_roster(f)
    assert [(e.id, e.name) for e in entries] == [(a, "acme"), (b, "")]
    ids, addrs = merged_roster([_pid(3)], f)
    assert ids == {a, b, _pid(3)}
    assert addrs == [f"/ip4/10.0.0.1/tcp/4002/p2p/{a}"]


@pytest.mark.parametrize("body, needle", [
    ('[[peer]]\nid = "nonsense"\n', "not an Ed25519 peer id"),
    ('[[peer]]\nname = "x"\n', "needs id"),
    ('[[peer]]\nid = "{a}"\ncolor = "red"\n', "unknown keys"),
    ('[[peer]]\nid = "{a}"\naddr = "/ip4/1.2.3.4/tcp/1/p2p/{b}"\n', "addr must end with"),
    ('[[peer]]\nid = "{a}"\n[[peer]]\nid = "{a}"\n', "duplicate"),
    ('peer = 3\n', "expected [[peer]]"),
    ('[[peer\n', "invalid TOML"),
])
def test_rejects_bad_files_with_a_clear_message(tmp_path, body, needle):
    f = tmp_path / "roster.toml"
    f.write_text(body.replace("{a}", _pid(1)).replace("{b}", _pid(2)))
    with pytest.raises(RosterError, match=needle.replace("[", r"\[")):
        load_roster(f)


def test_missing_file(tmp_path):
    with pytest.raises(RosterError, match="not found"):
        load_roster(tmp_path / "nope.toml")


def test_peer_id_check():
    assert peer_id_ok(_pid(9))
    assert not peer_id_ok("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # RSA-style multihash
    assert not peer_id_ok("0OIl")  # not base58

"""FedProxy: TIES merging on hand-built tensors, proxy construction per family, real rounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from knexa_lab.experiment.methods.base import ClientStep
from knexa_lab.experiment.methods.fedproxy import FedProxy, FedProxySettings, private_examples
from knexa_lab.experiment.proxy import (
    build_proxy,
    decoder_layers,
    layer_mapping,
    lora_delta,
    payload_bytes,
    plug_in,
    ties_merge,
)
from tests.knexa_lab.fedproxy_fixtures import (
    DEEP_LAYERS,
    deep_tiny,
    lora_tensors,
    make_clients,
    round_context,
)

PRESETS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-gptneox")
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _layer_of(name: str) -> int:
    match = _LAYER.search(name)
    assert match, name
    return int(match.group(1))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


# ---- TIES merging -------------------------------------------------------------------------------

def test_ties_elects_sign_by_mass_and_averages_only_agreeing_entries() -> None:
    deltas = [{"w": _t(3.0, -1.0, 0.5, 2.0, 5.0)},
              {"w": _t(1.0, -2.0, -4.0, 0.0, -1.0)},
              {"w": _t(-1.0, 1.0, -0.5, 1.0, -1.0)}]
    merged = ties_merge(deltas, trim_frac=1.0)["w"]
    # entry 0: mass +3 -> mean(3, 1); entry 1: mass -2 -> mean(-1, -2); entry 2: mass -4 ->
    # mean(-4, -0.5); entry 3: the zero is no vote -> mean(2, 1); entry 4: one +5 outweighs two -1s
    torch.testing.assert_close(merged, _t(2.0, -1.5, -2.25, 1.5, 5.0))


def test_ties_frequency_sign_counts_votes_instead_of_mass() -> None:
    deltas = [{"w": _t(5.0)}, {"w": _t(-1.0)}, {"w": _t(-1.0)}]
    torch.testing.assert_close(ties_merge(deltas, 1.0, sign_method="frequency")["w"], _t(-1.0))


def test_ties_trims_each_delta_to_its_largest_entries_before_voting() -> None:
    deltas = [{"w": _t(3.0, -1.0, 0.5, 2.0)}, {"w": _t(1.0, -2.0, -4.0, 0.0)}]
    # half of each delta survives: (3, 2) of the first, (-2, -4) of the second, so no entry has
    # two votes and each merged entry is the one survivor; untrimmed, entries 0 and 1 average
    # two agreeing votes (mean(3, 1), mean(-1, -2)) and entry 2 keeps only the -4 of mass -3.5
    torch.testing.assert_close(ties_merge(deltas, trim_frac=0.5)["w"], _t(3.0, -2.0, -4.0, 2.0))
    torch.testing.assert_close(ties_merge(deltas, trim_frac=1.0)["w"], _t(2.0, -1.5, -4.0, 2.0))


def test_ties_of_agreeing_untrimmed_deltas_is_the_plain_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    sign = torch.randn(4, 3, generator=gen).sign()
    deltas = [{"a": sign * (torch.rand(4, 3, generator=gen) + 0.1), "b": torch.rand(2, generator=gen) + 0.1}
              for _ in range(3)]
    merged = ties_merge(deltas, trim_frac=1.0)
    for name in ("a", "b"):
        torch.testing.assert_close(merged[name], torch.stack([d[name] for d in deltas]).mean(0))


def test_ties_of_one_delta_keeps_it_and_rejects_mismatches() -> None:
    delta = {"w": torch.randn(3, 2)}
    torch.testing.assert_close(ties_merge([delta], 1.0)["w"], delta["w"])
    with pytest.raises(ValueError, match="different shapes"):
        ties_merge([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="different tensors"):
        ties_merge([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="trim_frac"):
        ties_merge([delta], 1.5)
    with pytest.raises(ValueError):
        ties_merge([])


def test_lora_delta_and_payload_size() -> None:
    before, after = {"w": torch.ones(4)}, {"w": torch.arange(4.0)}
    torch.testing.assert_close(lora_delta(before, after)["w"], _t(-1.0, 0.0, 1.0, 2.0))
    size = payload_bytes({"a": torch.zeros(400), "b": torch.zeros(10, dtype=torch.bfloat16)})
    assert 400 * 4 + 10 * 2 < size < 400 * 4 + 10 * 2 + 200  # raw tensor bytes plus a small header


# ---- compression --------------------------------------------------------------------------------

def test_layer_mapping_keeps_first_last_and_strided_layers() -> None:
    assert layer_mapping(5, stride=2) == (0, 2, 4)
    assert layer_mapping(6, stride=2) == (0, 2, 4, 5)
    assert layer_mapping(30, stride=4) == (0, 4, 8, 12, 16, 20, 24, 28, 29)
    assert layer_mapping(4, stride=1) == (0, 1, 2, 3)
    assert layer_mapping(2, stride=3) == (0, 1)
    kept = layer_mapping(30, keep_layers=4)
    assert len(kept) == 4 and kept[0] == 0 and kept[-1] == 29
    assert layer_mapping(3, keep_layers=10) == (0, 1, 2)
    for bad in ({"stride": 0}, {"keep_layers": 1}):
        with pytest.raises(ValueError):
            layer_mapping(5, **bad)


def test_settings_reject_unknown_and_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="unknown fedproxy settings"):
        FedProxySettings({"strde": 2})
    with pytest.raises(ValueError, match="trim_frac"):
        FedProxySettings({"trim_frac": 0})
    s = FedProxySettings({"keep_layers": 3, "trim_frac": 0.5})
    assert (s.stride, s.keep_layers, s.trim_frac, s.epochs) == (2, 3, 0.5, 1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedproxy-cache")


def _load(preset: str, cache: Path, seed: int = 1):  # -> LoadedModel
    from knexa_node.models import LoraSettings, load_model, resolve_model

    spec = resolve_model(str(deep_tiny(preset, cache)), cache_dir=cache)
    return load_model(spec, lora=LoraSettings(rank=4, alpha=8, dropout=0.0), device="cpu", seed=seed)


@pytest.mark.parametrize("preset", PRESETS)
def test_proxy_drops_layers_and_shares_the_frozen_llm(preset: str, cache: Path) -> None:
    loaded = _load(preset, cache)
    llm = loaded.model
    with torch.no_grad():  # a non-trivial adapter, so "starts from the LLM's LoRA" can fail
        for p in llm.parameters():
            if p.requires_grad:
                p.normal_()
    proxy = build_proxy(llm, layer_mapping(DEEP_LAYERS, stride=2))

    assert proxy.mapping == (0, 2, 4)
    _, layers = decoder_layers(proxy.model)
    assert len(layers) == 3 < len(decoder_layers(llm)[1]) == DEEP_LAYERS
    assert proxy.model.config.num_hidden_layers == 3
    # attention modules are numbered by proxy position (the KV cache indexes them)
    assert sorted({m.layer_idx for m in proxy.model.modules() if hasattr(m, "layer_idx")}) == [0, 1, 2]

    llm_params = dict(llm.named_parameters())
    llm_ptrs = {p.data_ptr() for p in llm_params.values() if not p.requires_grad}
    frozen = [p for p in proxy.model.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in llm_ptrs for p in frozen)  # shared, not copied
    lora = proxy.lora_state()
    assert set(lora) == set(proxy.llm_names)
    mapped_layers = set()
    for name, llm_name in proxy.llm_names.items():
        assert lora[name].shape == llm_params[llm_name].shape
        assert proxy.mapping[_layer_of(name)] == _layer_of(llm_name)
        torch.testing.assert_close(lora[name], llm_params[llm_name])
        mapped_layers.add(_layer_of(llm_name))
    assert mapped_layers == {0, 2, 4}

    ids = torch.tensor([[5, 17, 33, 2, 9, 11]])
    logits = proxy.model(input_ids=ids).logits
    assert logits.shape == (1, 6, llm.config.vocab_size) and torch.isfinite(logits).all()
    assert proxy.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("preset", PRESETS)
def test_proxy_keeping_every_layer_computes_what_the_llm_computes(preset: str, cache: Path) -> None:
    llm = _load(preset, cache).model.eval()
    proxy = build_proxy(llm, layer_mapping(DEEP_LAYERS, stride=1))
    ids = torch.tensor([[5, 17, 33, 2, 9, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(proxy.model.eval()(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_build_proxy_rejects_bad_mappings(cache: Path) -> None:
    llm = _load("tiny-llama", cache).model
    for bad in ((), (0, 0, 4), (2, 1), (0, DEEP_LAYERS)):
        with pytest.raises(ValueError, match="mapping"):
            build_proxy(llm, bad)


def test_plug_in_touches_only_the_named_lora_tensors(cache: Path) -> None:
    llm = _load("tiny-gpt2", cache).model
    proxy = build_proxy(llm, (0, 4))
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    delta = {n: torch.full_like(t, 0.5) for n, t in proxy.lora_state().items()}
    plug_in(llm, delta, proxy.llm_names)
    changed = {n for n, p in llm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(proxy.llm_names.values())


# ---- real rounds ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> list:
    """Two clients on the same 5-layer llama, one on a 5-layer gpt2."""
    llama, gpt2 = deep_tiny("tiny-llama", cache), deep_tiny("tiny-gpt2", cache)
    return make_clients(tmp_path_factory.mktemp("split"), [llama, llama, gpt2], cache)


def test_private_examples_are_the_backends_own_encoding(federation: list) -> None:
    for client in federation:
        assert private_examples(client.backend) == client.backend._train


@pytest.mark.slow
def test_round_plugs_the_merged_delta_into_mapped_layers_and_resumes(federation: list, tmp_path: Path) -> None:
    clients = federation
    settings = {"stride": 2, "trim_frac": 0.5}
    fingerprints = [c.backend.base_fingerprint() for c in clients]
    method = FedProxy()
    assert method.name == "fedproxy" and method.local_training is False
    method.setup(clients, settings, tmp_path / "work")
    start = [lora_tensors(c) for c in clients]
    proxies_before = {i: method.proxies[i].lora_state() for i in range(3)}
    # the server handed both llama clients one proxy, and their LLMs the same mapped adapter
    for name, llm_name in method.proxies[0].llm_names.items():
        torch.testing.assert_close(proxies_before[0][name], proxies_before[1][name])
        torch.testing.assert_close(start[0][llm_name], start[1][llm_name])

    steps = method.communicate(round_context(clients, tmp_path / "work", 0, settings))

    assert set(steps) == {0, 1, 2}
    for i in (0, 1):
        assert steps[i].role == "aggregated" and steps[i].kd_loss is None
        assert steps[i].bytes_sent == steps[i].bytes_received > 0  # dense delta up, dense merge down
    assert steps[2] == ClientStep(role="local")
    after = [lora_tensors(c) for c in clients]
    for i, client in enumerate(clients):
        proxy = method.proxies[i]
        mapped = set(proxy.llm_names.values())
        changed = {n for n in after[i] if not torch.equal(after[i][n], start[i][n])}
        assert changed and changed <= mapped  # unmapped layers (1, 3) untouched
        assert {_layer_of(n) for n in changed} == {0, 2, 4}
        proxy_after = proxy.lora_state()
        for name, llm_name in proxy.llm_names.items():  # the LLM got what the proxy got
            torch.testing.assert_close(after[i][llm_name] - start[i][llm_name],
                                       proxy_after[name] - proxies_before[i][name])
        assert client.backend.base_fingerprint() == fingerprints[i]
    for llm_name in method.proxies[0].llm_names.values():  # one merged contribution for the group
        torch.testing.assert_close(after[0][llm_name] - start[0][llm_name], after[1][llm_name] - start[1][llm_name])
    assert not all(torch.equal(after[0][n] - start[0][n], torch.zeros_like(start[0][n]))
                   for n in method.proxies[0].llm_names.values())

    # save; round 1 uninterrupted; then rewind the LLM adapters and resume from the save
    method.save(tmp_path / "state")
    saved_proxies = {i: method.proxies[i].lora_state() for i in range(3)}
    saved_steps = {i: method.trainers[i].step for i in range(3)}
    assert all(saved_steps.values())
    method.communicate(round_context(clients, tmp_path / "work", 1, settings))
    uninterrupted = [lora_tensors(c) for c in clients]
    for client, adapter in zip(clients, after, strict=True):
        with torch.no_grad():
            for n, p in client.backend.model.named_parameters():
                if p.requires_grad:
                    p.copy_(adapter[n])
    resumed = FedProxy()
    resumed.setup(clients, settings, tmp_path / "work")
    resumed.load(tmp_path / "state")
    for i in range(3):
        loaded = resumed.proxies[i].lora_state()
        for name, value in saved_proxies[i].items():
            torch.testing.assert_close(loaded[name], value)
        assert resumed.trainers[i].step == saved_steps[i] < method.trainers[i].step
    resumed.communicate(round_context(clients, tmp_path / "work", 1, settings))
    for client, expected in zip(clients, uninterrupted, strict=True):
        for n, value in lora_tensors(client).items():
            torch.testing.assert_close(value, expected[n], rtol=0, atol=0)

    other = FedProxy()
    other.setup(clients, {"stride": 1}, tmp_path / "work")
    with pytest.raises(ValueError, match="layer maps"):
        other.load(tmp_path / "state")

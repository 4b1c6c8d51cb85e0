"""Central-KD: tokenizer groups, the tempered-softmax ensemble, logit KD, and one real round."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from knexa_lab.experiment.methods.base import Client
from knexa_lab.experiment.methods.central_kd import CentralKD, consensus_answers
from knexa_lab.experiment.methods.logit_kd import (
    answer_logprobs,
    distill_logits,
    encode_completions,
    ensemble_mean,
    kd_kl_sum,
    output_vocab,
    teacher_dists,
    top_k_dist,
    vocab_key,
)
from knexa_node.training import IGNORE, collate
from tests.knexa_lab.central_fixtures import make_clients, round_context

PAIRS = [
    ("def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "    return a + b\n"),
    ("def neg(x):\n    \"\"\"Negate x.\"\"\"\n", "    return -x\n"),
    ("def first(xs):\n    \"\"\"First element.\"\"\"\n", "    return xs[0]\n"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knexa-cache")


@pytest.fixture(scope="module")
def same_vocab(tmp_path_factory: pytest.TempPathFactory, cache: Path):  # noqa: ANN201 - list[Client]
    """Two different architectures whose tiny tokenizers are byte-identical (gpt2, gpt_neox)."""
    return make_clients(tmp_path_factory.mktemp("split2"), cache, ("tiny-gpt2", "tiny-gptneox"))


def test_vocab_key_groups_identical_tokenizers_only(same_vocab, cache: Path, tmp_path: Path) -> None:  # noqa: ANN001
    a, b = (c.backend.tokenizer for c in same_vocab)
    assert vocab_key(a) == vocab_key(b)
    [llama] = make_clients(tmp_path, cache, ("tiny-llama",))
    assert vocab_key(llama.backend.tokenizer) != vocab_key(a)


def test_ensemble_is_the_mean_of_members_tempered_softmax(same_vocab) -> None:  # noqa: ANN001
    temperature = 1.7
    examples = encode_completions(same_vocab[0].backend, PAIRS)
    vocab = min(output_vocab(c.backend) for c in same_vocab)
    uploads = [teacher_dists(c.backend, examples, temperature, top_k=0, vocab_size=vocab) for c in same_vocab]
    # independently: full forward pass, pick the completion positions, softmax at T
    expected = []
    for c in same_vocab:
        model = c.backend.model
        model.eval()
        with torch.no_grad():
            per_example = []
            for e in examples:
                batch = collate([e], c.backend.trainer.pad_id, "cpu")
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                mask = batch["labels"][0, 1:] != IGNORE
                per_example.append(torch.softmax(logits[0, :-1][mask][:, :vocab] / temperature, dim=-1))
        model.train()
        expected.append(per_example)
    for k, e in enumerate(examples):
        ens = ensemble_mean([u[k] for u in uploads], vocab)
        assert ens.shape == (e.n_targets, vocab)
        # random tiny models are near-uniform at T > 1: compare log-probabilities
        torch.testing.assert_close(ens.log(), ((expected[0][k] + expected[1][k]) / 2).log(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ens.sum(-1), torch.ones(e.n_targets))
        gap = (expected[0][k].log() - expected[1][k].log()).abs().max()
        assert gap > 1e-2, gap  # the members really differ, so the test can fail


def test_top_k_keeps_the_largest_entries_and_the_rest_as_tail() -> None:
    probs = torch.softmax(torch.randn(5, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = top_k_dist(probs, 8)
    assert d.idx.shape == (5, 8) and not d.dense
    top = probs.sort(-1, descending=True).values[:, :8]
    torch.testing.assert_close(d.prob.sort(-1, descending=True).values, top)
    torch.testing.assert_close(d.tail, 1 - top.sum(-1))
    assert d.wire_bytes() == 5 * 8 * 6
    dense = top_k_dist(probs, 0)
    assert dense.dense and dense.wire_bytes() == 5 * 50 * 2
    torch.testing.assert_close(dense.to_dense(50), probs)
    torch.testing.assert_close(dense.tail, torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [0, 10])
def test_kd_loss_is_zero_only_when_the_student_matches(top_k: int) -> None:
    g = torch.Generator().manual_seed(1)
    temperature = 2.0
    teacher_logits = torch.randn(6, 40, generator=g) * 3
    target = top_k_dist(torch.softmax(teacher_logits / temperature, dim=-1), top_k)
    assert abs(float(kd_kl_sum(teacher_logits, target, temperature))) < 1e-5
    other = teacher_logits + torch.randn(6, 40, generator=g)
    assert float(kd_kl_sum(other, target, temperature)) > 1e-3


def test_sparse_kd_loss_compares_the_tail_as_one_bucket() -> None:
    """Moving mass among the tokens outside the top-k costs nothing; moving it into them does."""
    g = torch.Generator().manual_seed(2)
    temperature = 1.5
    logits = torch.randn(4, 30, generator=g) * 2
    target = top_k_dist(torch.softmax(logits / temperature, dim=-1), 5)
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(1, target.idx, False)
    # reshuffle the tail: same total outside the top-k, different per-token split
    q = torch.softmax(logits / temperature, dim=-1)
    tail_q = torch.where(outside, q, 0)
    shuffled = torch.where(outside, tail_q.sum(-1, keepdim=True) * torch.softmax(
        torch.where(outside, torch.randn(4, 30, generator=g), float("-inf")), -1), q)
    assert abs(float(kd_kl_sum(temperature * shuffled.log(), target, temperature))) < 1e-5
    # a student that renormalises the top-k (no tail mass) is penalised
    renorm = torch.where(outside, 1e-9, q)
    assert float(kd_kl_sum(temperature * renorm.log(), target, temperature)) > 0.1


def test_logit_distillation_moves_the_student_towards_the_target(same_vocab) -> None:  # noqa: ANN001
    """With a_KD = 1 and no local data, KD steps reduce KL(teacher || student) on the KD set."""
    teacher, student = (c.backend for c in same_vocab)
    temperature = 2.0
    examples = encode_completions(teacher, PAIRS)
    vocab = min(output_vocab(teacher), output_vocab(student))
    targets = teacher_dists(teacher, examples, temperature, top_k=16, vocab_size=vocab)

    def kl() -> float:
        student.model.eval()
        with torch.no_grad():
            total = sum(float(kd_kl_sum(teacher_dists_logits(student, e, vocab), t, temperature))
                        for e, t in zip(examples, targets, strict=True))
        student.model.train()
        return total

    before, step0 = kl(), student.trainer.step
    fp = student.adapter_fingerprint()
    budget0 = student.trainer.budget.as_dict()
    for r in range(4):
        report = distill_logits(student.trainer, list(zip(examples, targets, strict=True)), [], 1.0,
                                temperature, r, vocab_size=vocab)
        assert report.steps == 1 and math.isfinite(report.mean_loss)
    assert student.trainer.step == step0 + 4 and student.adapter_fingerprint() != fp
    assert kl() < before
    # the steps are in the budget table4 shows: KD steps, no local data (none was given), tokens
    spent = {k: v - budget0[k] for k, v in student.trainer.budget.as_dict().items()}
    assert spent == {"kd_steps": 4, "local_steps": 0, "tokens_trained": 4 * sum(len(e.input_ids) for e in examples),
                     "tokens_generated": 0}


def teacher_dists_logits(backend, example, vocab: int) -> torch.Tensor:  # noqa: ANN001
    batch = collate([example], backend.trainer.pad_id, "cpu")
    logits = backend.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[0, :-1][batch["labels"][0, 1:] != IGNORE][:, :vocab]


def test_answer_logprobs_is_minus_the_validation_loss_of_one_pair(same_vocab) -> None:  # noqa: ANN001
    backend = same_vocab[0].backend
    lp = answer_logprobs(backend, [*PAIRS, (PAIRS[0][0], "  \n")])
    for (p, c), score in zip(PAIRS, lp, strict=False):
        expected = -backend.trainer.validation_loss(encode_completions(backend, [(p, c)]))
        assert score == pytest.approx(expected, rel=1e-5)
    assert lp[-1] == -np.inf  # an empty answer is never a candidate


def test_consensus_picks_the_highest_mean_score() -> None:
    prompts = [("t/0", "p0"), ("t/1", "p1"), ("t/2", "p2")]
    pools = [["a", "b"], [], ["c", "d", "e"]]
    scores = [np.array([-1.0, -3.0, -2.0, -0.5, -np.inf]), np.array([-2.0, -0.5, -2.0, -4.0, -0.1])]
    # t/0: a=-1.5, b=-1.75 -> a; t/2: c=-2, d=-2.25, e=-0.1 (one scorer) -> e
    got = consensus_answers(prompts, pools, scores)
    assert [(a.task_id, a.text) for a in got] == [("t/0", "a"), ("t/2", "e")]


def test_one_round_on_three_clients(tmp_path: Path, cache: Path) -> None:
    clients = make_clients(tmp_path / "split", cache)
    method = CentralKD()
    method.setup(clients, {"top_k": 16}, tmp_path / "work")
    assert method.groups == [[0, 1], [2]]
    base = [c.backend.base_fingerprint() for c in clients]
    adapters = [c.backend.adapter_fingerprint() for c in clients]
    optim_steps = [c.backend.trainer.step for c in clients]

    steps = method.communicate(round_context(clients, tmp_path / "work", settings={"top_k": 16}))

    assert set(steps) == {0, 1, 2}
    for i, c in enumerate(clients):
        s = steps[i]
        assert s.role == "server_student" and s.partner == "server"
        assert s.kd_loss is not None and math.isfinite(s.kd_loss) and s.kd_loss > 0
        assert s.bytes_sent > 0 and s.bytes_received > 0
        assert c.backend.adapter_fingerprint() != adapters[i]
        assert c.backend.base_fingerprint() == base[i]
        assert c.backend.trainer.step > optim_steps[i]
        assert math.isfinite(c.backend.validation_loss())
    # the pair uploads top-k distributions on top of what the text-only client sends
    assert min(steps[0].bytes_sent, steps[1].bytes_sent) > steps[2].bytes_sent
    assert steps[0].bytes_received == steps[1].bytes_received > steps[2].bytes_received

    method.save(tmp_path / "state")
    resumed = CentralKD()
    resumed.setup(clients, {"top_k": 16}, tmp_path / "work")
    resumed.load(tmp_path / "state")
    assert resumed.groups == method.groups
    reordered = [Client(i, f"client-{i}", c.backend, c.seed) for i, c in enumerate(clients[::-1])]
    other = CentralKD()
    other.setup(reordered, {}, tmp_path / "work")
    with pytest.raises(ValueError, match="tokenizer groups"):
        other.load(tmp_path / "state")


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown central-kd settings"):
        CentralKD().setup([], {"topk": 3}, tmp_path)

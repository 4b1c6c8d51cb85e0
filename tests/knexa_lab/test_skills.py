"""The skills benchmark's problems and split: ground truth that holds by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knexa_lab.experiment.methods.oracle import skill_gain_scores
from knexa_lab.skills.problems import RULES, generate, public_corpus
from knexa_lab.skills.split import SplitSettings, make_skills_split, write_skills_split
from knexa_node.categories import classify_name, histogram
from knexa_node.data import load_node_data
from knexa_node.evaluation import execute_candidates
from protocol._layout import CATEGORIES

N = len(CATEGORIES)


@pytest.fixture(scope="module")
def split() -> object:
    return make_skills_split(SplitSettings(clients=8), seed=3)


def test_at_least_240_test_problems_over_every_category(split: object) -> None:
    assert len(split.test) >= 240
    assert {p["category"] for p in split.test} == set(CATEGORIES)


def test_every_prompt_lands_in_its_own_category(split: object) -> None:
    problems = [*split.test, *split.transfer, *split.probe, *(p for t, v in split.nodes for p in (*t, *v))]
    wrong = [(p["category"], classify_name(p["prompt"])) for p in problems if classify_name(p["prompt"]) != p["category"]]
    assert not wrong


def test_test_instances_are_disjoint_from_training_and_transfer(split: object) -> None:
    def names(problems: list[dict[str, str]]) -> set[str]:
        return {p["entry_point"] for p in problems}

    train = [p for t, _ in split.nodes for p in t]
    val = [p for _, v in split.nodes for p in v]
    test_names, test_prompts = names(split.test), {p["prompt"] for p in split.test}
    for other in (train, val, split.transfer, split.probe):
        assert not test_names & names(other)
        assert not test_prompts & {p["prompt"] for p in other}
    assert not names(split.probe) & (names(train) | names(split.transfer))


def test_reference_solutions_pass_and_wrong_rules_fail_in_the_sandbox() -> None:
    problems = generate({"test": [1] * N}, seed=5)["test"]
    right = execute_candidates(problems, [[p["canonical_solution"]] for p in problems], workers=2)
    # another category's rule, with this problem's argument name: every test must catch it
    wrong = [[RULES[CATEGORIES[(i + 1) % N]].body(p["canonical_solution"].split()[1])]
             for i, p in enumerate(problems)]
    assert all(r[0] for r in right)
    assert not any(r[0] for r in execute_candidates(problems, wrong, workers=2))


def test_rules_differ_on_the_tests_inputs() -> None:
    outputs = {tuple(rule.apply(x) for x in (0, 3, 10, 17, 26)) for rule in RULES.values()}
    assert len(outputs) == len(RULES)


def test_shards_are_non_iid_and_the_histogram_sees_it(split: object) -> None:
    for counts, (train, _) in zip(split.counts, split.nodes, strict=True):
        assert sum(counts) == len(train)
        hist = histogram(p["prompt"] for p in train)
        assert sum(c == 0 for c in counts) >= N // 3  # no data at all in many categories
        assert [round(h * len(train)) for h in hist] == counts
    assert len({tuple(c) for c in split.counts}) == len(split.counts)


def test_same_seed_same_split_other_seed_other_split() -> None:
    a, b = make_skills_split(SplitSettings(clients=3), 1), make_skills_split(SplitSettings(clients=3), 1)
    c = make_skills_split(SplitSettings(clients=3), 2)
    assert a == b and a.counts != c.counts


def test_written_split_is_what_a_node_reads(split: object, tmp_path: Path) -> None:
    write_skills_split(split, tmp_path)
    node = load_node_data(tmp_path / "node-2")
    assert len(node.train) == len(split.nodes[2][0]) and len(node.test) == len(split.test)
    assert (tmp_path / "oracle" / "probe.jsonl").is_file()
    assert not (tmp_path / "public" / "probe.jsonl").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["nodes"][2]["counts"] == split.counts[2]


def test_public_corpus_states_its_rule_and_favours_none() -> None:
    corpus = public_corpus(600, seed=0)
    assert all(" return " in c for _, c in corpus)
    private = {(r.op, r.k) for r in RULES.values()}
    ops = [tuple(c.split()[2:4]) for _, c in corpus]
    share = sum((op, int(k)) in private for op, k in ops) / len(ops)
    assert share < 0.4  # 12 of the 40 (op, digit) pairs, drawn uniformly


def test_oracle_scores_what_a_teacher_can_teach() -> None:
    import numpy as np

    skills = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    s = skill_gain_scores(skills)
    assert s[1, 0] == 2.0 and s[0, 1] == 1.0 and s[2, 1] == 1.0 and s[1, 2] == 1.0
    assert np.isneginf(np.diag(s)).all()

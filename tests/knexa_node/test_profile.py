"""The 32-dim profile: layout, documented feature table, sanitization invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from knexa_node.profile import (
    LOWER,
    PERF_FEATURES,
    SKILLS_SENSITIVITY,
    UPPER,
    PerfPoint,
    build_profile,
    family_of,
    laplace_sensitivity,
    sanitize_profile,
    sanitize_skills,
    skills_vector,
)
from protocol import (
    CATEGORIES,
    FAMILIES,
    FAMILY_SLICE,
    HIST_SLICE,
    PERF_SLICE,
    PROFILE_DIM,
    SKILLS_DIM,
    Profile,
)

HIST = np.arange(1.0, 13.0)
PEER = b"\x00\x24\x08\x01\x12\x20" + bytes(32)


@pytest.mark.parametrize(
    ("model_type", "family"),
    [("llama", "llama"), ("qwen2", "qwen"), ("Qwen", "qwen"), ("gpt_neox", "gpt_neox"),
     ("gpt-neox", "gpt_neox"), ("bloom", "bloom"), ("gpt2", "gpt2"), ("mistral", "mistral"),
     ("mixtral", "mistral"), ("phi", "phi"), ("phi3", "phi"), ("t5", "other"), ("", "other")],
)  # fmt: skip
def test_family_of(model_type: str, family: str) -> None:
    assert family_of(model_type) == family
    assert family in FAMILIES


def test_layout_and_feature_table() -> None:
    history = [PerfPoint(0.1, 0.3, 20.0), PerfPoint(0.2, 0.25, 10.0)]
    vec = build_profile("qwen", history, HIST)
    assert vec.shape == (PROFILE_DIM,) and vec.dtype == np.float64
    assert vec[FAMILY_SLICE].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    perf = dict(zip(PERF_FEATURES, vec[PERF_SLICE], strict=True))
    lppl = [math.log(20) / math.log(1000), math.log(10) / math.log(1000)]
    expected = {
        "pass1": 0.2, "codebleu": 0.25, "lppl": lppl[1],
        "d_pass1": 0.1, "d_codebleu": -0.05, "d_lppl": lppl[1] - lppl[0],
        "ema_pass1": 0.15, "ema_codebleu": 0.275, "ema_lppl": (lppl[0] + lppl[1]) / 2,
        "best_pass1": 0.2, "best_codebleu": 0.3, "best_lppl": lppl[1],
    }  # fmt: skip
    assert perf == pytest.approx(expected)
    assert vec[HIST_SLICE] == pytest.approx(HIST / HIST.sum())
    assert np.all(vec >= LOWER) and np.all(vec <= UPPER)


def test_empty_history_and_extreme_perplexity() -> None:
    perf = dict(zip(PERF_FEATURES, build_profile("other", [], HIST)[PERF_SLICE], strict=True))
    assert perf["pass1"] == 0 and perf["lppl"] == 1 and perf["d_lppl"] == 0 and perf["best_lppl"] == 1
    vec = build_profile("gpt2", [PerfPoint(0.0, 0.0, math.inf), PerfPoint(1.0, 1.0, 1.0)], HIST)
    perf = dict(zip(PERF_FEATURES, vec[PERF_SLICE], strict=True))
    assert perf["lppl"] == 0 and perf["d_lppl"] == -1 and perf["d_pass1"] == 1


def test_zero_histogram_is_uniform_and_bad_input_rejected() -> None:
    assert build_profile("bloom", [], np.zeros(12))[HIST_SLICE] == pytest.approx(np.full(12, 1 / 12))
    with pytest.raises(ValueError):
        build_profile("falcon", [], HIST)
    with pytest.raises(ValueError):
        build_profile("bloom", [], np.ones(11))
    with pytest.raises(ValueError):
        build_profile("bloom", [], -HIST)
    with pytest.raises(ValueError):
        build_profile("bloom", [], np.full(12, np.nan))


@pytest.mark.parametrize(
    "args", [(math.nan, 0.1, 2.0), (0.1, math.nan, 2.0), (0.1, 0.1, math.nan), (13.33, 0.1, 2.0),
             (0.1, -0.1, 2.0), (0.1, 0.1, 0.0)],
)  # fmt: skip
def test_perf_point_validates(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        PerfPoint(*args)


def test_nan_is_refused_with_a_clear_message() -> None:
    vec = build_profile("llama", [PerfPoint(0.5, 0.5, 5.0)], HIST)
    vec[10] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values at dims \[10\]"):
        sanitize_profile(vec)
    vec[10] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        sanitize_profile(vec)
    with pytest.raises(ValueError):
        sanitize_profile(np.zeros(31))
    with pytest.raises(ValueError):
        sanitize_profile(np.zeros(32), decimals=-1)
    with pytest.raises(ValueError):
        sanitize_profile(np.zeros(32), epsilon=0.0)


def test_sanitize_rounds_clips_and_keeps_the_histogram_a_distribution() -> None:
    vec = build_profile("phi", [PerfPoint(0.123456, 0.654321, 7.0)], np.array([1.0] * 3 + [0.0] * 9))
    vec[PERF_SLICE.start + 3] = -5.0  # out of range on purpose
    out = sanitize_profile(vec, decimals=2)
    assert out[PERF_SLICE.start] == 0.12 and out[PERF_SLICE.start + 1] == 0.65
    assert out[PERF_SLICE.start + 3] == -1.0
    assert out[HIST_SLICE].sum() == pytest.approx(1.0, abs=1e-12)
    assert sorted(out[HIST_SLICE][:3].tolist()) == [0.33, 0.33, 0.34]
    assert np.allclose(out * 100, np.round(out * 100), rtol=0, atol=1e-9)


def test_laplace_noise_is_seeded_bounded_and_scaled() -> None:
    vec = build_profile("mistral", [PerfPoint(0.5, 0.5, 5.0)], HIST)
    a = sanitize_profile(vec, epsilon=50.0, rng=np.random.default_rng(1))
    b = sanitize_profile(vec, epsilon=50.0, rng=np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sanitize_profile(vec))
    assert np.array_equal(a[FAMILY_SLICE], vec[FAMILY_SLICE])
    assert laplace_sensitivity() == 17.0
    noisy = np.stack([sanitize_profile(vec, epsilon=1e4, decimals=6, rng=np.random.default_rng(i))
                      for i in range(200)])  # fmt: skip
    spread = np.abs(noisy[:, PERF_SLICE.start] - vec[PERF_SLICE.start]).mean()
    assert spread == pytest.approx(17.0 / 1e4, rel=0.3)  # mean |Laplace(b)| = b


@given(
    arrays(np.float64, PROFILE_DIM, elements=st.floats(-1e6, 1e6, allow_nan=False)),
    st.integers(0, 4),
    st.one_of(st.none(), st.floats(0.01, 100.0)),
    st.integers(0, 2**32 - 1),
)
def test_sanitized_vector_is_always_sendable(vec: np.ndarray, decimals: int, eps, seed: int) -> None:
    out = sanitize_profile(vec, decimals=decimals, epsilon=eps, rng=np.random.default_rng(seed))
    assert out.shape == (PROFILE_DIM,) and np.all(np.isfinite(out))
    assert np.all(out >= LOWER) and np.all(out <= UPPER)
    assert sorted(out[FAMILY_SLICE].tolist()) == [0.0] * 7 + [1.0]
    assert out[HIST_SLICE].sum() == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(out * 10**decimals, np.round(out * 10**decimals))
    assert not np.any(np.signbit(out) & (out == 0))
    Profile(federation="test", round=1, node=PEER, vector=tuple(float(x) for x in out))


# ---- skills: per-category validation Pass@1 (optional, `share_skills`) ---------------------------


def test_skills_vector_is_in_category_order_and_absent_is_zero() -> None:
    vec = skills_vector({"geometry": 0.75, "strings": 0.5, "other": 1.0})
    assert vec.shape == (SKILLS_DIM,) == (12,) and vec.dtype == np.float64
    assert vec[CATEGORIES.index("strings")] == 0.5 and CATEGORIES.index("strings") == 0
    assert vec[CATEGORIES.index("geometry")] == 0.75 and vec[-1] == 1.0 and CATEGORIES[-1] == "other"
    assert np.count_nonzero(vec) == 3  # the nine categories without a validation problem are 0
    assert np.array_equal(skills_vector({}), np.zeros(12))
    full = skills_vector({c: i / 11 for i, c in enumerate(CATEGORIES)})
    assert np.allclose(full, np.arange(12) / 11)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01, 1.01])
def test_skills_vector_refuses_values_outside_zero_one(value: float) -> None:
    with pytest.raises(ValueError, match="lists"):
        skills_vector({"strings": 0.5, "lists": value})


def test_skills_vector_refuses_unknown_categories() -> None:
    with pytest.raises(ValueError, match="unknown categories"):
        skills_vector({"strings": 0.5, "poetry": 0.5})


def test_sanitize_skills_clips_rounds_and_refuses_nan() -> None:
    raw = np.array([0.123456, 0.5, 1.7, -0.3, 0.999, 0.0, 0.005, 0.994, 0.25, 0.33333, 0.66666, 1.0])
    out = sanitize_skills(raw, decimals=2)
    assert out.tolist() == [0.12, 0.5, 1.0, 0.0, 1.0, 0.0, 0.0, 0.99, 0.25, 0.33, 0.67, 1.0]
    assert not np.any(np.signbit(out))  # -0.3 clipped to 0, never -0.0
    assert sanitize_skills(raw, decimals=0).tolist() == [0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 1]
    bad = raw.copy()
    bad[4] = math.nan
    with pytest.raises(ValueError, match=r"non-finite values at dims \[4\]"):
        sanitize_skills(bad)
    with pytest.raises(ValueError, match="shape"):
        sanitize_skills(np.zeros(11))
    with pytest.raises(ValueError, match="epsilon"):
        sanitize_skills(np.zeros(12), epsilon=0.0)
    with pytest.raises(ValueError, match="decimals"):
        sanitize_skills(np.zeros(12), decimals=7)


def test_sanitize_skills_noise_is_seeded_bounded_and_scaled() -> None:
    raw = np.full(12, 0.5)
    a = sanitize_skills(raw, epsilon=50.0, rng=np.random.default_rng(1))
    assert np.array_equal(a, sanitize_skills(raw, epsilon=50.0, rng=np.random.default_rng(1)))
    assert not np.array_equal(a, sanitize_skills(raw))
    assert SKILLS_SENSITIVITY == 12.0
    # epsilon 1e3: scale 0.012, so clipping at 0 and 1 (0.5 away) never bites
    noisy = np.stack([sanitize_skills(raw, epsilon=1e3, decimals=6, rng=np.random.default_rng(i))
                      for i in range(300)])  # fmt: skip
    assert abs(np.abs(noisy - 0.5).mean() - 12.0 / 1e3) < 0.1 * 12.0 / 1e3  # mean |Laplace(b)| = b
    assert abs(np.median(noisy - 0.5)) < 0.002
    # heavy noise is clipped back into [0, 1] and rounded, -0.0 never leaves
    heavy = sanitize_skills(raw, epsilon=1.0, decimals=2, rng=np.random.default_rng(7))
    assert np.all((heavy >= 0) & (heavy <= 1)) and not np.any(np.signbit(heavy))
    assert {0.0, 1.0} <= set(heavy.tolist())  # scale 12: most values hit a bound


@given(
    arrays(np.float64, SKILLS_DIM, elements=st.floats(-1e6, 1e6, allow_nan=False)),
    st.integers(0, 4),
    st.one_of(st.none(), st.floats(0.01, 100.0)),
    st.integers(0, 2**32 - 1),
)
def test_sanitized_skills_are_always_sendable(vec: np.ndarray, decimals: int, eps, seed: int) -> None:
    out = sanitize_skills(vec, decimals=decimals, epsilon=eps, rng=np.random.default_rng(seed))
    assert out.shape == (SKILLS_DIM,) and np.all((out >= 0) & (out <= 1))
    assert np.allclose(out * 10**decimals, np.round(out * 10**decimals))
    assert not np.any(np.signbit(out) & (out == 0))
    vector = tuple(map(float, sanitize_profile(build_profile("qwen", [], HIST))))
    Profile("test", 1, PEER, vector, skills=tuple(map(float, out)))

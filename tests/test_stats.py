"""The one macro-F1 and the one bootstrap (transferlab.evaluation.stats, transferlab.core.resampling)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import f1_score

from transferlab.core.resampling import bootstrap_draws, percentile_interval
from transferlab.evaluation.stats import macro_f1, macro_f1_rows, paired_bootstrap_gain

KEYS = {"gain", "ci_low", "ci_high", "prob_gain_le_0", "seed_sd_a", "seed_sd_b"}


def _noisy_predictions(y: np.ndarray, accuracy: float, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    pred = y.copy()
    wrong = rng.random(len(y)) > accuracy
    pred[wrong] = (y[wrong] + rng.integers(1, n_classes, size=wrong.sum())) % n_classes
    return pred


def _sk_macro_f1(y: np.ndarray, p: np.ndarray, num_classes: int) -> float:
    """What evaluate@ reports: sklearn over all the task's classes."""
    return f1_score(y, p, average="macro", labels=np.arange(num_classes), zero_division=0)


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=300)
    return y, _noisy_predictions(y, 0.9, 4, rng), _noisy_predictions(y, 0.6, 4, rng)


# --------------------------------------------------------------------------------------------------
# macro F1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "num_classes"),
    [
        ([0, 1, 2, 2], [0, 2, 2, 1], 3),  # every class present
        ([0, 0, 2, 2], [0, 2, 2, 2], 3),  # class 1 in neither truth nor predictions: F1 0, still averaged
        ([0, 0, 1, 1], [0, 2, 1, 1], 3),  # class 2 predicted, never true
        ([0, 0, 1, 1], [0, 0, 0, 0], 3),  # class 1 true, never predicted; class 2 nowhere
        ([1, 1, 1], [1, 1, 1], 4),  # one class only, perfect on it
    ],
)
def test_macro_f1_is_sklearns_over_all_classes_with_missing_ones(y, p, num_classes):
    y, p = np.asarray(y), np.asarray(p)
    want = _sk_macro_f1(y, p, num_classes)
    assert macro_f1(y, p, num_classes) == pytest.approx(want, abs=1e-15)
    assert macro_f1_rows(y[None], p[None], num_classes)[0] == pytest.approx(want, abs=1e-15)


def test_macro_f1_rows_match_sklearn_on_random_resamples_with_absent_classes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = int(rng.integers(2, 12))
        n = int(rng.integers(1, 25))  # short rows: most miss some class
        y, p = rng.integers(0, c, (3, n)), rng.integers(0, c, (3, n))
        got = macro_f1_rows(y, p, c)
        want = [_sk_macro_f1(y[i], p[i], c) for i in range(3)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_macro_f1_defaults_to_the_classes_the_labels_hold_and_rejects_too_few():
    # Integer labels are class indices: C = largest + 1, even when a class in between appears nowhere.
    assert macro_f1([0, 2], [0, 2]) == pytest.approx(_sk_macro_f1(np.array([0, 2]), np.array([0, 2]), 3))
    want = f1_score(["cat", "dog"], ["cat", "cat"], average="macro")
    assert macro_f1(["cat", "dog"], ["cat", "cat"]) == pytest.approx(want)
    with pytest.raises(ValueError, match="num_classes=2"):
        macro_f1([0, 2], [0, 2], 2)


# --------------------------------------------------------------------------------------------------
# the resampling core
# --------------------------------------------------------------------------------------------------


def test_bootstrap_draws_follow_one_stream_in_axis_order_whatever_the_block():
    ref = np.random.default_rng(5)
    want = [(ref.integers(0, 7, 7), ref.integers(0, 3, 3)) for _ in range(11)]
    for block in (1, 4, 11, None):
        blocks = bootstrap_draws(11, (7, 3), seed=5, block=block)
        got = [(i, s) for idx, seeds in blocks for i, s in zip(idx, seeds, strict=True)]
        assert len(got) == 11
        for (gi, gs), (wi, ws) in zip(got, want, strict=True):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gs, ws)


def test_a_one_element_axis_leaves_the_other_draws_unchanged():
    """A model with one training seed: the sample draws are those of the samples-only bootstrap."""
    alone = np.concatenate([d[0] for d in bootstrap_draws(20, (9,), seed=3)])
    with_seeds = list(bootstrap_draws(20, (9, 1, 1), seed=3))
    np.testing.assert_array_equal(alone, np.concatenate([d[0] for d in with_seeds]))
    assert all((d[1] == 0).all() and (d[2] == 0).all() for d in with_seeds)


def test_bootstrap_draws_and_interval_reject_bad_arguments():
    with pytest.raises(ValueError, match="n_bootstrap"):
        next(bootstrap_draws(0, (3,), seed=0))
    with pytest.raises(ValueError, match="at least one element"):
        next(bootstrap_draws(5, (3, 0), seed=0))
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(np.arange(10.0), 1.0)
    low, high = percentile_interval(np.arange(101.0), 0.9)
    assert (low, high) == pytest.approx((5.0, 95.0))


# --------------------------------------------------------------------------------------------------
# the paired bootstrap of a gain
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_better_predictor_has_interval_above_zero(labels, metric):
    y, good, bad = labels
    res = paired_bootstrap_gain(y, good, bad, metric=metric, n_bootstrap=500)
    assert set(res) == KEYS
    assert res["gain"] > 0.2
    assert 0.0 < res["ci_low"] < res["gain"] < res["ci_high"]
    assert res["prob_gain_le_0"] == 0.0
    assert res["seed_sd_a"] == res["seed_sd_b"] == 0.0  # one seed each


def test_bootstrap_accuracy_gain_matches_full_set(labels):
    y, good, bad = labels
    res = paired_bootstrap_gain(y, good, bad, n_bootstrap=10)
    assert res["gain"] == pytest.approx(np.mean(good == y) - np.mean(bad == y))


def test_bootstrap_equally_good_predictors_interval_contains_zero():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=400)
    a = _noisy_predictions(y, 0.75, 3, rng)
    b = _noisy_predictions(y, 0.75, 3, rng)
    res = paired_bootstrap_gain(y, a, b, n_bootstrap=1000)
    assert res["ci_low"] < 0.0 < res["ci_high"]
    assert 0.05 < res["prob_gain_le_0"] < 0.95


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_identical_predictors_give_degenerate_zero_interval(labels, metric):
    y, good, _ = labels
    res = paired_bootstrap_gain(y, good, good.copy(), metric=metric, n_bootstrap=300)
    assert res["gain"] == 0.0
    assert res["ci_low"] == 0.0 and res["ci_high"] == 0.0
    assert res["prob_gain_le_0"] == 1.0


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_swapping_predictors_mirrors_the_result(labels, metric):
    y, good, bad = labels
    ab = paired_bootstrap_gain(y, good, bad, metric=metric, n_bootstrap=400, seed=3)
    ba = paired_bootstrap_gain(y, bad, good, metric=metric, n_bootstrap=400, seed=3)
    assert ba["gain"] == pytest.approx(-ab["gain"], abs=1e-12)
    assert ba["ci_low"] == pytest.approx(-ab["ci_high"], abs=1e-9)
    assert ba["ci_high"] == pytest.approx(-ab["ci_low"], abs=1e-9)
    assert ba["prob_gain_le_0"] == 1.0


def test_bootstrap_is_deterministic_per_seed(labels):
    y, good, bad = labels
    first = paired_bootstrap_gain(y, good, bad, metric="macro_f1", n_bootstrap=300, seed=7)
    again = paired_bootstrap_gain(y, good, bad, metric="macro_f1", n_bootstrap=300, seed=7)
    other = paired_bootstrap_gain(y, good, bad, metric="macro_f1", n_bootstrap=300, seed=8)
    assert first == again
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])


def test_bootstrap_macro_f1_gain_is_the_difference_of_evaluates_macro_f1():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, size=200)
    a = _noisy_predictions(y, 0.7, 5, rng)
    b = _noisy_predictions(y, 0.5, 5, rng)
    b[:7] = 9  # a class b predicts that never occurs in y_true: classes 0..9, 5..8 absent everywhere
    a[a == 4] = 3  # a never predicts class 4
    res = paired_bootstrap_gain(y, a, b, metric="macro_f1", n_bootstrap=20)
    assert res["gain"] == pytest.approx(_sk_macro_f1(y, a, 10) - _sk_macro_f1(y, b, 10), abs=1e-12)


def test_bootstrap_accepts_string_labels():
    y = np.array(["cat", "dog", "dog", "bird", "cat", "bird"])
    a = np.array(["cat", "dog", "dog", "bird", "cat", "cat"])
    b = np.array(["dog", "dog", "cat", "bird", "cat", "cat"])
    res = paired_bootstrap_gain(y, a, b, metric="macro_f1", n_bootstrap=50)
    expected = f1_score(y, a, average="macro") - f1_score(y, b, average="macro")
    assert res["gain"] == pytest.approx(expected)


def test_bootstrap_macro_f1_is_fast_enough():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, size=2000)
    a = np.stack([_noisy_predictions(y, 0.8, 10, rng) for _ in range(2)])
    b = np.stack([_noisy_predictions(y, 0.7, 10, rng) for _ in range(2)])
    start = time.perf_counter()
    res = paired_bootstrap_gain(y, a, b, metric="macro_f1", n_bootstrap=2000)
    assert time.perf_counter() - start < 10.0  # about a second on a laptop; generous for CI
    assert res["ci_low"] > 0.0


def test_bootstrap_resampled_macro_f1_matches_sklearn_per_resample_with_missing_classes():
    """Each resampled gain equals evaluate@'s macro F1 (sklearn over all classes) on that resample, also when a
    rare class drops out of it (same stream: one index row per replicate)."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, size=30)
    y[:2] = 4  # a rare class: absent from many resamples
    a = _noisy_predictions(y, 0.7, 5, rng)
    b = _noisy_predictions(y, 0.5, 5, rng)
    idx = np.random.default_rng(9).integers(0, 30, size=(40, 30))
    assert any(4 not in y[i] for i in idx)
    gains = np.array([_sk_macro_f1(y[i], a[i], 5) - _sk_macro_f1(y[i], b[i], 5) for i in idx])
    res = paired_bootstrap_gain(y, a, b, metric="macro_f1", n_bootstrap=40, confidence=0.9, seed=9)
    assert res["ci_low"] == pytest.approx(np.quantile(gains, 0.05), abs=1e-12)
    assert res["ci_high"] == pytest.approx(np.quantile(gains, 0.95), abs=1e-12)
    assert res["prob_gain_le_0"] == pytest.approx(np.mean(gains <= 0))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_seed_and_sample_bootstrap_matches_a_brute_force_loop(metric):
    """Replicate by replicate: samples, then A's seeds, then B's seeds, from one generator; a model's replicate
    metric is its mean over the drawn seeds (accuracy: over all drawn seed-sample pairs)."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 120)
    a = np.stack([np.where(rng.random(120) < p, y, (y + 1) % 4) for p in (0.55, 0.85, 0.7)])
    b = np.stack([np.where(rng.random(120) < 0.6, y, (y + 2) % 4) for _ in range(2)])
    out = paired_bootstrap_gain(y, a, b, metric=metric, n_bootstrap=200, confidence=0.9, seed=7)

    def score(p, idx):
        return (p[idx] == y[idx]).mean() if metric == "accuracy" else _sk_macro_f1(y[idx], p[idx], 4)

    draws = np.random.default_rng(7)
    gains = []
    for _ in range(200):
        idx = draws.integers(0, 120, 120)
        sa, sb = draws.integers(0, 3, 3), draws.integers(0, 2, 2)
        gains.append(np.mean([score(a[k], idx) for k in sa]) - np.mean([score(b[k], idx) for k in sb]))
    lo, hi = np.quantile(gains, [0.05, 0.95])
    assert out["ci_low"] == pytest.approx(lo, abs=1e-12) and out["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert out["prob_gain_le_0"] == pytest.approx(np.mean(np.asarray(gains) <= 0))
    every = np.arange(120)
    per_a, per_b = [score(p, every) for p in a], [score(p, every) for p in b]
    assert out["gain"] == pytest.approx(np.mean(per_a) - np.mean(per_b), abs=1e-12)
    assert out["seed_sd_a"] == pytest.approx(np.std(per_a, ddof=1)) and out["seed_sd_b"] > 0


def test_fixed_seeds_average_every_seed_in_every_replicate():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, 200)
    a = np.stack([np.where(rng.random(200) < p, y, (y + 1) % 3) for p in (0.5, 0.95)])
    b = np.where(rng.random(200) < 0.6, y, (y + 1) % 3)
    resampled = paired_bootstrap_gain(y, a, b, n_bootstrap=400, seed=1)
    fixed = paired_bootstrap_gain(y, a, b, n_bootstrap=400, seed=1, resample_seeds=False)
    assert fixed["gain"] == resampled["gain"]
    # The seed-to-seed spread of A widens the interval only when seeds are resampled.
    assert fixed["ci_high"] - fixed["ci_low"] < resampled["ci_high"] - resampled["ci_low"]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([0, 1, 1], [0, 1], [0, 1, 1]), {}, "same length"),
        (([0, 1, 1], np.zeros((2, 2, 3), int), [0, 1, 1]), {}, "pred_a"),
        (([], [], []), {}, "empty"),
        (([0.0, np.nan], [0.0, 1.0], [0.0, 1.0]), {}, "NaN"),
        (([0, 1], [0, 1], [0, 1]), {"metric": "auc"}, "metric"),
        (([0, 1], [0, 1], [0, 1]), {"n_bootstrap": 0}, "n_bootstrap"),
        (([0, 1], [0, 1], [0, 1]), {"confidence": 1.5}, "confidence"),
        ((np.zeros((2, 2)), [0, 1], [0, 1]), {}, "1-D"),
        ((np.array(["a", 1], dtype=object), [0, 1], [0, 1]), {}, "cannot be compared"),
    ],
)
def test_bootstrap_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_gain(*args, **{"n_bootstrap": 10, **kwargs})

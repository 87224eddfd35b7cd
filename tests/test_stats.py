"""The one macro-F1 and the one interval of a gain (transferlab.evaluation.stats, transferlab.core.resampling).

Coverage of the interval (does a nominal 95% interval contain the true gain 95% of the time?) is simulated in
tests/test_coverage.py; here: reference values, the seed term's arithmetic and the contracts callers rely on."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import f1_score

from transferlab.core.resampling import bootstrap_draws, percentile_interval
from transferlab.evaluation.stats import (
    INTERVAL_METHOD,
    INTERVAL_METHODS,
    macro_f1,
    macro_f1_rows,
    paired_bootstrap_gain,
    seed_component,
    widened_interval,
)

OLD_KEYS = {"gain", "ci_low", "ci_high", "prob_gain_le_0", "seed_sd_a", "seed_sd_b"}
KEYS = OLD_KEYS | {"bootstrap_se", "seed_se", "seed_df", "seeds_a", "seeds_b", "covers_seed_variance"}


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
    """The old method, "seed_bootstrap": replicate by replicate, samples, then A's seeds, then B's seeds, from one
    generator; a model's replicate metric is its mean over the drawn seeds (accuracy: over all drawn seed-sample
    pairs)."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 120)
    a = np.stack([np.where(rng.random(120) < p, y, (y + 1) % 4) for p in (0.55, 0.85, 0.7)])
    b = np.stack([np.where(rng.random(120) < 0.6, y, (y + 2) % 4) for _ in range(2)])
    out = paired_bootstrap_gain(
        y, a, b, metric=metric, n_bootstrap=200, confidence=0.9, seed=7, method="seed_bootstrap"
    )

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


# --------------------------------------------------------------------------------------------------
# the seed term (method "seed_t", the default)
# --------------------------------------------------------------------------------------------------


def _seeds(y: np.ndarray, accuracies: tuple[float, ...], n_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([_noisy_predictions(y, acc, n_classes, rng) for acc in accuracies])


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_without_seed_spread_the_interval_is_the_paired_sample_bootstrap(metric):
    """Reference: 5 seeds per model with identical predictions (zero seed variance): exactly the one-seed paired
    test-sample bootstrap, same draws, same interval; and the seed variance is covered (estimated: 0)."""
    rng = np.random.default_rng(11)
    y = rng.integers(0, 4, 250)
    a, b = _noisy_predictions(y, 0.8, 4, rng), _noisy_predictions(y, 0.65, 4, rng)
    many = paired_bootstrap_gain(y, np.tile(a, (5, 1)), np.tile(b, (5, 1)), metric=metric, n_bootstrap=300, seed=4)
    one = paired_bootstrap_gain(y, a, b, metric=metric, n_bootstrap=300, seed=4)
    for k in ("gain", "ci_low", "ci_high", "prob_gain_le_0", "bootstrap_se"):
        assert many[k] == pytest.approx(one[k], abs=1e-12), k
    assert many["seed_se"] == 0.0 and many["seed_df"] == 8.0  # pooled 4 + 4: undefined, unused
    assert many["covers_seed_variance"] and not one["covers_seed_variance"]
    assert (many["seeds_a"], many["seeds_b"], one["seeds_a"]) == (5, 5, 1)


def test_without_sample_noise_the_interval_is_welchs_t_interval():
    """Reference: every test sample carries the same seed-averaged gain (0.5), so the test-sample bootstrap has no
    spread and the interval is Welch's: gain +- t(0.975, df) * sqrt(s_a^2/k_a + s_b^2/k_b), df = 2 here."""
    y = np.zeros(40, dtype=int)
    half = np.r_[np.zeros(20, int), np.ones(20, int)]  # right on the first half
    a = np.stack([np.zeros(40, int), half])  # seed accuracies 1.0 and 0.5
    b = np.stack([half, np.ones(40, int)])  # 0.5 and 0.0
    out = paired_bootstrap_gain(y, a, b, n_bootstrap=200, describe=True)
    se = math.sqrt(0.125 / 2 + 0.125 / 2)
    assert (out["gain"], out["seed_se"], out["seed_df"]) == pytest.approx((0.5, se, 2.0))
    half_width = sps.t.ppf(0.975, 2.0) * se
    assert out["ci_low"] == pytest.approx(0.5 - half_width, abs=1e-9)
    assert out["ci_high"] == pytest.approx(0.5 + half_width, abs=1e-9)
    assert out["prob_gain_le_0"] == pytest.approx(sps.t.cdf(-0.5 / se, 2.0), abs=1e-9)
    assert out["bootstrap_se"] < 1e-12
    assert out["seed_variance"] == "estimated from 2 and 2 seeds (Student t, 2.00 Welch df)"


def test_seed_component_is_welch_satterthwaite():
    per_a, per_b = np.array([0.80, 0.84, 0.83]), np.array([0.70, 0.71])
    va, vb = np.var(per_a, ddof=1) / 3, np.var(per_b, ddof=1) / 2
    se, df = seed_component(per_a, per_b)
    assert se == pytest.approx(math.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 1))
    assert min(2, 1) <= df <= 2 + 1  # Welch's df lies between the smaller side's and the pooled df
    # A side with one seed adds nothing (its variance is not estimable); none with two: no seed term at all.
    assert seed_component(per_a, per_b[:1]) == pytest.approx((math.sqrt(va), 2.0))
    assert seed_component(per_a[:1], per_b[:1]) == (0.0, 0.0)
    assert seed_component(np.full(3, 0.8), np.full(2, 0.7)) == (0.0, 3.0)


def test_widened_interval_reference_values():
    """A degenerate bootstrap (every replicate g0) plus the t term is a scaled t: its quantiles are exact; with no
    seed term the interval is the bootstrap's percentile interval, replicate for replicate."""
    low, high, prob = widened_interval(np.full(50, 0.03), 0.01, 1.7, 0.9)
    assert low == pytest.approx(0.03 + 0.01 * sps.t.ppf(0.05, 1.7), abs=1e-11)
    assert high == pytest.approx(0.03 + 0.01 * sps.t.ppf(0.95, 1.7), abs=1e-11)
    assert prob == pytest.approx(sps.t.cdf(-3.0, 1.7))
    g = np.random.default_rng(0).normal(0.02, 0.01, 400)
    assert widened_interval(g, 0.0, 0.0, 0.95) == (*percentile_interval(g, 0.95), float((g <= 0).mean()))
    # Monotone in the seed term, and never inside the bootstrap's own interval.
    widths = [np.subtract(*widened_interval(g, se, 2.0, 0.95)[1::-1]) for se in (0.0, 1e-4, 0.005, 0.02)]
    assert all(w1 <= w2 for w1, w2 in zip(widths, widths[1:], strict=False)) and widths[-1] > 3 * widths[0]


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_the_seed_term_only_widens_the_test_sample_interval(metric):
    """Never narrower than the data allow: the interval contains the test-sample interval of the same seeds."""
    rng = np.random.default_rng(12)
    y = rng.integers(0, 5, 300)
    for trial in range(4):
        a = _seeds(y, (0.70, 0.78, 0.74)[: 2 + trial % 2], 5, trial)
        b = _seeds(y, (0.66, 0.69), 5, 10 + trial)
        new = paired_bootstrap_gain(y, a, b, metric=metric, n_bootstrap=200, seed=trial)
        fixed = paired_bootstrap_gain(y, a, b, metric=metric, n_bootstrap=200, seed=trial, resample_seeds=False)
        assert new["ci_low"] <= fixed["ci_low"] and fixed["ci_high"] <= new["ci_high"]
        assert new["seed_se"] > 0 and fixed["seed_se"] == 0.0 and not fixed["covers_seed_variance"]


def test_one_seed_says_the_seed_variance_is_not_estimable():
    rng = np.random.default_rng(13)
    y = rng.integers(0, 3, 200)
    a, b = _seeds(y, (0.7, 0.8, 0.75), 3, 1), _seeds(y, (0.6,), 3, 2)
    both = paired_bootstrap_gain(y, a[:1], b, n_bootstrap=200, describe=True)
    assert not both["covers_seed_variance"] and both["seed_se"] == 0.0
    assert both["seed_variance"] == "not estimable (1 seed per model): the interval covers test samples only"
    samples_only = paired_bootstrap_gain(y, a[:1], b, n_bootstrap=200, resample_seeds=False)
    assert (both["ci_low"], both["ci_high"]) == (samples_only["ci_low"], samples_only["ci_high"])
    # A's three seeds still widen the interval with A's spread (2 df); B's is missing and the result says so.
    mixed = paired_bootstrap_gain(y, a, b, n_bootstrap=200, describe=True)
    assert not mixed["covers_seed_variance"]
    assert mixed["seed_df"] == 2.0 and mixed["seed_se"] == pytest.approx(mixed["seed_sd_a"] / math.sqrt(3))
    assert mixed["seed_variance"].startswith("not estimable for B (1 seed)")


def test_default_result_is_numbers_and_describe_adds_the_words():
    """Callers that round every value (``round(float(v), 6)``) keep working; the strings are opt-in."""
    rng = np.random.default_rng(14)
    y = rng.integers(0, 3, 150)
    a, b = _seeds(y, (0.7, 0.8), 3, 1), _seeds(y, (0.6, 0.62), 3, 2)
    out = paired_bootstrap_gain(y, a, b, n_bootstrap=100)
    assert set(out) == KEYS and {k: round(float(v), 6) for k, v in out.items()}
    described = paired_bootstrap_gain(y, a, b, n_bootstrap=100, describe=True)
    assert set(described) == KEYS | {"method", "seed_variance"}
    assert described["method"] == INTERVAL_METHOD == INTERVAL_METHODS["seed_t"] and "\n" not in INTERVAL_METHOD
    assert {k: described[k] for k in KEYS} == out
    old = paired_bootstrap_gain(y, a, b, n_bootstrap=100, method="seed_bootstrap", describe=True)
    assert old["method"] == INTERVAL_METHODS["seed_bootstrap"] and old["seed_se"] == 0.0
    assert old["gain"] == out["gain"] and old["seed_variance"] == "resampled (2 and 2 seeds with replacement)"


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
        (([0, 1], [0, 1], [0, 1]), {"method": "bca"}, "seed_bootstrap"),
        ((np.zeros((2, 2)), [0, 1], [0, 1]), {}, "1-D"),
        ((np.array(["a", 1], dtype=object), [0, 1], [0, 1]), {}, "cannot be compared"),
    ],
)
def test_bootstrap_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_gain(*args, **{"n_bootstrap": 10, **kwargs})

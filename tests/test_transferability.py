"""Tests for transferlab.transferability: hand-computed values, invariants, input validation, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.transferability import (
    ESTIMATORS,
    Estimator,
    get_estimator,
    hscore,
    hscore_shrinkage,
    knn_accuracy,
    leep,
    linear_probe_accuracy,
    logme,
    nce,
    register_estimator,
    score_all,
)

FEATURE_ESTIMATORS = sorted(n for n, e in ESTIMATORS.items() if e.needs == "features")
LOGIT_ESTIMATORS = sorted(n for n, e in ESTIMATORS.items() if e.needs == "logits")


def blobs(dist: float, n: int = 90, d: int = 5, n_classes: int = 3, seed: int = 0):
    """Unit-variance gaussian blobs whose centres lie at distance ``dist`` from the origin."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return rng.normal(size=(n, d)) + dist * centres[y], y


def sample_inputs(name: str, seed: int = 0):
    """(input array, labels) suited to estimator ``name``: features or source logits."""
    x, y = blobs(2.0, n=60, seed=seed)
    if ESTIMATORS[name].needs == "logits":
        rng = np.random.default_rng(seed + 100)
        x = rng.normal(size=(60, 4)) + 2.0 * np.eye(4)[y]  # source classes 0..2 track the labels
    return x, y


# ------------------------------------------------------------------------------ hand-computed values


def test_nce_hand_computed():
    # Source argmax z = [0, 0, 0, 1], target y = [0, 0, 1, 1].
    # P(y,z): (0,0) = 2/4, (1,0) = 1/4, (1,1) = 1/4; P(z=0) = 3/4, P(z=1) = 1/4.
    # P(y|z): P(0|0) = 2/3, P(1|0) = 1/3, P(1|1) = 1.
    # NCE = sum P(y,z) log P(y|z) = 1/2 log(2/3) + 1/4 log(1/3) + 1/4 log(1) ~= -0.4774.
    logits = np.array([[3.0, 1.0], [2.0, -1.0], [0.5, 0.1], [0.0, 4.0]])
    y = np.array([0, 0, 1, 1])
    expected = 0.5 * math.log(2 / 3) + 0.25 * math.log(1 / 3)
    assert nce(logits, y, seed=0) == pytest.approx(expected, abs=1e-12)


def test_leep_hand_computed():
    # theta (source probabilities) rows: [.8 .2], [.6 .4], [.3 .7], [.1 .9]; y = [0, 0, 1, 1].
    # Joint P(y,z) = 1/4 sum_i theta_iz [y_i = y]:
    #   y=0: z0 = (.8+.6)/4 = .35, z1 = (.2+.4)/4 = .15;  y=1: z0 = (.3+.1)/4 = .10, z1 = (.7+.9)/4 = .40.
    # P(z0) = .45, P(z1) = .55 -> P(0|z0) = 7/9, P(0|z1) = 3/11, P(1|z0) = 2/9, P(1|z1) = 8/11.
    # EEP: x1 = .8*7/9 + .2*3/11 = 67/99;  x2 = .6*7/9 + .4*3/11 = 57/99;
    #      x3 = .3*2/9 + .7*8/11 = 57/99;  x4 = .1*2/9 + .9*8/11 = 67/99.
    # LEEP = mean log EEP = (log(67/99) + log(57/99)) / 2 ~= -0.4708.
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    logits = np.log(probs) + 5.0  # softmax(log p + c) = p
    y = np.array([0, 0, 1, 1])
    expected = (math.log(67 / 99) + math.log(57 / 99)) / 2
    assert leep(logits, y, seed=0) == pytest.approx(expected, abs=1e-12)


def test_hscore_hand_computed_1d():
    # f = [0, 2, 4, 6], y = [0, 0, 1, 1]. Centred f = [-3, -1, 1, 3]: cov(f) = 20/n.
    # E[f|y] per sample = [1, 1, 5, 5], centred [-2, -2, 2, 2]: cov = 16/n. H = (16/n) / (20/n) = 0.8.
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    y = np.array([0, 0, 1, 1])
    assert hscore(f, y, seed=0) == pytest.approx(0.8, abs=1e-12)
    # In 1-D the Ledoit-Wolf target (mean variance times I) equals the sample covariance, so the shrinkage
    # H-score is bounded by the plain one and equal to it when no shrinkage is applied.
    shrunk = hscore_shrinkage(f, y, seed=0)
    assert 0.0 <= shrunk <= 0.8 + 1e-12


def test_hscore_shrinkage_equals_hscore_without_shrinkage_on_many_samples():
    # With n >> d and well-conditioned features Ledoit-Wolf shrinks very little: both scores nearly agree.
    x, y = blobs(3.0, n=4000, d=3, seed=1)
    plain, shrunk = hscore(x, y, seed=0), hscore_shrinkage(x, y, seed=0)
    assert shrunk <= plain + 1e-9
    assert shrunk == pytest.approx(plain, rel=0.02)


# -------------------------------------------------------------------------------------- invariants


def test_nce_is_zero_when_labels_are_a_function_of_source_argmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 6))
    z = logits.argmax(axis=1)
    mapping = np.array([0, 1, 1, 2, 0, 2])  # many-to-one: labels are a deterministic function of z
    y = mapping[z]
    assert nce(logits, y, seed=0) == pytest.approx(0.0, abs=1e-12)
    # ...and strictly negative once that relationship is broken.
    y_noisy = y.copy()
    y_noisy[:10] = (y_noisy[:10] + 1) % 3
    assert nce(logits, y_noisy, seed=0) < -1e-3


def test_leep_approaches_zero_for_one_hot_source_and_deterministic_labels():
    rng = np.random.default_rng(4)
    z = rng.integers(0, 5, size=40)
    z[:5] = np.arange(5)
    mapping = np.array([1, 0, 2, 2, 1])
    y = mapping[z]
    soft = leep(3.0 * np.eye(5)[z], y, seed=0)
    sharp = leep(40.0 * np.eye(5)[z], y, seed=0)
    assert soft < sharp <= 0.0
    assert sharp > -1e-9


def test_leep_and_nce_are_nonpositive_on_random_inputs():
    rng = np.random.default_rng(5)
    logits, y = rng.normal(size=(30, 4)), rng.integers(0, 3, size=30)
    assert leep(logits, y, seed=0) < 0.0
    assert nce(logits, y, seed=0) < 0.0


PERMUTATION_INVARIANT = ["logme", "hscore", "hscore_shrinkage", "knn_accuracy", "linear_probe_accuracy"]


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_invariant_to_permuting_feature_dimensions(name):
    x, y = blobs(1.5, n=60, d=6, seed=2)
    perm = np.random.default_rng(0).permutation(x.shape[1])
    fn = get_estimator(name).fn
    assert fn(x[:, perm], y, seed=7) == pytest.approx(fn(x, y, seed=7), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_invariant_to_relabelling_classes(name):
    x, y = sample_inputs(name, seed=1)
    relabel = np.array([2, 0, 1])  # class 0 -> 2, 1 -> 0, 2 -> 1
    fn = get_estimator(name).fn
    assert fn(x, relabel[y], seed=7) == pytest.approx(fn(x, y, seed=7), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["logme", "hscore"])
def test_rises_with_class_separation(name):
    fn = get_estimator(name).fn
    scores = [fn(*blobs(dist, seed=0), seed=0) for dist in (0.0, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores


def test_linear_probe_near_perfect_on_separated_blobs_and_chance_on_random_labels():
    x, y = blobs(12.0, n=90, seed=0)
    assert linear_probe_accuracy(x, y, seed=0) >= 0.98
    rng = np.random.default_rng(6)
    x_rand, y_rand = rng.normal(size=(200, 5)), rng.integers(0, 4, size=200)
    assert abs(linear_probe_accuracy(x_rand, y_rand, seed=0) - 0.25) < 0.12


def test_knn_near_perfect_on_separated_blobs_and_chance_on_random_labels():
    x, y = blobs(12.0, n=90, seed=0)
    assert knn_accuracy(x, y, seed=0) >= 0.98
    rng = np.random.default_rng(6)
    x_rand, y_rand = rng.normal(size=(200, 5)), rng.integers(0, 4, size=200)
    assert abs(knn_accuracy(x_rand, y_rand, seed=0) - 0.25) < 0.12


def test_knn_hand_computed_leave_one_out():
    # 1-D points; k=1 leave-one-out: each point takes its nearest other point's label.
    # x: 0, 1 (class 0) | 10, 11 (class 1) | 5.4 (class 0; nearest other point is 1 at distance 4.4 vs 4.6)
    # Neighbours: 0<-1, 1<-0, 10<-11, 11<-10, 5.4<-1, all labels agree: accuracy 1.0.
    # Flip the last label to class 1: it is then misclassified (its neighbour 1 is class 0): 4/5.
    x = np.array([[0.0], [1.0], [10.0], [11.0], [5.4]])
    assert knn_accuracy(x, np.array([0, 0, 1, 1, 0]), seed=0, k=1) == pytest.approx(1.0)
    assert knn_accuracy(x, np.array([0, 0, 1, 1, 1]), seed=0, k=1) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------ bad input


def _bad_inputs():
    x, y = blobs(2.0, n=20, seed=0)
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    x_inf = x.copy()
    x_inf[5, 0] = np.inf
    return {
        "nan": (x_nan, y, "finite"),
        "inf": (x_inf, y, "finite"),
        "one_class": (x, np.zeros(20, dtype=int), "at least 2 classes"),
        "length_mismatch": (x, y[:-1], "length mismatch"),
        "features_1d": (x[:, 0], y, "2-D"),
        "labels_2d": (x, y[:, None], "1-D"),
        "float_labels": (x, y + 0.5, "integer"),
        "empty": (np.zeros((0, 3)), np.zeros(0, dtype=int), "non-empty"),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_bad_input_raises_helpful_value_error(name, case):
    x, y, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        get_estimator(name).fn(x, y, seed=0)


def test_nan_message_points_at_the_row():
    x, y, _ = _bad_inputs()["nan"]
    with pytest.raises(ValueError, match=r"1 NaN/inf value\(s\) in 1 row\(s\), first at row 3"):
        logme(x, y, seed=0)


def test_score_all_validates_logits_too():
    x, y = blobs(2.0, n=20, seed=0)
    with pytest.raises(ValueError, match="source logits.*length mismatch|length mismatch.*source logits"):
        score_all(x, y, np.zeros((19, 3)), seed=0)


def test_unknown_estimator_lists_sorted_valid_names():
    with pytest.raises(KeyError) as info:
        get_estimator("logmee")
    message = str(info.value)
    assert "logmee" in message
    assert ", ".join(sorted(ESTIMATORS)) in message
    with pytest.raises(KeyError, match="valid names"):
        score_all(*blobs(1.0, n=20), None, seed=0, names=["logme", "nope"])


def test_register_estimator_rejects_bad_needs_and_duplicates():
    with pytest.raises(ValueError, match="needs must be one of"):
        register_estimator("test_only_bad_needs", needs="pixels", paper="x")
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("logme", needs="features", paper="x")
    assert "test_only_bad_needs" not in ESTIMATORS


# ------------------------------------------------------------------------------- registry, table


def test_registry_contents():
    assert set(ESTIMATORS) == {
        "logme",
        "leep",
        "nce",
        "hscore",
        "hscore_shrinkage",
        "knn_accuracy",
        "linear_probe_accuracy",
    }
    assert LOGIT_ESTIMATORS == ["leep", "nce"]
    for name, est in ESTIMATORS.items():
        assert isinstance(est, Estimator)
        assert est.name == name
        assert est.paper
        assert est.higher_is_better
        assert est.fn.__doc__ and "Raises" in est.fn.__doc__
    assert get_estimator("logme").fn is logme


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_finite_and_deterministic(name):
    x, y = sample_inputs(name, seed=3)
    fn = get_estimator(name).fn
    first, second = fn(x, y, seed=11), fn(x.copy(), y.copy(), seed=11)
    assert isinstance(first, float)
    assert math.isfinite(first)
    assert first == second


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_copes_with_a_singleton_class_and_float32(name):
    x, y = sample_inputs(name, seed=4)
    y = y.copy()
    y[0] = 3  # class 3 has a single sample
    value = get_estimator(name).fn(x.astype(np.float32), y, seed=0)
    assert math.isfinite(value)


@pytest.mark.parametrize("name", FEATURE_ESTIMATORS)
def test_feature_estimators_cope_with_more_dims_than_samples_and_constant_columns(name):
    rng = np.random.default_rng(8)
    y = np.arange(12) % 2
    x = rng.normal(size=(12, 40)) + 2.0 * y[:, None]
    x[:, 5] = 3.0  # a constant column
    assert math.isfinite(get_estimator(name).fn(x, y, seed=0))


def test_score_all_runs_everything_and_skips_logit_estimators_without_logits():
    x, y = blobs(2.0, n=60, seed=0)
    logits = np.random.default_rng(0).normal(size=(60, 4))
    without = score_all(x, y, None, seed=0)
    assert list(without) == sorted(ESTIMATORS)
    assert all(without[n] is None for n in LOGIT_ESTIMATORS)
    assert all(isinstance(without[n], float) for n in FEATURE_ESTIMATORS)
    with_logits = score_all(x, y, logits, seed=0)
    assert with_logits["nce"] == nce(logits, y, seed=0)
    assert with_logits["logme"] == without["logme"]
    subset = score_all(x, y, logits, seed=0, names=["nce", "hscore"])
    assert list(subset) == ["nce", "hscore"]


def _exact_log_evidence(f: np.ndarray, t: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """log N(t; 0, beta^-1 I + alpha^-1 F F^T): the marginal likelihood LogME maximises, computed directly."""
    n = f.shape[0]
    cov = np.exp(-log_beta) * np.eye(n) + np.exp(-log_alpha) * f @ f.T
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + t @ np.linalg.solve(cov, t)))


@pytest.mark.parametrize(("n", "d"), [(40, 4), (12, 20)])  # full rank, and more dims than samples
def test_logme_matches_directly_maximised_marginal_likelihood(n, d):
    from scipy.optimize import minimize

    x, y = blobs(1.5, n=n, d=d, n_classes=2, seed=5)
    per_class = []
    for c in range(2):
        t = (y == c).astype(float)
        res = minimize(
            lambda p, t=t: -_exact_log_evidence(x, t, p[0], p[1]),
            x0=np.zeros(2),
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000},
        )
        per_class.append(-res.fun / len(y))
    assert logme(x, y, seed=0) == pytest.approx(np.mean(per_class), abs=1e-6)


def test_leep_softmax_is_stable_for_huge_logits():
    rng = np.random.default_rng(9)
    logits, y = rng.normal(size=(30, 4)), rng.integers(0, 3, size=30)
    reference = leep(logits, y, seed=0)
    assert leep(logits + 1e4, y, seed=0) == pytest.approx(reference, abs=1e-9)
    assert math.isfinite(leep(1e3 * logits, y, seed=0))


@pytest.mark.parametrize("name", ["knn_accuracy", "linear_probe_accuracy"])
def test_accuracies_use_standardized_features(name):
    x, y = blobs(3.0, n=60, d=4, seed=6)
    scale = np.array([1e4, 1e-3, 1.0, 50.0])
    fn = get_estimator(name).fn
    assert fn(x * scale + 7.0, y, seed=0) == pytest.approx(fn(x, y, seed=0))

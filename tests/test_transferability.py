"""Tests for transferlab.transferability: hand-computed values, invariants, input validation, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferlab.scoring.estimators import (
    ESTIMATORS,
    Estimator,
    UndefinedEstimate,
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
    score_all_with_reasons,
    sfda,
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


def test_hscore_matches_the_pseudo_inverse_definition():
    # The SVD form ||M U||^2 must equal tr(pinv(cov f) cov(E[f|y])) computed directly, on correlated features.
    rng = np.random.default_rng(11)
    x, y = blobs(1.0, n=50, d=4, seed=3)
    x = x @ rng.normal(size=(4, 4))
    f = x - x.mean(axis=0)
    g = np.stack([f[y == c].mean(axis=0) for c in range(3)])[y]
    expected = np.trace(np.linalg.pinv(f.T @ f / 50) @ (g.T @ g / 50))
    assert hscore(x, y, seed=0) == pytest.approx(expected, rel=1e-10)


def test_hscore_is_null_with_a_reason_when_the_features_span_every_labelling():
    # Gaussian noise with d > n: rank(centred features) = n - 1, so H-score would be C - 1 = 9 whatever the
    # features are. The estimator refuses, and score_all reports a null with the reason.
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(200, 400)), np.arange(200) % 10
    with pytest.raises(UndefinedEstimate, match=r"rank\(features\)=199 >= n-1=199.*saturates at C-1=9"):
        hscore(x, y, seed=0)
    values, reasons = score_all_with_reasons(x, y, None, seed=0, names=["hscore", "logme"])
    assert values["hscore"] is None and "saturates" in reasons["hscore"]
    assert isinstance(values["logme"], float) and "logme" not in reasons
    # A low-dimensional informative case still gives a number, far from the saturation value.
    x_low, y_low = blobs(2.0, n=200, d=5, n_classes=10, seed=1)
    value = hscore(x_low, y_low, seed=0)
    assert math.isfinite(value) and 0.0 < value < 5.0


def _ledoit_wolf_hscore_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Shrinkage H-score from the formulas of Ledoit & Wolf (2004, Lemma 3.3) and Ibrahim et al., written out."""
    n, d = x.shape
    f = x - x.mean(axis=0)
    s = f.T @ f / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d  # d_n^2, Frobenius norm scaled by 1/d
    beta = sum(np.sum((np.outer(r, r) - s) ** 2) for r in f) / d / n**2  # bbar_n^2
    alpha = min(beta, delta) / delta
    cov = (1 - alpha) * s + alpha * mu * np.eye(d)
    classes = np.unique(y)
    g = np.zeros_like(f)
    for c in classes:
        g[y == c] = f[y == c].mean(axis=0)
    return float(np.trace(np.linalg.inv(cov) @ ((1 - alpha) * g.T @ g / n)))


@pytest.mark.parametrize(("n", "d", "dist"), [(30, 3, 1.0), (40, 25, 0.5), (12, 20, 2.0)])
def test_hscore_shrinkage_matches_a_hand_written_ledoit_wolf_reference(n, d, dist):
    x, y = blobs(dist, n=n, d=d, seed=4)
    assert hscore_shrinkage(x, y, seed=0) == pytest.approx(_ledoit_wolf_hscore_reference(x, y), rel=1e-9)


def test_hscore_shrinkage_scores_class_separated_features_above_noise_even_when_d_exceeds_n():
    x_sep, y = blobs(3.0, n=60, d=100, seed=5)
    x_noise, _ = blobs(0.0, n=60, d=100, seed=5)
    assert hscore_shrinkage(x_sep, y, seed=0) > 1.5 * hscore_shrinkage(x_noise, y, seed=0)


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


PERMUTATION_INVARIANT = ["logme", "hscore", "hscore_shrinkage", "knn_accuracy", "linear_probe_accuracy", "sfda"]


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


@pytest.mark.parametrize("name", ["logme", "hscore", "sfda"])
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
        "sfda",
    }
    assert LOGIT_ESTIMATORS == ["leep", "nce"]
    for name, est in ESTIMATORS.items():
        assert isinstance(est, Estimator)
        assert est.name == name
        assert est.paper
        assert est.higher_is_better
        assert est.fn.__doc__ and "Raises" in est.fn.__doc__
        assert est.definition
    assert "train@linear_probe" in get_estimator("linear_probe_accuracy").definition
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


SATURATE_WHEN_D_EXCEEDS_N = {"hscore", "sfda"}  # they refuse (UndefinedEstimate) rather than report C - 1 / 1.0


@pytest.mark.parametrize("name", FEATURE_ESTIMATORS)
def test_feature_estimators_cope_with_more_dims_than_samples_and_constant_columns(name):
    rng = np.random.default_rng(8)
    y = np.arange(12) % 2
    x = rng.normal(size=(12, 40)) + 2.0 * y[:, None]
    x[:, 5] = 3.0  # a constant column
    fn = get_estimator(name).fn
    if name in SATURATE_WHEN_D_EXCEEDS_N:
        with pytest.raises(UndefinedEstimate, match="saturates"):
            fn(x, y, seed=0)
    else:
        assert math.isfinite(fn(x, y, seed=0))
    x_low = x[:, :6]  # fewer dims than samples, the constant column included: every estimator gives a number
    assert math.isfinite(fn(x_low, y, seed=0))


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


# ----------------------------------------------------------------------------------------------- SFDA


def _sfda_reference(x: np.ndarray, y: np.ndarray) -> float:
    """SFDA as the paper states it, in the d x d primal: scatter matrices, shrinkage, generalised eigenproblem
    S_b v = e S_w~ v over all d eigenvectors, ConfMix, refit. The largest eigenvalue of S_w is exact here."""
    from scipy.linalg import eigh

    x = x.astype(float).copy()
    n, d = x.shape
    n_classes = int(y.max()) + 1

    def fit(x: np.ndarray, lam: float | None) -> tuple[np.ndarray, float]:
        priors = np.bincount(y) / n
        means = np.stack([x[y == c].mean(axis=0) for c in range(n_classes)])
        s_w = sum(priors[c] * np.cov(x[y == c].T, bias=True).reshape(d, d) for c in range(n_classes))
        if lam is None:
            lam = max(math.exp(-5 * np.linalg.eigvalsh(s_w)[-1]), 1e-10)

        def shrink(m: np.ndarray) -> np.ndarray:
            return (1 - lam) * m + lam * np.trace(m) / d * np.eye(d)

        s_w_shrunk = shrink(s_w)
        s_b = shrink(np.cov(x.T, bias=True).reshape(d, d)) - s_w_shrunk
        _, v = eigh(s_b, s_w_shrunk)
        coef = means @ v @ v.T
        logits = x @ coef.T - 0.5 * np.sum(means * coef, axis=1) + np.log(priors)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True), lam

    p, lam = fit(x, None)
    p = np.exp(p) / np.exp(p).sum(axis=1, keepdims=True)
    means = np.stack([x[y == c].mean(axis=0) for c in range(n_classes)])
    others = (means.sum(axis=0) - means) / (n_classes - 1)
    for c in range(n_classes):
        i = y == c
        x[i] = p[i, c : c + 1] * x[i] + (1 - p[i, c : c + 1]) * others[c]
    p, _ = fit(x, lam)
    return float(p[np.arange(n), y].mean())


@pytest.mark.parametrize(
    ("n", "d", "n_classes", "scale"),
    [(60, 4, 3, 0.3), (90, 5, 3, 0.1), (40, 8, 4, 1.0), (200, 6, 5, 0.05)],  # small scales: real shrinkage
)
def test_sfda_matches_the_primal_generalised_eigenproblem(n, d, n_classes, scale):
    x, y = blobs(1.5, n=n, d=d, n_classes=n_classes, seed=n)
    x = x * scale
    assert sfda(x, y, seed=0) == pytest.approx(_sfda_reference(x, y), rel=1e-9)


def test_sfda_invariant_to_rotation_and_shift_of_the_features():
    x, y = blobs(1.5, n=60, d=5, seed=7)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
    assert sfda(x @ q + 3.0, y, seed=0) == pytest.approx(sfda(x, y, seed=0), rel=1e-9)


def test_sfda_is_near_chance_on_noise_and_near_one_on_separated_classes():
    x_noise, y = blobs(0.0, n=300, d=5, n_classes=3, seed=8)
    x_sep, _ = blobs(8.0, n=300, d=5, n_classes=3, seed=8)
    assert sfda(x_noise, y, seed=0) < 0.45  # chance is 1/3
    assert sfda(x_sep, y, seed=0) > 0.95


def test_sfda_is_null_with_a_reason_when_any_labelling_separates():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(200, 400)), np.arange(200) % 10
    with pytest.raises(UndefinedEstimate, match=r"rank\(within-class scatter\)=190 >= n-C=190"):
        sfda(x, y, seed=0)
    assert score_all(x, y, None, seed=0, names=["sfda"]) == {"sfda": None}

"""Tests of transferlab.diagnostics: each diagnostic on data where its problem is known present and absent."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from transferlab.diagnosis.measures import (
    bn_statistics_gap,
    linear_cka,
    mmd_permutation_test,
    prediction_agreement,
    proxy_a_distance,
    train_val_gap,
    weight_drift,
)

# --------------------------------------------------------------------------------------------------
# linear CKA
# --------------------------------------------------------------------------------------------------


def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019) HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    return np.trace(k @ h @ l_ @ h) / math.sqrt(np.trace(k @ h @ k @ h) * np.trace(l_ @ h @ l_ @ h))


def test_cka_is_one_for_identical_features():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(60, 6), (12, 40)])  # feature-space and Gram-space code paths
def test_cka_invariant_to_rotation_and_isotropic_scaling(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    q, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
    assert linear_cka(x, 3.7 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-9)


def test_cka_is_low_for_independent_features():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 7))
    assert linear_cka(x, y) < 0.2


@pytest.mark.parametrize("shape", [(40, 3, 5), (10, 30, 25)])
def test_cka_symmetric_and_matches_reference(shape):
    n, d1, d2 = shape
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d1))
    y = np.hstack([x[:, :2] @ rng.normal(size=(2, 2)), rng.normal(size=(n, d2 - 2))])
    value = linear_cka(x, y)
    assert value == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert value == pytest.approx(_cka_reference(x, y), abs=1e-9)
    assert 0.0 < value < 1.0


def test_cka_rejects_bad_inputs():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(np.zeros((5, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(x, np.random.default_rng(0).normal(size=(5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="empty"):
        linear_cka(np.zeros((0, 2)), np.zeros((0, 2)))


# --------------------------------------------------------------------------------------------------
# MMD permutation test
# --------------------------------------------------------------------------------------------------


def test_mmd_same_distribution_is_not_rejected():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(120, 4)), rng.normal(size=(100, 4))
    res = mmd_permutation_test(x, y, n_permutations=200, seed=0)
    assert set(res) == {"mmd2", "p_value", "bandwidth"}
    assert res["p_value"] > 0.05
    assert res["bandwidth"] > 0.0


def test_mmd_shifted_means_are_rejected_with_larger_statistic():
    rng = np.random.default_rng(11)
    x, y_same, y_shift = rng.normal(size=(120, 4)), rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 1.0
    same = mmd_permutation_test(x, y_same, n_permutations=200, seed=0)
    shifted = mmd_permutation_test(x, y_shift, n_permutations=200, seed=0)
    assert shifted["p_value"] < 0.05
    assert shifted["p_value"] == pytest.approx(1 / 201)  # no permutation reaches the observed statistic
    assert shifted["mmd2"] > same["mmd2"] + 0.1


def test_mmd_deterministic_subsampled_and_fixed_bandwidth():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(700, 3)), rng.normal(size=(650, 3)) + 0.5
    first = mmd_permutation_test(x, y, n_permutations=50, seed=4, max_samples=200)
    assert first == mmd_permutation_test(x, y, n_permutations=50, seed=4, max_samples=200)
    fixed = mmd_permutation_test(x, y, n_permutations=50, bandwidth=2.0, max_samples=200)
    assert fixed["bandwidth"] == 2.0
    assert first["p_value"] < 0.05


def test_mmd_statistic_and_bandwidth_match_brute_force():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(7, 2)), rng.normal(size=(5, 2)) + 0.7
    z = np.vstack([x, y])
    dist = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    sigma = np.median(dist[np.triu_indices(12, k=1)])

    def k(p, q):
        return math.exp(-np.sum((p - q) ** 2) / (2 * sigma**2))

    kxx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kyy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kxy = sum(k(p, q) for p in x for q in y) / (7 * 5)
    res = mmd_permutation_test(x, y, n_permutations=20)
    assert res["bandwidth"] == pytest.approx(sigma)
    assert res["mmd2"] == pytest.approx(kxx + kyy - 2 * kxy, abs=1e-12)


def _brute_mmd2(z: np.ndarray, x_rows, sigma: float) -> float:
    """Unbiased MMD^2 by explicit loops: the rows in `x_rows` are one sample, the others the second."""
    xs = [z[i] for i in x_rows]
    ys = [z[i] for i in range(len(z)) if i not in set(x_rows)]

    def k(p, q):
        return math.exp(-np.sum((p - q) ** 2) / (2 * sigma**2))

    m, n = len(xs), len(ys)
    kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(ys[i], ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(p, q) for p in xs for q in ys) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd_p_value_equals_an_independent_permutation_null():
    """The p-value against a brute-force null: (i) the same random relabelings, each statistic recomputed by
    loops, give exactly the same count; (ii) the Monte-Carlo p-value converges to the exact p-value over
    all C(7, 4) = 35 splits."""
    rng = np.random.default_rng(14)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(3, 2)) + 0.8
    z = np.vstack([x, y])
    sigma = 1.3
    observed = _brute_mmd2(z, range(4), sigma)
    b = 300
    res = mmd_permutation_test(x, y, n_permutations=b, seed=5, bandwidth=sigma)
    assert res["mmd2"] == pytest.approx(observed, abs=1e-12)
    perm_rng = np.random.default_rng(5)  # no subsampling at this size: the stream is the relabelings only
    count = sum(_brute_mmd2(z, list(perm_rng.permutation(7)[:4]), sigma) >= observed - 1e-12 for _ in range(b))
    assert res["p_value"] == (count + 1) / (b + 1)

    splits = list(itertools.combinations(range(7), 4))
    exact = np.mean([_brute_mmd2(z, list(s), sigma) >= observed - 1e-12 for s in splits])
    many = mmd_permutation_test(x, y, n_permutations=4000, seed=6, bandwidth=sigma)
    assert 0 < exact < 0.5  # a shift the test can see, but not every split is less extreme
    assert many["p_value"] == pytest.approx(exact, abs=0.03)  # 4 binomial standard errors at B = 4000


def test_mmd_p_values_are_uniform_under_the_null_and_minimal_for_a_clear_shift():
    rng = np.random.default_rng(15)
    same = np.array(
        [
            mmd_permutation_test(rng.normal(size=(12, 2)), rng.normal(size=(12, 2)), n_permutations=99, seed=i)[
                "p_value"
            ]
            for i in range(200)
        ]
    )
    # Uniform on {1/100, ..., 1}: mean 0.505, P(p <= 0.05) = 0.05; bounds are about 4 standard errors.
    assert 0.42 < same.mean() < 0.59
    assert 0.005 <= np.mean(same <= 0.05) <= 0.12
    shifted = mmd_permutation_test(rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 4.0, n_permutations=99)
    assert shifted["p_value"] == 1 / 100


def test_mmd_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same number of features"):
        mmd_permutation_test(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd_permutation_test(np.zeros((1, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_permutation_test(np.zeros((5, 2)), np.ones((5, 2)), bandwidth=0.0)


# --------------------------------------------------------------------------------------------------
# proxy A-distance
# --------------------------------------------------------------------------------------------------


def test_pad_is_small_for_the_same_distribution():
    rng = np.random.default_rng(20)
    assert proxy_a_distance(rng.normal(size=(300, 5)), rng.normal(size=(300, 5))) < 0.3


def test_pad_is_near_two_for_far_apart_distributions():
    rng = np.random.default_rng(21)
    assert proxy_a_distance(rng.normal(size=(300, 5)), rng.normal(size=(250, 5)) + 6.0) > 1.8


def test_pad_small_samples_and_validation():
    rng = np.random.default_rng(22)
    value = proxy_a_distance(rng.normal(size=(4, 2)), rng.normal(size=(3, 2)) + 10.0)  # 2-fold path
    assert 0.0 <= value <= 2.0
    with pytest.raises(ValueError, match="same number of features"):
        proxy_a_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        proxy_a_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics gap
# --------------------------------------------------------------------------------------------------


def _tiny_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=None),  # cumulative average: running stats = the data's stats
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    net.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(8):
            net(torch.randn(32, 3, 8, 8, generator=gen))
    net.eval()
    return net


@pytest.fixture(scope="module")
def _source_bn_net() -> torch.nn.Module:
    return _tiny_bn_net()


@pytest.fixture
def bn_net(_source_bn_net) -> torch.nn.Module:
    return copy.deepcopy(_source_bn_net)


def _target_images(shift: float) -> torch.Tensor:
    return torch.randn(100, 3, 8, 8, generator=torch.Generator().manual_seed(2)) + shift


def test_bn_gap_small_for_source_distribution_and_large_for_shifted(bn_net):
    same = bn_statistics_gap(bn_net, _target_images(0.0), batch_size=16)
    shifted = bn_statistics_gap(bn_net, _target_images(5.0), batch_size=16)
    assert [row["layer"] for row in same] == ["1", "4"]
    assert set(same[0]) == {"layer", "mean_gap", "var_log_ratio", "gaussian_kl"}
    for row in same:
        assert row["mean_gap"] < 0.15
        assert row["var_log_ratio"] < 0.15
        assert row["gaussian_kl"] < 0.05
    assert shifted[0]["mean_gap"] > 1.0
    assert shifted[0]["mean_gap"] > 10 * same[0]["mean_gap"]
    assert shifted[0]["gaussian_kl"] > 10 * same[0]["gaussian_kl"]


def test_bn_gap_does_not_depend_on_batch_size(bn_net):
    images = _target_images(1.0)
    one = bn_statistics_gap(bn_net, images, batch_size=7)
    two = bn_statistics_gap(bn_net, images, batch_size=100)
    for a, b in zip(one, two, strict=True):
        for key in ("mean_gap", "var_log_ratio", "gaussian_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("train_mode", [True, False])
def test_bn_gap_leaves_model_state_and_mode_unchanged(bn_net, train_mode):
    bn_net.train(train_mode)
    bn_net[0].train(not train_mode)  # mixed flags must be restored module by module
    before = copy.deepcopy(bn_net.state_dict())
    flags = [m.training for m in bn_net.modules()]
    bn_statistics_gap(bn_net, _target_images(5.0), batch_size=32)
    after = bn_net.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [m.training for m in bn_net.modules()] == flags
    assert not bn_net[1]._forward_pre_hooks


def test_bn_gap_without_batchnorm_and_bad_inputs(bn_net):
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    assert bn_statistics_gap(plain, torch.randn(4, 3, 4, 4)) == []
    with pytest.raises(ValueError, match="4-D"):
        bn_statistics_gap(bn_net, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        bn_statistics_gap(bn_net, torch.randn(0, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        bn_statistics_gap(bn_net, torch.full((2, 3, 8, 8), float("nan")))


# --------------------------------------------------------------------------------------------------
# weight drift
# --------------------------------------------------------------------------------------------------


def test_weight_drift_zero_for_identical_weights(bn_net):
    sd = bn_net.state_dict()
    drift = weight_drift(sd, copy.deepcopy(sd))
    assert drift["_skipped"] == 2.0  # the two BatchNorm num_batches_tracked counters (int64)
    assert {k: v for k, v in drift.items() if k != "_skipped"} == {
        "0": 0.0,
        "1": 0.0,
        "3": 0.0,
        "4": 0.0,
        "8": 0.0,
    }


def test_weight_drift_hand_example():
    before = {"fc.weight": torch.tensor([3.0, 4.0])}
    after = {"fc.weight": torch.tensor([3.3, 4.4])}
    assert weight_drift(before, after) == {"fc": pytest.approx(0.1), "_skipped": 0.0}


def test_weight_drift_default_groups_and_skips():
    before = {
        "blocks.3.conv.weight": torch.tensor([1.0, 0.0]),
        "blocks.3.bn.weight": torch.tensor([0.0, 1.0]),
        "blocks.4.conv.weight": torch.tensor([2.0]),
        "head.weight": torch.ones(10, 4),
        "stem.bn.num_batches_tracked": torch.tensor(5),
        "only_before.weight": torch.ones(2),
    }
    after = {
        "blocks.3.conv.weight": torch.tensor([1.0, 1.0]),
        "blocks.3.bn.weight": torch.tensor([0.0, 1.0]),
        "blocks.4.conv.weight": torch.tensor([2.0]),
        "head.weight": torch.ones(3, 4),  # replaced head: shape differs
        "stem.bn.num_batches_tracked": torch.tensor(9),
        "only_after.weight": torch.ones(2),
    }
    drift = weight_drift(before, after)
    assert drift == {"blocks.3": pytest.approx(1 / math.sqrt(2)), "blocks.4": 0.0, "_skipped": 4.0}


def test_weight_drift_explicit_groups_and_validation():
    before = {"a.w": torch.tensor([3.0, 4.0]), "b.w": torch.tensor([1.0])}
    after = {"a.w": torch.tensor([3.0, 4.0]), "b.w": torch.tensor([2.0])}
    drift = weight_drift(before, after, groups={"all": ["a.w", "b.w"], "ghost": ["nope"]})
    assert drift["all"] == pytest.approx(1 / math.sqrt(26))
    assert math.isnan(drift["ghost"])
    assert drift["_skipped"] == 1.0
    zero = weight_drift({"z": torch.zeros(2)}, {"z": torch.ones(2)})
    assert zero["z"] == math.inf
    with pytest.raises(ValueError, match="empty"):
        weight_drift({}, {})
    with pytest.raises(ValueError, match="NaN"):
        weight_drift({"a": torch.tensor([float("nan")])}, {"a": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="reserved"):
        weight_drift(before, after, groups={"_skipped": ["a.w"]})


# --------------------------------------------------------------------------------------------------
# prediction agreement
# --------------------------------------------------------------------------------------------------


def test_prediction_agreement_identical_logits():
    logits = np.random.default_rng(30).normal(size=(50, 6)) * 3
    res = prediction_agreement(logits, logits.copy())
    assert res == {"top1_agreement": 1.0, "mean_symmetric_kl": pytest.approx(0.0, abs=1e-12)}


def test_prediction_agreement_permuted_classes_disagree():
    rng = np.random.default_rng(31)
    logits = rng.normal(size=(80, 5))
    logits[np.arange(80), rng.integers(0, 5, size=80)] += 5.0  # a clear winner per row
    res = prediction_agreement(logits, np.roll(logits, 1, axis=1))
    assert res["top1_agreement"] == 0.0
    assert res["mean_symmetric_kl"] > 1.0


def test_prediction_agreement_stable_for_huge_logits_and_validation():
    a = np.array([[1e4, 0.0], [0.0, 1e4]])
    b = np.array([[0.0, 1e4], [0.0, 1e4]])
    res = prediction_agreement(a, b)
    assert res["top1_agreement"] == 0.5
    assert math.isfinite(res["mean_symmetric_kl"]) and res["mean_symmetric_kl"] > 1e3
    with pytest.raises(ValueError, match="same shape"):
        prediction_agreement(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        prediction_agreement(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2-D"):
        prediction_agreement(np.zeros(3), np.zeros(3))


# --------------------------------------------------------------------------------------------------
# train/val gap
# --------------------------------------------------------------------------------------------------


def test_train_val_gap_hand_example():
    history = [
        {"train_accuracy": 0.60, "val_accuracy": 0.55, "train_loss": 1.2, "val_loss": 1.3},
        {"train_accuracy": 0.80, "val_accuracy": 0.70, "train_loss": 0.6, "val_loss": 0.9},
        {"train_accuracy": 0.95, "val_accuracy": 0.68, "train_loss": 0.2, "val_loss": 1.1},
        {"train_accuracy": 0.99, "val_accuracy": 0.65, "train_loss": 0.05, "val_loss": 1.4},
    ]
    res = train_val_gap(history)
    assert res["best_epoch"] == 1 and res["last_epoch"] == 3
    assert res["best_val_accuracy"] == pytest.approx(0.70)
    assert res["accuracy_gap_at_best"] == pytest.approx(0.10)
    assert res["loss_gap_at_best"] == pytest.approx(0.30)
    assert res["accuracy_gap_last"] == pytest.approx(0.34)
    assert res["loss_gap_last"] == pytest.approx(1.35)
    assert res["val_accuracy_drop"] == pytest.approx(0.05)


def test_train_val_gap_no_overfitting_and_validation():
    history = [{"train_accuracy": 0.5, "val_accuracy": 0.6, "train_loss": 1.0, "val_loss": 0.9}]
    res = train_val_gap(history)
    assert res["best_epoch"] == res["last_epoch"] == 0
    assert res["accuracy_gap_last"] == pytest.approx(-0.1) and res["val_accuracy_drop"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        train_val_gap([])
    with pytest.raises(ValueError, match="val_loss"):
        train_val_gap([{"train_accuracy": 0.5, "val_accuracy": 0.6, "train_loss": 1.0}])
    with pytest.raises(ValueError, match="NaN"):
        train_val_gap([{**history[0], "val_accuracy": float("nan")}])

"""Closing-the-loop statistics: rank agreement over seeds and test samples, the 'too few' guard, data-free
baselines and the summary sentence."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.scoring.agreement import (
    TOO_FEW,
    bootstrap_accuracies,
    data_free_rankings,
    plain_summary,
    rank_agreement,
    recipe_agreement,
)

ACC5 = {"a": 0.9, "b": 0.75, "c": 0.6, "d": 0.45, "e": 0.3}
ORDER5 = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0}


def _correct(accuracies, n=400, seed=0, seeds=1):
    rng = np.random.default_rng(seed)
    if seeds == 1:
        return {k: rng.random(n) < a for k, a in accuracies.items()}
    return {k: rng.random((seeds, n)) < a for k, a in accuracies.items()}


def test_agreement_is_strong_when_estimates_order_well_separated_accuracies():
    r = rank_agreement(ORDER5, _correct(ACC5), n_bootstrap=300)
    assert r["weighted_tau"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert r["pairs_resolved"] == r["pairs_total"] == 10 and r["verdict"] == "strong"


def test_reversed_estimates_are_weak():
    reversed_order = {k: -v for k, v in ORDER5.items()}
    r = rank_agreement(reversed_order, _correct(ACC5), n_bootstrap=300)
    assert r["weighted_tau"] == pytest.approx(-1.0) and r["verdict"] == "weak"


def test_below_five_candidates_the_verdict_is_too_few_to_judge():
    four = {k: v for k, v in ORDER5.items() if k != "e"}
    r = rank_agreement(four, _correct(ACC5), n_bootstrap=200)
    assert r["n_candidates"] == 4 and r["weighted_tau"] == pytest.approx(1.0)
    assert r["verdict"] == TOO_FEW
    # A null estimate does not count as a candidate either.
    with_null = {**ORDER5, "e": None}
    assert rank_agreement(with_null, _correct(ACC5), n_bootstrap=200)["verdict"] == TOO_FEW
    summary = plain_summary({"x": r}, "linear_probe")
    assert TOO_FEW in summary and "strong" not in summary and "weak" not in summary


def test_indistinguishable_accuracies_are_called_noise():
    base = np.random.default_rng(1).random(200) < 0.8
    correct = {}
    for i, k in enumerate("abcde"):  # the same predictions up to one or two flipped samples each
        c = base.copy()
        c[i * 3 : i * 3 + 1 + i % 2] ^= True
        correct[k] = c
    r = rank_agreement(ORDER5, correct, n_bootstrap=300)
    assert r["pairs_resolved"] == 0
    assert r["weighted_tau_ci"][0] < 0 < r["weighted_tau_ci"][1]
    assert "noise" in plain_summary({"x": r}, "linear_probe")


def test_agreement_needs_three_candidates():
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement({"a": 1.0, "b": None, "c": 2.0}, _correct({"a": 0.5, "b": 0.5, "c": 0.5}))


def test_bootstrap_resamples_seeds_too():
    # Candidate "a" is right on every sample for seed 0 and wrong on every sample for seed 1: the test samples
    # alone cannot move its accuracy, only resampling the seeds can.
    n = 50
    correct = {"a": np.stack([np.ones(n, bool), np.zeros(n, bool)]), "b": np.stack([np.ones(n, bool)] * 2)}
    names, acc, boot = bootstrap_accuracies(correct, n_bootstrap=400, seed=0)
    assert names == ["a", "b"] and acc.tolist() == [0.5, 1.0]
    assert set(np.round(boot[:, 0], 6)) == {0.0, 0.5, 1.0}  # both seeds drawn twice, once each
    assert np.all(boot[:, 1] == 1.0)
    one_seed = {"a": np.ones(n, bool), "b": np.ones((1, n), bool)}
    assert bootstrap_accuracies(one_seed, n_bootstrap=10, seed=0)[2].std() == 0.0
    with pytest.raises(ValueError, match="same"):
        bootstrap_accuracies({"a": np.ones((2, n), bool), "b": np.ones((3, n), bool)}, n_bootstrap=10, seed=0)


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    stable = {k: np.stack([rng.random(400) < a] * 4) for k, a in ACC5.items()}
    noisy = {
        k: np.stack([rng.random(400) < min(a + rng.normal(0, 0.15), 1) for _ in range(4)]) for k, a in ACC5.items()
    }
    w_stable = np.diff(rank_agreement(ORDER5, stable, n_bootstrap=300)["weighted_tau_ci"])[0]
    r_noisy = rank_agreement(ORDER5, noisy, n_bootstrap=300)
    assert r_noisy["n_seeds"] == 4
    assert np.diff(r_noisy["weighted_tau_ci"])[0] > w_stable


def test_useful_here_only_when_beating_the_data_free_ranking():
    correct = _correct(ACC5, n=2000)
    good = ORDER5
    # A data-free ranking that already orders the candidates perfectly: no estimator can beat it.
    perfect = {"top1": dict(ORDER5)}
    r = rank_agreement(good, correct, n_bootstrap=300, data_free=perfect)
    assert r["useful_here"] is False and "does not beat top1" in r["useful_here_reason"]
    # A data-free ranking that gets the order backwards: the estimator beats it beyond the interval.
    backwards = {"params": {k: -v for k, v in ORDER5.items()}}
    r = rank_agreement(good, correct, n_bootstrap=300, data_free=backwards)
    assert r["vs_data_free"]["params"]["beats"] is True and r["useful_here"] is True
    assert r["vs_data_free"]["params"]["weighted_tau_difference"] == pytest.approx(2.0)
    # A data-free ranking known for too few candidates cannot be compared, and does not make anything useful.
    sparse = {"top1": {"a": 77.6, "b": 76.7, "c": 75.1, "d": None, "e": None}}
    r = rank_agreement(good, correct, n_bootstrap=300, data_free=sparse)
    assert r["vs_data_free"]["top1"]["verdict"] == TOO_FEW and r["useful_here"] is False


def test_data_free_rankings_know_published_top1_and_params_only():
    rows = {"lite0": {"params": 4_652_008}, "rand": {"params": 4_652_008}, "mnist": {}}
    out = data_free_rankings(["lite0", "mnist", "rand"], rows, {"lite0": 75.1})
    assert out["imagenet_top1"] == {"lite0": 75.1, "mnist": None, "rand": None}
    assert out["params"] == {"lite0": 4_652_008, "mnist": None, "rand": 4_652_008}


def test_recipe_agreement_reports_estimators_baselines_and_non_converged_runs():
    correct = _correct(ACC5, n=1000, seeds=2)
    estimates = {"good": ORDER5, "null_for_most": {"a": 1.0, "b": None, "c": None, "d": None, "e": None}}
    data_free = {"params": {k: -v for k, v in ORDER5.items()}}
    out = recipe_agreement(
        estimates, correct, data_free, recipe="linear_probe", not_converged=["c"], n_bootstrap=200, seed=0
    )
    assert out["estimators"]["good"]["useful_here"] is True
    assert out["estimators"]["null_for_most"]["verdict"] == "undetermined"
    assert out["data_free"]["params"]["weighted_tau"] == pytest.approx(-1.0)
    assert out["not_converged"] == ["c"]
    assert set(out["test_accuracy"]) == set(ACC5)
    assert "Useful here" in out["summary"] and "good" in out["summary"]
    assert "did not converge" in out["summary"] and "params" in out["summary"]
    again = recipe_agreement(
        estimates, correct, data_free, recipe="linear_probe", not_converged=["c"], n_bootstrap=200, seed=0
    )
    assert again == out  # deterministic given the seed

"""Closing-the-loop statistics: rank agreement over seeds and test samples, the 'too few' guard, data-free
baselines, the headline (never an ungraded estimator, never a tie broken by name), resolved pairs among real
candidates and controls, the kind of each interval, and the summary sentence."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.scoring.agreement import (
    NOT_DISTINGUISHABLE,
    TOO_FEW,
    bootstrap_accuracies,
    control_candidates,
    data_free_rankings,
    finetune_check,
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


def _near(correct, rng, flips, drop=0):
    """A copy of `correct` that disagrees with it on 2 * flips + drop samples: flips + drop right answers made
    wrong and flips wrong ones made right (accuracy lower by drop samples, the order free to swap)."""
    c = correct.copy()
    right, wrong = np.flatnonzero(c), np.flatnonzero(~c)
    c[rng.choice(right, flips + drop, replace=False)] = False
    c[rng.choice(wrong, flips, replace=False)] = True
    return c


def _ladder(n=400, flips=15, seed=1):
    """Five candidates one test sample apart from the next (a best): an order the resamples keep swapping."""
    rng = np.random.default_rng(seed)
    out = {"a": rng.random(n) < 0.8}
    for prev, k in zip("abcd", "bcde", strict=True):
        out[k] = _near(out[prev], rng, flips, drop=1)
    return out


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
    # A data-free ranking known for 3 of 5 candidates is compared on those 3 (here it orders them backwards).
    sparse = {"top1": {"a": 75.1, "b": 76.7, "c": 77.6, "d": None, "e": None}}
    r = rank_agreement(good, correct, n_bootstrap=300, data_free=sparse)
    v = r["vs_data_free"]["top1"]
    assert v["computed"] is True and v["n_candidates"] == 3 and v["candidates_lacking"] == ["d", "e"]
    assert v["weighted_tau_difference"] == pytest.approx(2.0)


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


def test_top1_known_for_too_few_candidates_is_not_computed_never_read_as_not_beaten():
    correct = _correct(ACC5, n=1000)
    data_free = {"imagenet_top1": {"a": 77.6, "b": 76.7, "c": None, "d": None, "e": None}, "params": ORDER5}
    r = rank_agreement(ORDER5, correct, n_bootstrap=200, data_free=data_free)
    top1 = r["vs_data_free"]["imagenet_top1"]
    assert top1 == {
        "computed": False,
        "n_candidates": 2,
        "reason": "not computed: 3 of 5 candidates lack it",
        "beats": None,
    }
    assert "imagenet_top1" not in r["useful_here_reason"].split("not beat")[-1]
    out = recipe_agreement({"good": ORDER5}, correct, data_free, recipe="linear_probe", n_bootstrap=200)
    assert out["data_free"]["imagenet_top1"]["verdict"] == "not computed"
    assert "imagenet_top1: not computed: 3 of 5 candidates lack it" in out["summary"]
    top1_txt = out["summary"].split("imagenet_top1")[1].split("Data-free ranking by")[0]
    assert "beats it" not in top1_txt and "no estimator was compared with it" in top1_txt


def test_an_ungraded_estimator_is_never_the_headline():
    correct = _correct(ACC5, n=1000, seeds=2)
    four = {**ORDER5, "e": None}  # perfect on 4 candidates: too few to judge
    so_so = {"a": 4.0, "b": 5.0, "c": 3.0, "d": 1.0, "e": 2.0}  # graded, imperfect
    out = recipe_agreement({"aaa_four": four, "so_so": so_so}, correct, {}, recipe="linear_probe", n_bootstrap=200)
    assert out["estimators"]["aaa_four"]["verdict"] == TOO_FEW
    assert out["headline"]["estimator"] is None and out["headline"]["graded"] == ["so_so"]
    assert "aaa_four" in out["headline"]["not_graded"]
    assert "agrees best" not in out["summary"] and NOT_DISTINGUISHABLE in out["summary"]
    # None graded at all: nothing is named, whatever the taus.
    out = recipe_agreement({"aaa_four": four}, correct, {}, recipe="linear_probe", n_bootstrap=200)
    assert out["headline"]["estimator"] is None and "no estimator was graded" in out["summary"]


def test_a_tie_at_the_top_names_no_winner():
    correct = _correct(ACC5, n=1000)
    twin = {k: 10 * v for k, v in ORDER5.items()}  # the same order: the same tau
    worse = {"a": 4.0, "b": 5.0, "c": 3.0, "d": 2.0, "e": 1.0}
    out = recipe_agreement(
        {"b_first": ORDER5, "a_second": twin, "worse": worse}, correct, {}, recipe="linear_probe", n_bootstrap=200
    )
    h = out["headline"]
    assert h["estimator"] is None and h["tied_at_top"] == ["a_second", "b_first"]
    assert "tie at the top" in out["summary"] and "agrees best" not in out["summary"]


def test_the_headline_needs_a_lead_beyond_the_paired_interval():
    correct = _correct(ACC5, n=2000, seeds=2)
    backwards = {k: -v for k, v in ORDER5.items()}
    out = recipe_agreement({"good": ORDER5, "bad": backwards}, correct, {}, recipe="linear_probe", n_bootstrap=200)
    assert out["headline"]["estimator"] == "good" and out["headline"]["versus"]["bad"]["beats"] is True
    assert out["summary"].startswith("linear_probe: good agrees best")
    # Near-identical accuracies: the same leader by point estimate, but not beyond the interval.
    close = _ladder()
    out = recipe_agreement({"good": ORDER5, "bad": backwards}, close, {}, recipe="linear_probe", n_bootstrap=200)
    assert out["estimators"]["good"]["weighted_tau"] == pytest.approx(1.0)
    assert out["headline"]["estimator"] is None and "does not beat bad" in out["headline"]["reason"]


def test_resolved_pairs_are_split_between_real_candidates_and_controls():
    assert control_candidates({"lite0": "packaged", "mnist_cnn": "pipeline", "rand": "random_init"}) == ["rand"]
    rng = np.random.default_rng(2)
    a = rng.random(2000) < 0.8
    # a, b, c indistinguishable (the same accuracy, 40 samples apart); d clearly below; e is the control.
    correct = {"a": a, "b": _near(a, rng, 20), "c": _near(a, rng, 20), "d": rng.random(2000) < 0.6}
    correct["e"] = rng.random(2000) < 0.3
    r = rank_agreement(ORDER5, correct, n_bootstrap=300, controls=["e"])
    assert (r["pairs_total_real"], r["pairs_total_involving_controls"], r["pairs_total"]) == (6, 4, 10)
    assert r["pairs_resolved_involving_controls"] == 4
    assert r["pairs_resolved_real"] == 3  # d against a, b, c; a, b, c not told apart
    out = recipe_agreement({"x": ORDER5}, correct, {}, recipe="linear_probe", controls=["e"], n_bootstrap=300)
    assert out["pairs"]["pairs_resolved_real"] == 3
    assert "3 of 6 among the real candidates, 4 of 4 involving the controls (e)" in out["summary"]


def test_interval_kinds_resolved_one_sided_two_sided():
    # Well-separated accuracies: the order never changes, so the "interval" is the point: resolved.
    r = rank_agreement(ORDER5, _correct(ACC5, n=2000), n_bootstrap=300)
    assert r["weighted_tau_ci"] == [1.0, 1.0] and r["weighted_tau_ci_kind"] == "resolved"
    assert "not an interval" in r["weighted_tau_ci_note"]
    # d and e near-tied, the estimate orders them against the observed order: the observed order is the least
    # agreeing one resampling reaches, so the point estimate is the lower end of the interval.
    rng = np.random.default_rng(4)
    correct = {k: rng.random(2000) < a for k, a in {"a": 0.9, "b": 0.75, "c": 0.6, "d": 0.45}.items()}
    correct["e"] = _near(correct["d"], rng, 15, drop=1)
    against = {**ORDER5, "d": 1.0, "e": 2.0}
    r = rank_agreement(against, correct, n_bootstrap=300)
    assert r["weighted_tau_ci_kind"] == "one_sided" and r["weighted_tau_ci"][0] == pytest.approx(r["weighted_tau"])
    assert "lower end" in r["weighted_tau_ci_note"]
    # Accuracies the resamples keep reordering, an order in the middle: an ordinary two-sided interval.
    middle = {"a": 5.0, "b": 3.0, "c": 4.0, "d": 1.0, "e": 2.0}  # neither the most nor the least agreeing order
    assert rank_agreement(middle, _ladder(), n_bootstrap=300)["weighted_tau_ci_kind"] == "two_sided"


def test_seeds_are_resampled_per_candidate_not_shared():
    # a and b have the same two seeds (all right, all wrong): a shared seed draw would keep their replicates equal.
    n = 50
    runs = np.stack([np.ones(n, bool), np.zeros(n, bool)])
    _, _, boot = bootstrap_accuracies({"a": runs, "b": runs.copy()}, n_bootstrap=200, seed=0)
    assert (boot[:, 0] != boot[:, 1]).any()
    assert set(np.round(boot.ravel(), 6)) == {0.0, 0.5, 1.0}


def test_finetune_ground_truth_says_when_it_was_not_checked():
    off = finetune_check({"linear_probe": None}, "finetune_top", 0)
    assert off["finetune_checked"] is False and off["finetune_strategy"] == "finetune_top"
    assert "was not checked" in off["finetune_reason"] and "make repro-full" in off["finetune_reason"]
    on = finetune_check({"linear_probe": None, "short_finetune": None}, "finetune_top", 60)
    assert on["finetune_checked"] is True and "60" in on["finetune_reason"]
    correct = _correct(ACC5, n=500)
    out = recipe_agreement(
        {"x": ORDER5}, correct, {}, recipe="linear_probe", n_bootstrap=100, note=off["finetune_reason"]
    )
    assert out["summary"].endswith(off["finetune_reason"])

"""Ranking and selection of candidates, and the closing-the-loop agreement statistics."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.agreement import plain_summary, rank_agreement
from transferlab.io import write_npy
from transferlab.scoring import score_candidates


def _cache(root, name, separation, seed, logits=True):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 20)
    centers = rng.normal(size=(3, 8)) * separation
    write_npy(root / name / "train_features.npy", (centers[y] + rng.normal(size=(60, 8))).astype(np.float32))
    if logits:
        write_npy(root / name / "train_logits.npy", rng.normal(size=(60, 5)).astype(np.float32))
    return y


def test_ranking_follows_the_estimate_and_skips_controls_and_budgets(tmp_path):
    y = _cache(tmp_path, "good", 6.0, 0)
    _cache(tmp_path, "okay", 1.5, 1)
    _cache(tmp_path, "noise", 0.0, 2, logits=False)
    _cache(tmp_path, "control", 8.0, 3, logits=False)
    kinds = {"good": "packaged", "okay": "packaged", "noise": "checkpoint", "control": "random_init"}
    costs = {"good": {"params": 5_000_000}, "okay": {"params": 1_000}, "noise": {"params": 1}, "control": {"params": 1}}
    out = score_candidates(tmp_path, kinds, y, estimators=["logme", "leep"], select_by="logme", seed=0, costs=costs)
    assert out["ranking"][:2] == ["control", "good"] and out["ranking"][-1] == "noise"
    assert out["selected"] == "good" and "control" in out["excluded"]
    assert out["candidates"]["noise"]["leep"] is None  # no source classifier
    budget = score_candidates(
        tmp_path, kinds, y, estimators=["logme"], select_by="logme", seed=0, costs=costs, max_params=10_000
    )
    assert budget["selected"] == "okay" and "max_params" in budget["excluded"]["good"]
    with pytest.raises(ValueError, match="no candidate can be selected"):
        score_candidates(tmp_path, kinds, y, estimators=["logme"], select_by="logme", seed=0, costs=costs, max_params=0)
    with pytest.raises(KeyError, match="valid names"):
        score_candidates(tmp_path, kinds, y, estimators=["logmee"], select_by="logme", seed=0, costs=costs)


def _correct(accuracies, n=400, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.random(n) < a for k, a in accuracies.items()}


def test_agreement_is_strong_when_estimates_order_well_separated_accuracies():
    correct = _correct({"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.3})
    r = rank_agreement({"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}, correct, n_bootstrap=300)
    assert r["weighted_tau"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert r["pairs_resolved"] == r["pairs_total"] == 6 and r["verdict"] == "strong"


def test_reversed_estimates_are_weak():
    correct = _correct({"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.3})
    r = rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, correct, n_bootstrap=300)
    assert r["weighted_tau"] == pytest.approx(-1.0) and r["verdict"] == "weak"


def test_indistinguishable_accuracies_are_called_noise():
    base = np.random.default_rng(1).random(200) < 0.8
    correct = {}
    for i, k in enumerate("abcd"):  # the same predictions up to one or two flipped samples each
        c = base.copy()
        c[i * 3 : i * 3 + 1 + i % 2] ^= True
        correct[k] = c
    r = rank_agreement({"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}, correct, n_bootstrap=300)
    assert r["pairs_resolved"] == 0
    assert r["weighted_tau_ci"][0] < 0 < r["weighted_tau_ci"][1]
    assert "noise" in plain_summary({"x": r}, "linear_probe")


def test_agreement_needs_three_candidates():
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement({"a": 1.0, "b": None, "c": 2.0}, _correct({"a": 0.5, "b": 0.5, "c": 0.5}))

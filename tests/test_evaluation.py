"""Test metrics, the paired comparison table, and the raw-pixel baseline."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.baselines import raw_pixel_logreg
from transferlab.comparison import compare_to_baseline, verdict
from transferlab.evaluation import classification_metrics, expected_calibration_error


def test_metrics_on_a_hand_example():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    m = classification_metrics(y, proba, ["a", "b"])
    assert m["test_accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3, abs=1e-6), "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["confusion"] == [[1, 1], [0, 2]]
    assert m["balanced_accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])), abs=1e-6)


def test_ece_zero_when_confidence_matches_accuracy():
    y = np.array([0, 1, 0, 1])
    proba = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(proba, y) == 0.0
    overconfident = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.25)


def test_compare_flags_better_worse_and_inconclusive():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    good = np.where(rng.random(600) < 0.9, y, (y + 1) % 3)
    base = np.where(rng.random(600) < 0.6, y, (y + 1) % 3)
    same = base.copy()
    preds = {"scratch": base, "good": good, "same": same}
    metrics = {n: {"test_accuracy": float((p == y).mean()), "macro_f1": 0.0} for n, p in preds.items()}
    out = compare_to_baseline(y, preds, metrics, "scratch", n_bootstrap=500, confidence=0.95, seed=0)
    assert out["strategies"]["good"]["verdict"] == "better"
    assert out["strategies"]["good"]["gain_vs_scratch"]["accuracy"]["ci_low"] > 0.2
    assert out["strategies"]["same"]["verdict"] == "inconclusive"
    assert "gain_vs_scratch" not in out["strategies"]["scratch"]
    assert out["best_strategy"] == "good"
    assert verdict(-0.2, -0.1) == "worse"
    with pytest.raises(KeyError, match="has no predictions"):
        compare_to_baseline(y, {"good": good}, metrics, "scratch", n_bootstrap=100, confidence=0.95, seed=0)


def test_raw_pixel_baseline_learns_separable_images(tiny_data):
    proba = raw_pixel_logreg(
        tiny_data["images"]["train"],
        tiny_data["labels"]["train"],
        tiny_data["images"]["test"],
        C=1.0,
        max_iter=200,
        seed=0,
    )
    assert proba.shape == (18, 3)
    assert (proba.argmax(1) == tiny_data["labels"]["test"]).mean() > 0.9

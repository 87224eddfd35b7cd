"""Test-set metrics for one trained model: accuracy, balanced accuracy, macro and per-class precision /
recall / F1, confusion matrix, calibration (ECE, NLL). (Latency per image: `models.costs.latency_ms`.)

`macro_f1` here is sklearn's over all the task's classes (`labels=range(C)`, `zero_division=0`); the
bootstrap's vectorised `evaluation.stats.macro_f1_rows` computes the same number and is tested against it."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., ICML 2017)."""
    conf = proba.max(1)
    correct = proba.argmax(1) == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Every test metric of one model.

    Args:
        y_true: int labels (N,).
        proba: predicted class probabilities (N, C).
        class_names: names of the C classes.

    Returns:
        Flat headline metrics, `per_class` {name: precision, recall, f1, support} and `confusion` (C x C,
        rows = true class).
    """
    y_pred = proba.argmax(1)
    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    eps = 1e-12
    nll = float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1)).mean())
    r6 = lambda v: round(float(v), 6)  # noqa: E731 - six decimals keep diffs readable, far below CI widths
    return {
        "test_accuracy": r6((y_pred == y_true).mean()),
        "balanced_accuracy": r6(balanced_accuracy_score(y_true, y_pred)),
        "macro_precision": r6(mp),
        "macro_recall": r6(mr),
        "macro_f1": r6(mf),
        "nll": r6(nll),
        "ece": r6(expected_calibration_error(proba, y_true)),
        "test_samples": len(y_true),
        "per_class": {
            name: {"precision": r6(p[i]), "recall": r6(r[i]), "f1": r6(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }

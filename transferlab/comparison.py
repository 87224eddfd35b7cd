"""Every strategy against the baseline (scratch by default), with paired bootstrap confidence intervals
over the test samples: the numbers a pull request's `dvc metrics diff` is about."""

from __future__ import annotations

import numpy as np

from transferlab.diagnostics import paired_bootstrap_gain


def verdict(ci_low: float, ci_high: float) -> str:
    """'better' / 'worse' when the whole interval is on one side of zero, else 'inconclusive'."""
    return "better" if ci_low > 0 else "worse" if ci_high < 0 else "inconclusive"


def compare_to_baseline(
    y_true: np.ndarray,
    predictions: dict[str, np.ndarray],
    metrics: dict[str, dict],
    baseline: str,
    *,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict:
    """The summary table.

    Args:
        y_true: test labels.
        predictions: name -> predicted labels on the same test samples (same order).
        metrics: name -> that model's evaluate metrics.
        baseline: the name every other row is compared against.
        n_bootstrap, confidence, seed: the paired bootstrap.

    Returns:
        {'baseline', 'confidence', 'strategies': {name: {test_accuracy, macro_f1, balanced_accuracy,
        gain_vs_<baseline>: {accuracy: {gain, ci_low, ci_high, p_value_gain_le_0}, macro_f1: {...}},
        verdict}}, 'best_strategy', 'ranking'}

    Raises:
        KeyError: the baseline has no predictions.
    """
    if baseline not in predictions:
        raise KeyError(f"compare.baseline '{baseline}' has no predictions (have: {sorted(predictions)})")
    base = predictions[baseline]
    rows: dict[str, dict] = {}
    for name in sorted(predictions):
        m = metrics[name]
        row = {k: m[k] for k in ("test_accuracy", "balanced_accuracy", "macro_f1") if k in m}
        if name != baseline:
            gains = {}
            for metric in ("accuracy", "macro_f1"):
                g = paired_bootstrap_gain(
                    y_true,
                    predictions[name],
                    base,
                    metric=metric,
                    n_bootstrap=n_bootstrap,
                    confidence=confidence,
                    seed=seed,
                )
                gains[metric] = {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high", "p_value_gain_le_0")}
            row[f"gain_vs_{baseline}"] = gains
            row["verdict"] = verdict(gains["accuracy"]["ci_low"], gains["accuracy"]["ci_high"])
        rows[name] = row
    ranking = sorted(rows, key=lambda n: (-rows[n]["test_accuracy"], n))
    return {
        "baseline": baseline,
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "strategies": rows,
        "ranking": ranking,
        "best_strategy": ranking[0],
    }

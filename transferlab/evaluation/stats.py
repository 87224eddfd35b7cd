"""One macro-F1 and one bootstrap of a gain, for every number that compares two models.

* `macro_f1` / `macro_f1_rows`: per-class F1 = 2 TP / (2 TP + FP + FN), averaged over ALL `num_classes`
  classes, a class with no true and no predicted sample scoring 0: sklearn's
  ``f1_score(average="macro", labels=range(C), zero_division=0)``, the `macro_f1` evaluate@ reports. (sklearn's
  default, the mean over the labels present, would change the number of classes averaged from one bootstrap
  resample to the next whenever a rare class drops out of it.)
* `paired_bootstrap_gain`: the gain of model A over model B on one test set with a percentile interval.
  Each replicate resamples the test samples (paired: the same samples for both models) and, when a model
  has several training seeds, that model's seeds with replacement, independently per model; with one seed
  per model it is the paired test-sample bootstrap (Efron & Tibshirani, "An Introduction to the
  Bootstrap", 1993; Koehn, EMNLP 2004; Berg-Kirkpatrick et al., EMNLP 2012). Used by the comparison
  (metrics/summary.json), the diagnosis and `transferlab review`.

Labels may be non-negative integers (class indices, used as they are: C = the largest + 1) or any other
comparable values (strings: C = the distinct values seen in the truth and the predictions).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from transferlab.core.resampling import BLOCK_ELEMENTS, bootstrap_draws, percentile_interval

__all__ = ["labels_1d", "macro_f1", "macro_f1_rows", "paired_bootstrap_gain", "to_numpy"]

METRICS = ("accuracy", "macro_f1")


# --------------------------------------------------------------------------------------------------
# input checks (shared with diagnosis.measures)
# --------------------------------------------------------------------------------------------------


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_no_nan(arr: np.ndarray, name: str) -> None:
    """Raise ValueError when `arr` holds NaN (or None, in an object array)."""
    if arr.dtype.kind in "fc":
        if np.isnan(arr).any():
            raise ValueError(f"{name} contains NaN values")
    elif arr.dtype.kind == "O":
        for v in arr.ravel():
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"{name} contains NaN values")
            if v is None:
                raise ValueError(f"{name} contains None values")


def labels_1d(value: Any, name: str) -> np.ndarray:
    """`value` as a non-empty 1-D label array without NaN/None.

    Raises:
        ValueError: not 1-D, empty, or holding NaN/None; the message names `name`.
    """
    arr = to_numpy(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    check_no_nan(arr, name)
    return arr


def _prediction_rows(value: Any, name: str, n: int) -> np.ndarray:
    arr = to_numpy(value)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be (n,) or (seeds, n) predicted labels, got shape {arr.shape}")
    if arr.shape[1] != n:
        raise ValueError(
            f"{name} has {arr.shape[1]} predictions per seed and y_true {n} labels: they must have the same length"
        )
    check_no_nan(arr, name)
    return arr


def _class_codes(y: np.ndarray, *preds: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], int]:
    """(y codes, prediction codes, C): non-negative integer labels as they are (C = largest + 1), others
    replaced by their rank among the distinct values seen (C = how many)."""
    arrays = [y, *preds]
    if all(a.dtype.kind in "biu" for a in arrays) and min(int(a.min()) for a in arrays) >= 0:
        codes = [a.astype(np.int64, copy=False) for a in arrays]
        return codes[0], codes[1:], max(int(a.max()) for a in arrays) + 1
    try:
        classes, flat = np.unique(np.concatenate([a.ravel() for a in arrays]), return_inverse=True)
    except TypeError as exc:  # mixed, unorderable label types
        raise ValueError(f"labels of y_true and the predictions cannot be compared: {exc}") from exc
    flat = flat.reshape(-1).astype(np.int64)
    out, start = [], 0
    for a in arrays:
        out.append(flat[start : start + a.size].reshape(a.shape))
        start += a.size
    return out[0], out[1:], len(classes)


# --------------------------------------------------------------------------------------------------
# macro F1
# --------------------------------------------------------------------------------------------------


def macro_f1_rows(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 of every row of two (b, n) matrices of class indices in ``[0, num_classes)``.

    Per class F1 = 2 TP / (n_true + n_pred) (= 2 TP / (2 TP + FP + FN)); a class with neither true nor
    predicted samples in the row scores 0; the mean is over all `num_classes` classes: sklearn's
    ``f1_score(y, p, average="macro", labels=range(num_classes), zero_division=0)`` for each row.

    Returns:
        (b,) float64.
    """
    b = y_true.shape[0]
    offsets = (np.arange(b, dtype=np.int64) * num_classes)[:, None]
    flat_true = (y_true + offsets).ravel()
    flat_pred = (y_pred + offsets).ravel()
    size = b * num_classes
    n_true = np.bincount(flat_true, minlength=size).reshape(b, num_classes)
    n_pred = np.bincount(flat_pred, minlength=size).reshape(b, num_classes)
    hits = (y_true == y_pred).ravel()
    tp = np.bincount(flat_true[hits], minlength=size).reshape(b, num_classes)
    denom = n_true + n_pred
    f1 = np.divide(2.0 * tp, denom, out=np.zeros((b, num_classes)), where=denom > 0)
    return f1.mean(axis=1)


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Macro F1 over all classes (see `macro_f1_rows`) of one prediction.

    Args:
        y_true, y_pred: 1-D labels of the same length.
        num_classes: C for class indices; default: from the labels (see the module docstring).
    """
    y = labels_1d(y_true, "y_true")
    p = _prediction_rows(y_pred, "y_pred", len(y))
    y_c, (p_c,), c = _class_codes(y, p)
    if num_classes is not None and num_classes < c:
        raise ValueError(f"num_classes={num_classes} is below the {c} classes the labels hold")
    return float(macro_f1_rows(y_c[None, :], p_c, num_classes or c)[0])


# --------------------------------------------------------------------------------------------------
# the paired bootstrap
# --------------------------------------------------------------------------------------------------


def _scores(y: np.ndarray, rows: np.ndarray, metric: str, num_classes: int) -> np.ndarray:
    """metric of every prediction row ``(..., n)`` against the truth ``(..., n)`` (broadcast)."""
    if metric == "accuracy":
        return (rows == y).mean(axis=-1)
    y_rows = np.broadcast_to(y, rows.shape).reshape(-1, rows.shape[-1])
    return macro_f1_rows(y_rows, rows.reshape(-1, rows.shape[-1]), num_classes).reshape(rows.shape[:-1])


def _replicates(
    y: np.ndarray, pred: np.ndarray, idx: np.ndarray, seeds: np.ndarray, metric: str, num_classes: int
) -> np.ndarray:
    """One model's seed-averaged metric in each replicate of a block: samples `idx` (m, n), seeds (m, k)."""
    rows = pred[seeds[:, :, None], idx[:, None, :]]  # (m, k, n)
    truth = y[idx][:, None, :]
    if metric == "accuracy":
        # The correct fraction over all (seed, sample) pairs: an exact count over k * n, whatever the order.
        return (rows == truth).mean(axis=(1, 2))
    return _scores(truth, rows, metric, num_classes).mean(axis=1)


def paired_bootstrap_gain(
    y_true: Any,
    pred_a: Any,
    pred_b: Any,
    *,
    metric: Literal["accuracy", "macro_f1"] = "accuracy",
    n_bootstrap: int,
    confidence: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> dict[str, float]:
    """Gain of model A over model B on one test set, with a paired bootstrap over test samples and seeds.

    Replicate by replicate, from one ``np.random.default_rng(seed)``: n test indices with replacement, then
    (when `resample_seeds`) k_a of A's seeds and k_b of B's seeds with replacement (`core.resampling
    .bootstrap_draws` over the axes (n, k_a, k_b)); a model's replicate metric is the mean over its drawn
    seeds of the metric on the drawn samples (accuracy: the correct fraction over all drawn (seed, sample)
    pairs). With one seed per model it is the paired test-sample bootstrap.

    Args:
        y_true: (n,) true labels.
        pred_a, pred_b: (n,) or (k, n) predicted labels, one row per training seed, columns aligned on the
            test samples of `y_true`.
        metric: "accuracy" or "macro_f1" (`macro_f1_rows`: over all classes).
        n_bootstrap: replicates (>= 1).
        confidence: coverage of the percentile interval, in (0, 1).
        seed: the generator's seed; the result is deterministic for a seed.
        resample_seeds: False keeps every replicate's seeds fixed (each model's mean over all its seeds).

    Returns:
        ``{"gain", "ci_low", "ci_high", "prob_gain_le_0", "seed_sd_a", "seed_sd_b"}``: the seed-averaged gain
        on all samples, the percentile interval of the replicates, the fraction of replicates whose gain is
        <= 0 (the bootstrap probability that the gain is not positive, not a p-value), and the metric's
        standard deviation over each model's seeds (0.0 for one seed).

    Raises:
        ValueError: unknown metric, bad n_bootstrap/confidence, y_true not 1-D or empty, predictions whose
            length differs from y_true's, NaN/None labels, labels that cannot be compared.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    y_raw = labels_1d(y_true, "y_true")
    n = len(y_raw)
    y, (a, b), num_classes = _class_codes(
        y_raw, _prediction_rows(pred_a, "pred_a", n), _prediction_rows(pred_b, "pred_b", n)
    )
    ka, kb = len(a), len(b)

    per_a = _scores(y, a, metric, num_classes)
    per_b = _scores(y, b, metric, num_classes)
    gain = float(np.mean(per_a) - np.mean(per_b))

    gains = np.empty(int(n_bootstrap), dtype=np.float64)
    block = max(1, BLOCK_ELEMENTS // (n * max(ka, kb)))
    sizes = (n, ka, kb) if resample_seeds else (n,)
    done = 0
    for draws in bootstrap_draws(n_bootstrap, sizes, seed=seed, block=block):
        idx = draws[0]
        m = len(idx)
        sa = draws[1] if resample_seeds else np.broadcast_to(np.arange(ka), (m, ka))
        sb = draws[2] if resample_seeds else np.broadcast_to(np.arange(kb), (m, kb))
        gains[done : done + m] = _replicates(y, a, idx, sa, metric, num_classes) - _replicates(
            y, b, idx, sb, metric, num_classes
        )
        done += m
    low, high = percentile_interval(gains, confidence)
    return {
        "gain": gain,
        "ci_low": float(low),
        "ci_high": float(high),
        "prob_gain_le_0": float((gains <= 0).mean()),
        "seed_sd_a": float(np.std(per_a, ddof=1)) if ka > 1 else 0.0,
        "seed_sd_b": float(np.std(per_b, ddof=1)) if kb > 1 else 0.0,
    }

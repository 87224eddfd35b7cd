"""One macro-F1 and one interval for a gain, for every number that compares two models.

* `macro_f1` / `macro_f1_rows`: per-class F1 = 2 TP / (2 TP + FP + FN), averaged over ALL `num_classes`
  classes, a class with no true and no predicted sample scoring 0: sklearn's
  ``f1_score(average="macro", labels=range(C), zero_division=0)``, the `macro_f1` evaluate@ reports. (sklearn's
  default, the mean over the labels present, would change the number of classes averaged from one bootstrap
  resample to the next whenever a rare class drops out of it.)
* `paired_bootstrap_gain`: the gain of model A over model B on one test set, averaged over each model's
  training seeds, with an interval that covers two sources of noise (`INTERVAL_METHOD`, method "seed_t"):

  1. the test samples: the paired test-sample bootstrap of the seed-averaged gain, every seed kept in every
     replicate (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993; Koehn, EMNLP 2004;
     Berg-Kirkpatrick et al., EMNLP 2012);
  2. the training seeds: a Student-t term with standard error ``sqrt(s_A^2 / k_A + s_B^2 / k_B)`` (s: the
     standard deviation of the metric over a model's k seeds, ddof=1) and the Welch-Satterthwaite degrees
     of freedom ``(sum V)^2 / sum(V^2 / (k - 1))``, V = s^2 / k (Welch, Biometrika 1947).

  The interval is the percentile interval of their sum, the bootstrap replicates plus the scaled t
  (computed exactly, as a mixture of t CDFs, with no second random draw), and never narrower than the
  test-sample interval alone. Why not resample the seeds too (method "seed_bootstrap", what this module did
  before): resampling k seeds with replacement estimates the variance of their mean as (k-1)/k of the
  unbiased one, half of it with the default 2 seeds (one draw in two takes the same seed twice), and the
  percentile interval uses normal-like quantiles where k - 1 degrees of freedom need Student's. Simulated
  with seed spreads like the default run's (tests/test_coverage.py: 2,000 test samples, seed SDs of 0.5 to 2
  points, 2 or 3 seeds per model), the old nominal 95% interval covered the true gain 82-98% of the time
  (worst: lora's 2-point spread with 2 seeds) and called a null change "beyond noise" up to 18% of the time;
  this one covered 96.5-99.3% and raised 0.7-3.5% false alarms. The price of honesty with 2 seeds: the seed
  term has 1 to 2 degrees of freedom (t quantiles 4.3 to 12.7), so the interval is several times wider than
  the old one where the seed spread is large; a third seed narrows it most. Its conservative side: the
  seeds' disagreement on individual test samples enters both terms (the per-seed metrics' spread includes
  it), and Welch's df errs low with 2 seeds, so with few seeds it covers more than the nominal level.

  With one seed on a side there is no seed-to-seed variance to estimate for that side. The interval then
  carries the other side's seed term only (or none), says so (``covers_seed_variance`` False; with
  ``describe=True`` the words "not estimable (1 seed ...)") and is NOT widened by a guessed spread: a reader
  must not take it for an interval over training runs.

  Used by the comparison (metrics/summary.json), the diagnosis and `transferlab review`.

Labels may be non-negative integers (class indices, used as they are: C = the largest + 1) or any other
comparable values (strings: C = the distinct values seen in the truth and the predictions).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from transferlab.core.resampling import BLOCK_ELEMENTS, bootstrap_draws, percentile_interval

__all__ = [
    "INTERVAL_METHOD",
    "INTERVAL_METHODS",
    "labels_1d",
    "macro_f1",
    "macro_f1_rows",
    "paired_bootstrap_gain",
    "seed_component",
    "to_numpy",
    "widened_interval",
]

METRICS = ("accuracy", "macro_f1")

# One line per interval method, for reports to quote (`paired_bootstrap_gain(..., describe=True)["method"]`).
INTERVAL_METHODS = {
    "seed_t": (
        "paired test-sample bootstrap (every seed kept) plus a Student-t seed term: "
        "SE^2 = s_A^2/k_A + s_B^2/k_B over the models' seeds, Welch-Satterthwaite df"
    ),
    "seed_bootstrap": (
        "two-stage bootstrap: test samples, then each model's seeds with replacement "
        "(under-covers with few seeds; superseded by seed_t)"
    ),
}
INTERVAL_METHOD = INTERVAL_METHODS["seed_t"]


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


def seed_component(per_a: np.ndarray, per_b: np.ndarray) -> tuple[float, float]:
    """The seed term of a gain's interval: (standard error, Welch-Satterthwaite degrees of freedom).

    ``se^2 = sum V``, ``df = (sum V)^2 / sum(V^2 / (k - 1))`` with ``V = s^2 / k`` over the sides with at least
    two seeds (s: the metric's standard deviation over that side's seeds, ddof=1). A side with one seed adds
    nothing: its seed variance is not estimable (the caller flags it). When every V is 0 the df is undefined
    and does not matter (the term is 0); it is then reported as the pooled ``sum(k - 1)``.

    Args:
        per_a, per_b: the metric of each seed of A and of B, on all test samples.

    Returns:
        (se, df); (0.0, 0.0) when neither side has two seeds.
    """
    sides = [np.asarray(p, dtype=np.float64) for p in (per_a, per_b) if len(p) > 1]
    if not sides:
        return 0.0, 0.0
    # Equal values have variance 0, not the ~1e-33 their rounded mean would leave.
    v = np.array([np.var(p, ddof=1) / len(p) if np.ptp(p) > 0 else 0.0 for p in sides])
    dof = np.array([len(p) - 1.0 for p in sides])
    total = float(v.sum())
    if total <= 0.0:
        return 0.0, float(dof.sum())
    return math.sqrt(total), float(total**2 / np.sum(v**2 / dof))


def widened_interval(
    replicates: np.ndarray, seed_se: float, seed_df: float, confidence: float
) -> tuple[float, float, float]:
    """Percentile interval of ``G + seed_se * T``: G the bootstrap replicates (their empirical distribution),
    T an independent Student t with `seed_df` degrees of freedom.

    The distribution of the sum is the mixture ``H(x) = mean_r F_t((x - g_r) / seed_se)``; its quantiles are
    found by bisection to 1e-13 (deterministic: no second random draw). The result is widened, if needed, to
    contain the percentile interval of G alone (`core.resampling.percentile_interval`), so adding the seed
    term never narrows the interval. With ``seed_se == 0`` it is exactly that interval.

    Args:
        replicates: (R,) bootstrap replicates of the gain over test samples.
        seed_se, seed_df: the seed term (`seed_component`).
        confidence: coverage, in (0, 1).

    Returns:
        (low, high, prob_le_0): the interval and ``H(0)``, the probability of a gain <= 0 under the sum
        (with ``seed_se == 0``: the fraction of replicates <= 0).
    """
    from scipy.special import stdtr, stdtrit

    g = np.asarray(replicates, dtype=np.float64)
    low, high = (float(v) for v in percentile_interval(g, confidence))
    if seed_se <= 0.0:
        return low, high, float((g <= 0).mean())
    alpha = 1.0 - float(confidence)
    targets = np.array([alpha / 2.0, 1.0 - alpha / 2.0])
    t_q = stdtrit(seed_df, targets)
    # H(min g + se * t_q) <= q <= H(max g + se * t_q): every term of the mixture is below / above q there.
    lo, hi = g.min() + seed_se * t_q, g.max() + seed_se * t_q
    for _ in range(200):
        if np.all(hi - lo <= 1e-13):
            break
        mid = (lo + hi) / 2.0
        below = stdtr(seed_df, (mid[:, None] - g[None, :]) / seed_se).mean(axis=1) < targets
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    q_low, q_high = (lo + hi) / 2.0
    prob = float(stdtr(seed_df, -g / seed_se).mean())
    return min(low, float(q_low)), max(high, float(q_high)), prob


def _seed_variance_words(ka: int, kb: int, resample_seeds: bool, method: str, seed_df: float) -> str:
    """How the training seeds enter the interval, in words (the "seed_variance" of `describe`)."""
    if not resample_seeds:
        return "not in the interval (seeds held fixed)"
    single = [side for side, k in (("A", ka), ("B", kb)) if k == 1]
    if len(single) == 2:
        return "not estimable (1 seed per model): the interval covers test samples only"
    if single:
        return f"not estimable for {single[0]} (1 seed): the interval leaves out {single[0]}'s seed-to-seed variance"
    if method == "seed_bootstrap":
        return f"resampled ({ka} and {kb} seeds with replacement)"
    return f"estimated from {ka} and {kb} seeds (Student t, {seed_df:.2f} Welch df)"


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
    method: Literal["seed_t", "seed_bootstrap"] = "seed_t",
    describe: bool = False,
) -> dict[str, Any]:
    """Gain of model A over model B on one test set, with an interval over test samples and training seeds.

    method "seed_t" (the default; the module docstring says why): replicate by replicate, from one
    ``np.random.default_rng(seed)``, n test indices with replacement (`core.resampling.bootstrap_draws` over the
    axis (n,)); a model's replicate metric is the mean over ALL its seeds of the metric on the drawn samples
    (accuracy: the correct fraction over all (seed, sample) pairs). The interval is the percentile interval of
    those replicates plus a Student-t seed term (`seed_component`, `widened_interval`).

    method "seed_bootstrap" (before: under-covers with few seeds; kept to reproduce old numbers and to show the
    difference): each replicate also draws k_a of A's seeds and k_b of B's seeds with replacement (axes
    (n, k_a, k_b)) and the interval is the percentile interval of the replicates.

    With one seed per model both are the paired test-sample bootstrap.

    Args:
        y_true: (n,) true labels.
        pred_a, pred_b: (n,) or (k, n) predicted labels, one row per training seed, columns aligned on the
            test samples of `y_true`.
        metric: "accuracy" or "macro_f1" (`macro_f1_rows`: over all classes).
        n_bootstrap: replicates (>= 1).
        confidence: coverage of the interval, in (0, 1).
        seed: the generator's seed; the result is deterministic for a seed.
        resample_seeds: False leaves the seeds out of the interval (each model's mean over all its seeds, test
            samples resampled): the test-sample interval of these very seeds.
        method: "seed_t" or "seed_bootstrap" (see above; `INTERVAL_METHODS`).
        describe: also return the strings "method" (`INTERVAL_METHODS[method]`) and "seed_variance" (in words:
            how the seeds enter, or "not estimable (1 seed ...)"). Off by default: callers that round every
            value with ``float()`` keep working.

    Returns:
        ``{"gain", "ci_low", "ci_high", "prob_gain_le_0", "seed_sd_a", "seed_sd_b", "bootstrap_se", "seed_se",
        "seed_df", "seeds_a", "seeds_b", "covers_seed_variance"}``: the seed-averaged gain on all samples; the
        interval; the probability that the gain is <= 0 under the interval's distribution (not a p-value);
        the metric's standard deviation over each model's seeds (0.0 for one seed); the standard deviation of
        the bootstrap replicates; the seed term's standard error and Welch df (0.0 when not used: method
        "seed_bootstrap", ``resample_seeds=False`` or one seed per model); the seed counts; and whether the
        seed-to-seed variance of BOTH models is in the interval (False when a model has one seed or seeds are
        held fixed). Numbers and one bool; with `describe` also the two strings.

    Raises:
        ValueError: unknown metric or method, bad n_bootstrap/confidence, y_true not 1-D or empty,
            predictions whose length differs from y_true's, NaN/None labels, labels that cannot be compared.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {sorted(INTERVAL_METHODS)}, got {method!r}")
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

    draw_seeds = resample_seeds and method == "seed_bootstrap"
    gains = np.empty(int(n_bootstrap), dtype=np.float64)
    block = max(1, BLOCK_ELEMENTS // (n * max(ka, kb)))
    sizes = (n, ka, kb) if draw_seeds else (n,)
    done = 0
    for draws in bootstrap_draws(n_bootstrap, sizes, seed=seed, block=block):
        idx = draws[0]
        m = len(idx)
        sa = draws[1] if draw_seeds else np.broadcast_to(np.arange(ka), (m, ka))
        sb = draws[2] if draw_seeds else np.broadcast_to(np.arange(kb), (m, kb))
        gains[done : done + m] = _replicates(y, a, idx, sa, metric, num_classes) - _replicates(
            y, b, idx, sb, metric, num_classes
        )
        done += m

    seed_term = resample_seeds and method == "seed_t"
    seed_se, seed_df = seed_component(per_a, per_b) if seed_term else (0.0, 0.0)
    if draw_seeds:
        low, high = percentile_interval(gains, confidence)
        prob = float((gains <= 0).mean())
    else:
        low, high, prob = widened_interval(gains, seed_se, seed_df, confidence)
    out: dict[str, Any] = {
        "gain": gain,
        "ci_low": float(low),
        "ci_high": float(high),
        "prob_gain_le_0": prob,
        "seed_sd_a": float(np.std(per_a, ddof=1)) if ka > 1 else 0.0,
        "seed_sd_b": float(np.std(per_b, ddof=1)) if kb > 1 else 0.0,
        "bootstrap_se": float(np.std(gains, ddof=1)) if len(gains) > 1 else 0.0,
        "seed_se": seed_se,
        "seed_df": seed_df,
        "seeds_a": ka,
        "seeds_b": kb,
        "covers_seed_variance": bool(resample_seeds and ka > 1 and kb > 1),
    }
    if describe:
        out["method"] = INTERVAL_METHODS[method]
        out["seed_variance"] = _seed_variance_words(ka, kb, resample_seeds, method, seed_df)
    return out

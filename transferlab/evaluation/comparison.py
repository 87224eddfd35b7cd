"""Every strategy against scratch AND against the best model without transfer: the numbers a pull request's
`dvc metrics diff` is about, the headline and the recommendation.

* Two references. `gain_vs_<compare.baseline>` (scratch: the same architecture from random weights) says what
  the pre-trained weights add to that architecture; `gain_vs_best_non_transfer` says what transfer adds over the
  strongest model that needs no pre-trained weights: scratch or the classical baseline (logistic regression on
  raw pixels / TF-IDF), whichever is better on VALIDATION (`best_non_transfer`). A scratch model that is below a
  linear model on pixels flatters every transfer gain; the headline, the recommendation's reason and the
  report use the second reference.
* The interval of a gain covers test samples AND training seeds: each bootstrap replicate resamples the
  test samples (paired: the same samples for both sides) and, independently for each side, its training
  seeds (with replacement), then compares the seed-averaged metric (`stats.paired_bootstrap_gain`, the
  project's one bootstrap; macro F1 over all classes, `stats.macro_f1_rows`). With one seed (the classical
  baseline) that side contributes only the test-sample resampling.
* A verdict needs trustworthy inputs: when either side's training failed or hit its epoch cap before a
  validation plateau, the verdict is "inconclusive (training failed)" / "inconclusive (under-trained)",
  never better / worse.
* The recommendation is the best model on the VALIDATION split, the classical baseline and scratch included;
  the test split only reports its result.
* Equal compute, on validation curves, against scratch only (the classical baseline has no training curve):
  the accuracy scratch had reached at the compute where a strategy converged, and the compute scratch needed
  to reach that strategy's accuracy (or "not reached").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core import layout
from transferlab.core.io import read_json
from transferlab.evaluation.stats import INTERVAL_METHOD, paired_bootstrap_gain
from transferlab.params import BaselineParams, CompareParams, TrainParams
from transferlab.training.rules import (
    BEST_EPOCH_RULE,
    CONVERGENCE_RULE,
    LR_CHOICE_RULE,
    TRAINING_COMPUTE_RULE,
    best_row,
)

INTERVAL_COVERS = (
    "test samples (paired bootstrap, every seed kept) and training seeds (a Student-t term on the seed-to-seed "
    "spread, Welch degrees of freedom: wide with 2 seeds a side)"
)


CLASSICAL_NAMES = {
    "raw_pixel_logreg": "logistic regression on raw pixels",
    "tfidf_logreg": "logistic regression on TF-IDF",
}
# The key of every gain against the reference chosen on validation (`best_non_transfer`).
BEST_NON_TRANSFER = "best_non_transfer"
GAIN_VS_BEST = f"gain_vs_{BEST_NON_TRANSFER}"


def describe(classical: str) -> str:
    """The classical baseline in words."""
    return CLASSICAL_NAMES.get(classical, classical)


def _pp(g: dict) -> str:
    """'+3.5 pp [+1.3, +5.6]': a gain and its interval in percentage points."""
    return f"{100 * g['gain']:+.1f} pp [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def _rounded(g: dict) -> dict:
    """A bootstrap result with its numbers rounded for the metrics file (other fields, e.g. a method name, kept)."""
    return {
        k: round(float(v), 6) if isinstance(v, int | float | np.number) and not isinstance(v, bool) else v
        for k, v in g.items()
    }


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


def best_non_transfer(
    val_accuracy: dict[str, float],
    trusted: dict[str, bool],
    candidates: dict[str, str],
    *,
    train_gflops: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The strongest model without transfer, chosen on VALIDATION: the reference of the headline gains.

    The order is the recommendation's (`recommend`): models whose training can be trusted first, then the
    higher validation accuracy, then less training compute (the closed-form classical baseline has none), then
    the name. So when the recommendation is a model without transfer, it is also the reference.

    Args:
        val_accuracy: name -> mean best validation accuracy (every candidate's must be there).
        trusted: name -> converged and not failed (a closed-form model is trusted).
        candidates: name -> where its validation accuracy was recorded, in words (e.g. scratch and the
            classical baseline).
        train_gflops: name -> training compute, for exact ties.

    Returns:
        {'name', 'val_accuracy', 'candidates': {name: {'val_accuracy', 'trusted', 'val_accuracy_from'}},
        'reason'}.

    Raises:
        ValueError: no candidate, or a candidate without a validation accuracy.
    """
    missing = sorted(n for n in candidates if n not in val_accuracy)
    if not candidates or missing:
        raise ValueError(
            f"best non-transfer model: candidates {sorted(candidates)} need a validation accuracy "
            f"(missing: {missing}); rerun the train and baseline stages"
        )
    cost = train_gflops or {}
    order = sorted(candidates, key=lambda n: (not trusted.get(n, False), -val_accuracy[n], cost.get(n, 0.0), n))
    name = order[0]
    others = [
        f"{n}'s {val_accuracy[n]:.3f}" + ("" if trusted.get(n, False) else " (not trusted: under-trained or failed)")
        for n in order[1:]
    ]
    reason = f"{name}: validation accuracy {val_accuracy[name]:.3f}" + (
        f" against {', '.join(others)}" if others else " (the only candidate)"
    )
    return {
        "name": name,
        "val_accuracy": round(val_accuracy[name], 6),
        "candidates": {
            n: {
                "val_accuracy": round(val_accuracy[n], 6),
                "trusted": bool(trusted.get(n, False)),
                "val_accuracy_from": candidates[n],
            }
            for n in order
        },
        "reason": reason + "; chosen on the validation split, the test split only reports",
    }


def _val_source(name: str, train: dict | None, metrics: dict) -> str:
    """Where a model's validation accuracy was recorded, in words (the summary says why a reference won)."""
    if train is None:
        c = f"C={metrics['C']:g} " if "C" in metrics else ""
        return f"the classical baseline's {c}chosen on validation (best_val_accuracy_mean of its eval metrics)"
    per_seed = {s: r.get("best_val_accuracy") for s, r in (train.get("per_seed") or {}).items()}
    seeds = ", ".join(f"seed {s}: {v:.3f}" for s, v in per_seed.items() if v is not None)
    return "best validation epoch, mean over seeds (best_val_accuracy_mean of its train metrics" + (
        f"; {seeds})" if seeds else ")"
    )


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
    """The summary table: every model against `baseline` (scratch) and against the best model without
    transfer (scratch or the classical baseline, whichever validates better), the headline and the
    recommendation.

    Args:
        y_true: (n,) test labels, in the column order of every predictions array.
        predictions: name -> (n_seeds, n) predicted labels.
        metrics: name -> that model's evaluate metrics.
        train: name -> its train metrics (None for the closed-form classical baseline).
        histories: name -> per seed, its history rows (for the equal-compute comparison against scratch).
        baseline: the model trained from scratch (`compare.baseline`): the first reference, and a candidate
            for the best model without transfer.
        classical: the classical baseline's name (raw-pixel logistic regression): the other candidate.
        n_val: validation samples (the recommendation's standard error).
        n_bootstrap, confidence, seed: the bootstrap.

    Returns:
        {'baseline', 'best_non_transfer': {name, val_accuracy, candidates, reason}, 'headline', 'confidence',
        'interval_covers', 'strategies': {name: {test_accuracy, macro_f1, balanced_accuracy, seeds,
        per_seed_test_accuracy, converged, training_failed, val_accuracy, gain_vs_<baseline>: {accuracy: {...},
        macro_f1: {...}}, verdict (against <baseline>), gain_vs_best_non_transfer: {reference, accuracy,
        macro_f1, verdict}, equal_compute (against <baseline>)}}, 'ranking_by_val', 'recommendation'}

    Raises:
        KeyError: the baseline has no predictions.
    """
    if baseline not in predictions:
        raise KeyError(f"compare.baseline '{baseline}' has no predictions (have: {sorted(predictions)})")
    rows: dict[str, dict] = {}
    val_accuracy: dict[str, float] = {}
    trusted: dict[str, bool] = {}
    issues: dict[str, str | None] = {}
    for name in sorted(predictions):
        m, t = metrics[name], train.get(name)
        issues[name] = trust(t)
        val_accuracy[name] = float((t or m)["best_val_accuracy_mean"])
        trusted[name] = issues[name] is None
        row: dict[str, Any] = {k: m[k] for k in ("test_accuracy", "balanced_accuracy", "macro_f1") if k in m}
        row["val_accuracy"] = round(val_accuracy[name], 6)
        row["seeds"] = int(len(predictions[name]))
        if "per_seed" in m:
            row["per_seed_test_accuracy"] = {s: r["test_accuracy"] for s, r in m["per_seed"].items()}
        if t is not None:
            row["converged"] = bool(t.get("converged"))
            row["training_failed"] = bool(t.get("training_failed"))
            row["lr"] = t.get("lr")
        rows[name] = row

    gains_cache: dict[tuple[str, str], dict] = {}

    def gains(a: str, b: str) -> dict:
        """Accuracy and macro-F1 gain of `a` over `b` (the one bootstrap; computed once per pair)."""
        if (a, b) not in gains_cache:
            gains_cache[a, b] = {
                metric: _rounded(
                    paired_bootstrap_gain(
                        y_true,
                        predictions[a],
                        predictions[b],
                        metric=metric,
                        n_bootstrap=n_bootstrap,
                        confidence=confidence,
                        seed=seed,
                    )
                )
                for metric in ("accuracy", "macro_f1")
            }
        return gains_cache[a, b]

    def judged(a: str, b: str, g: dict) -> str:
        """The verdict of `a` against `b`; none when either side's training cannot be trusted."""
        blocker = issues[a] or issues[b]
        if blocker:
            return f"inconclusive ({blocker}: {a if issues[a] else b})"
        return verdict(g["accuracy"]["ci_low"], g["accuracy"]["ci_high"])

    gflops = {n: float((t or {}).get("train_gflops_mean", 0.0)) for n, t in train.items()}
    non_transfer = {n: _val_source(n, train.get(n), metrics[n]) for n in (baseline, classical) if n in predictions}
    reference = best_non_transfer(val_accuracy, trusted, non_transfer, train_gflops=gflops)
    ref = reference["name"]
    for name, row in rows.items():
        if name != baseline:
            g = gains(name, baseline)
            row[f"gain_vs_{baseline}"] = g
            row["verdict"] = judged(name, baseline, g)
            if name in histories and baseline in histories:
                row["equal_compute"] = equal_compute(histories[name], histories[baseline])
        if name != ref:
            g = gains(name, ref)
            row[GAIN_VS_BEST] = {"reference": ref, **g, "verdict": judged(name, ref, g)}

    rec = recommend(val_accuracy, trusted, classical, n_val=n_val, train_gflops=gflops)
    choice = rec.get("choice")
    rec["reference"] = ref
    rec["transfer_wins"] = choice is not None and choice not in non_transfer
    if choice is not None:
        rec["test_accuracy"] = rows[choice]["test_accuracy"]
    headline = _headline(rec, rows, reference, non_transfer, val_accuracy, trusted, baseline, confidence)
    rec["reason"] = _reason(rec, rows, headline, baseline, confidence)
    return {
        "baseline": baseline,
        BEST_NON_TRANSFER: reference,
        "headline": headline,
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "interval_covers": INTERVAL_COVERS,
        "strategies": rows,
        "ranking_by_val": sorted(rows, key=lambda n: (-val_accuracy[n], n)),
        "recommendation": rec,
    }


def _name(model: str, baseline: str) -> str:
    """A model in words: the classical baseline described, scratch named as such."""
    if model == baseline:
        return f"{model} (the same architecture from random weights)"
    return describe(model)


def _headline(
    rec: dict,
    rows: dict[str, dict],
    reference: dict,
    non_transfer: dict[str, str],
    val_accuracy: dict[str, float],
    trusted: dict[str, bool],
    baseline: str,
    confidence: float,
) -> dict[str, Any]:
    """What to use, by how much and how sure, against the best model without transfer.

    The model is the recommendation when it is a transfer strategy; when a model without transfer is
    recommended, the best transfer strategy on validation (so the reader sees by how much transfer falls
    short). Returns {'model', 'recommended', 'reference', 'test_accuracy_gain': {gain, ci_low, ci_high,
    prob_gain_le_0} over the reference, 'verdict', 'gain_vs_<baseline>': {gain, ci_low, ci_high}, 'text'}.
    """
    ref = reference["name"]
    pct = round(confidence * 100)
    choice = rec.get("choice")
    transfer = sorted(
        (n for n in rows if n not in non_transfer), key=lambda n: (not trusted.get(n, False), -val_accuracy[n], n)
    )
    model = choice if rec.get("transfer_wins") else (transfer[0] if transfer else None)
    out: dict[str, Any] = {"model": model, "recommended": model is not None and model == choice, "reference": ref}
    if model is None:
        out["text"] = "no transfer strategy to judge" if choice is not None else "no recommendation"
        return out
    row = rows[model]
    g = row[GAIN_VS_BEST]
    keep = ("gain", "ci_low", "ci_high", "prob_gain_le_0", "method")  # the rest stays in the model's row
    out["test_accuracy_gain"] = {k: g["accuracy"][k] for k in keep if k in g["accuracy"]}
    out["verdict"] = g["verdict"]
    vs_scratch = row.get(f"gain_vs_{baseline}")
    if vs_scratch and ref != baseline:
        out[f"gain_vs_{baseline}"] = {k: vs_scratch["accuracy"][k] for k in ("gain", "ci_low", "ci_high")}
    others = [n for n in reference["candidates"] if n != ref]
    why = (
        f"the best model without transfer on validation ({val_accuracy[ref]:.1%} against "
        + ", ".join(f"{n}'s {val_accuracy[n]:.1%}" for n in others)
        + ")"
        if others
        else "the model without transfer"
    )
    side = {"better": "beyond noise", "worse": "worse beyond noise", "inconclusive": "within noise"}.get(
        g["verdict"], g["verdict"]
    )
    gain_txt = f"{_pp(g['accuracy'])} test accuracy ({pct}% CI) over {_name(ref, baseline)}, {why}: {side}"
    if out["recommended"]:
        text = f"Use {model}: {gain_txt}"
        if f"gain_vs_{baseline}" in out:
            text += f". Against {baseline}: {_pp(out[f'gain_vs_{baseline}'])}"
    elif choice is not None:
        text = (
            f"Use {_name(choice, baseline)}: no transfer strategy beats it on validation; the best one, {model} "
            f"({val_accuracy[model]:.1%} on validation), is {gain_txt}"
        )
    else:
        text = f"No recommendation (no model can be trusted); {model}: {gain_txt}"
    out["text"] = text
    return out


def _reason(rec: dict, rows: dict[str, dict], headline: dict, baseline: str, confidence: float) -> str:
    choice = rec.get("choice")
    if choice is None:
        return (
            f"no model converged without failing ({', '.join(rec['excluded'])}): raise train.epochs, check the "
            "diagnosis' failed-training findings, and run again"
        )
    ref = rec["reference"]
    pct = round(confidence * 100)
    close = rec.get("within_noise_of_best") or []
    best_transfer = headline.get("model")
    against = (
        f"; on test, {best_transfer} against it: {_pp(headline['test_accuracy_gain'])} ({pct}% CI, "
        f"{headline['verdict']})"
        if best_transfer and "test_accuracy_gain" in headline
        else ""
    )
    extra = (
        f" (best transfer model on validation: {best_transfer}, {rows[best_transfer]['val_accuracy']:.3f})"
        if best_transfer
        else ""
    )
    if rec["classical_baseline_wins"]:
        note = f"; within one standard error on validation: {', '.join(close)}" if close else ""
        return (
            f"use the baseline; transfer does not pay here: {describe(choice)} validates best"
            f"{extra}, and it needs no pre-trained weights, no GPU and milliseconds per image{against}{note}"
        )
    if not rec["transfer_wins"]:
        note = f"; within one standard error on validation: {', '.join(close)}" if close else ""
        return (
            f"use {choice}; transfer does not pay here: {_name(choice, baseline)} validates best{extra}{against}{note}"
        )
    head = f"{choice}: best validation accuracy ({rec['val_accuracy']:.3f}) among converged models"
    if "test_accuracy_gain" in headline:
        head += (
            f"; on test, against the best model without transfer ({_name(ref, baseline)}, chosen on validation): "
            f"{_pp(headline['test_accuracy_gain'])} ({pct}% CI, {headline['verdict']})"
        )
    if close:
        head += f"; within one standard error ({rec['val_standard_error']:.3f}) of it on validation: " + ", ".join(
            close
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
    """The protocol behind every number of the summary, with the rules quoted in full (the report prints it)."""
    tp, cp = train, compare
    return (
        f"Every model: learning rate chosen on the validation split from {list(tp.lr_grid)} x its configured "
        f"rate ({tp.lr_search_epochs} epochs per rate unless the strategy sets its own search budget, first seed). "
        f"{LR_CHOICE_RULE} Then one run per seed {list(tp.seeds)}: a linear warm-up, then reduce-on-plateau "
        f"with early stopping after {tp.patience} epochs without a validation gain (cap {tp.epochs}), or, where a "
        "strategy sets `schedule: cosine` (scratch does), warm-up and cosine decay over its whole epoch budget. "
        f"{BEST_EPOCH_RULE} {CONVERGENCE_RULE} An under-trained run gets no verdict. {TRAINING_COMPUTE_RULE} "
        f"The classical baseline ({describe(baseline.model)})'s C is chosen on validation from "
        f"{list(baseline.C_grid)}. Every gain is reported against {cp.baseline} and against the best model without "
        f"transfer ({cp.baseline} or the classical baseline, whichever is better on validation); the headline uses "
        "the latter. The recommendation is the best model on validation, both of them included. The test split is "
        f"used only to report. Intervals ({round(cp.confidence * 100)}%, {cp.n_bootstrap} replicates): "
        f"{INTERVAL_METHOD}."
    )


@dataclass(frozen=True)
class Comparison:
    """The compare stage's results."""

    summary: dict  # compare_to_baseline's table, with the protocol (metrics/summary.json)
    gain_rows: list[dict]  # per compared row, against scratch and the best model without transfer (plots/gain.csv)
    compute_curves: list[dict]  # name, seed, epoch, train_gflops, val_accuracy (plots/compute.csv)


def gain_rows(summary: dict) -> list[dict]:
    """The rows of plots/gain.csv: one per model compared with scratch (`summary['baseline']`).

    `gain`, `ci_low`, `ci_high`, `verdict`: test accuracy against scratch (the columns dvc.yaml's bar plot
    draws, unchanged); `reference` and the `..._vs_best_non_transfer` columns: against the best model without
    transfer, empty on the reference's own row.
    """
    key = f"gain_vs_{summary['baseline']}"
    out = []
    for n, r in summary["strategies"].items():
        if key not in r:
            continue
        row = {"name": n, **{k: r[key]["accuracy"][k] for k in ("gain", "ci_low", "ci_high")}, "verdict": r["verdict"]}
        best = r.get(GAIN_VS_BEST)
        row["reference"] = summary[BEST_NON_TRANSFER]["name"]
        for k in ("gain", "ci_low", "ci_high"):
            row[f"{k}_vs_{BEST_NON_TRANSFER}"] = best["accuracy"][k] if best else None
        row[f"verdict_vs_{BEST_NON_TRANSFER}"] = best["verdict"] if best else None
        out.append(row)
    return out


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
    rows = gain_rows(summary)
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
    return Comparison(summary, rows, curves)

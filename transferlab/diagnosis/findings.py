"""Findings: what went wrong in a transfer, measured on every training seed, graded with an interval, each with
its evidence, a status, a severity and a remedy.

A grade compares a measured quantity and its interval with a threshold (`grade`): "flagged" when the whole
interval is on the problem's side, "ok" when it is wholly on the other side, "undetermined" when it straddles
the threshold (never ok, never a warning). One function per problem turns measurements (from `measures`) into
findings: negative transfer (read from the comparison's summary, so the report and the diagnosis cannot
disagree), catastrophic forgetting (exact for in-pipeline sources, by proxy for ImageNet ones), domain shift,
learning-rate sensitivity, over-fitting and failed training. A remedy re-measures the flagged quantity under the
pipeline's protocol and is re-graded against the same threshold (`remedy_verdict`); comparing two models that
already exist is `evidence`, not a remedy (`remedy_result(kind="evidence")`). The checks in
`transferlab.diagnosis.checks` call them; `reporting.diagnosis_md.to_markdown` writes the report.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.core.device import as_device
from transferlab.diagnosis.measures import (
    bn_gap_interval,
    linear_cka,
    mmd_permutation_test,
    prediction_agreement,
    proxy_a_distance,
    train_val_gap,
    weight_drift,
)
from transferlab.evaluation.stats import paired_bootstrap_gain
from transferlab.models.inference import to_input
from transferlab.models.sources import block_groups
from transferlab.training.loop import training_failure

STATUSES = ("ok", "undetermined", "flagged")
# Worst last: `summarize` reports the worst; "undetermined" ranks above ok and below a flagged warning.
SEVERITIES = ("ok", "info", "undetermined", "warning", "critical")
OUTCOMES = ("resolved", "improved", "no clear effect", "trade-off", "worse")
REMEDY_KINDS = ("remedy", "evidence")
# The report's order of finding types; a type not listed here goes after them, alphabetically.
REPORT_ORDER = (
    "training_failed",
    "negative_transfer",
    "catastrophic_forgetting",
    "domain_shift",
    "resolution",
    "lr_sensitivity",
    "overfitting",
)
NOT_MEASURABLE = "not measurable offline"


def _r(v: Any) -> Any:
    return round(float(v), 6) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else v


def grade(value: float, ci_low: float | None, ci_high: float | None, threshold: float, direction: str) -> str:
    """Grade a measured quantity against its threshold, with its interval.

    Args:
        value: the estimate; ci_low, ci_high: its interval (None: an exact quantity, graded on `value`).
        threshold: the boundary.
        direction: "above" when the problem is a value above the threshold (a gap, a drop), "below" when it is
            a value below it (an agreement, a gain).

    Returns:
        "flagged" (the whole interval on the problem's side), "ok" (wholly on the other side) or
        "undetermined" (the interval straddles or touches the threshold).

    Raises:
        ValueError: an unknown direction.
    """
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    lo, hi = (value, value) if ci_low is None or ci_high is None else (ci_low, ci_high)
    if direction == "above":
        return "flagged" if lo > threshold else "ok" if hi < threshold else "undetermined"
    return "flagged" if hi < threshold else "ok" if lo > threshold else "undetermined"


def graded(
    value: float,
    ci_low: float | None,
    ci_high: float | None,
    threshold: float,
    direction: str,
    *,
    quantity: str,
    interval: str,
    confidence: float | None = None,
) -> dict:
    """A quantity as a finding carries it: value, interval, threshold, direction, how the interval was made,
    and its `grade` under `status`."""
    return {
        "quantity": quantity,
        "value": _r(value),
        "ci_low": _r(ci_low) if ci_low is not None else None,
        "ci_high": _r(ci_high) if ci_high is not None else None,
        "confidence": confidence,
        "interval": interval,
        "threshold": threshold,
        "direction": direction,
        "status": grade(value, ci_low, ci_high, threshold, direction),
    }


def finding(
    kind: str,
    subject: str,
    flagged: bool | str,
    severity: str,
    evidence: dict,
    remedy: str,
    *,
    measured: dict | None = None,
) -> dict:
    """A finding as written to metrics/diagnosis.json.

    Args:
        flagged: a status of `STATUSES` ("undetermined": an interval that straddles the threshold), or a bool
            for a rule without an interval (True: "flagged").
        severity: the severity when flagged (a finding that is ok or undetermined carries that word instead).
        measured: the graded quantity (`graded`); when given, its status is the finding's.
    """
    assert severity in SEVERITIES, severity
    status = flagged if isinstance(flagged, str) else ("flagged" if flagged else "ok")
    if measured is not None:
        status = measured["status"]
    assert status in STATUSES, status
    return {
        "type": kind,
        "subject": subject,
        "status": status,
        "flagged": status == "flagged",
        "severity": severity if status == "flagged" else status,
        "measured": measured,
        "evidence": evidence,
        "remedy": remedy,
        "remedy_result": None,
    }


def _gain(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_bootstrap: int, seed: int, confidence: float = 0.95) -> dict:
    """Accuracy gain of `a` over `b` ((n,) or (k_seeds, n) rows) with the project's one bootstrap (seed_t: test
    samples and training seeds), rounded. With compare's n_bootstrap, confidence and seed it is compare's number."""
    g = paired_bootstrap_gain(y, a, b, metric="accuracy", n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    return {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high")}


def level(y: np.ndarray, rows: np.ndarray, n_bootstrap: int, seed: int, confidence: float = 0.95) -> dict:
    """An accuracy (or an agreement: `y` = the reference's predictions) over all seeds' rows, with its interval.

    The project's one bootstrap, as the gain over a predictor that is never right (its accuracy is exactly 0):
    the same test-sample draws and Student-t seed term as every gain. Returns {value, ci_low, ci_high}."""
    y = np.asarray(y)
    never = np.full_like(y, int(y.min()) - 1)
    g = _gain(y, rows, never, n_bootstrap, seed, confidence)
    return {"value": g["gain"], "ci_low": g["ci_low"], "ci_high": g["ci_high"]}


def accuracy_change(
    y: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    n_bootstrap: int,
    seed: int,
    confidence: float = 0.95,
    *,
    what: str = "target test accuracy",
) -> dict:
    """Accuracy before and after (mean over seeds' rows) and the paired change with its interval."""
    b, a = np.atleast_2d(before), np.atleast_2d(after)
    return {
        "metric": what,
        "before": round(float((b == y).mean()), 6),
        "after": round(float((a == y).mean()), 6),
        "change": _gain(y, a, b, n_bootstrap, seed, confidence),
        "seeds_before": int(len(b)),
        "seeds_after": int(len(a)),
    }


def difference(before: dict, after: dict) -> dict:
    """after - before of two independently measured graded quantities, with a normal-approximation interval
    (half-widths combined in quadrature): for quantities whose measurements share no samples to pair on."""
    d = after["value"] - before["value"]
    if before.get("ci_low") is None or after.get("ci_low") is None:
        return {"gain": _r(d), "ci_low": None, "ci_high": None, "interval": "none (exact quantities)"}
    hb = (before["ci_high"] - before["ci_low"]) / 2
    ha = (after["ci_high"] - after["ci_low"]) / 2
    h = math.hypot(hb, ha)
    return {"gain": _r(d), "ci_low": _r(d - h), "ci_high": _r(d + h), "interval": "half-widths in quadrature"}


def remedy_verdict(before: dict, after: dict, change: dict, target: dict | None) -> str:
    """The outcome of a remedy: the flagged quantity re-measured and re-graded against the same threshold.

    Args:
        before, after: the quantity as `graded` before and after (same threshold and direction).
        change: after - before of the quantity, {gain, ci_low, ci_high} (ci None: exact).
        target: `accuracy_change` of the target accuracy, or None when it was not measured.

    Returns:
        "worse" (the quantity worse beyond noise, or unchanged while the target accuracy falls beyond noise),
        "trade-off" (better beyond noise, target accuracy down beyond noise), "resolved" (better, and graded
        ok now), "improved" (better beyond noise, still flagged or undetermined) or "no clear effect".
    """
    lo, hi = (change["gain"], change["gain"]) if change.get("ci_low") is None else (change["ci_low"], change["ci_high"])
    better_when_lower = before["direction"] == "above"
    better = (hi < 0) if better_when_lower else (lo > 0)
    worse = (lo > 0) if better_when_lower else (hi < 0)
    # Two grades on opposite sides of the threshold are apart beyond noise by construction.
    better = better or (before["status"] == "flagged" and after["status"] == "ok")
    target_falls = target is not None and target["change"]["ci_high"] < 0
    if worse:
        return "worse"
    if better and target_falls:
        return "trade-off"
    if better:
        return "resolved" if after["status"] == "ok" else "improved"
    return "worse" if target_falls else "no clear effect"


def remedy_result(
    kind: str,
    run: str,
    *,
    before: dict | None,
    after: dict | None,
    change: dict | None,
    target: dict | None,
    note: str | None = None,
) -> dict:
    """What a remedy (kind "remedy": a new run that re-measures the flagged quantity) or a piece of evidence
    (kind "evidence": two models that already exist, compared) found.

    Returns:
        {kind, run, before, after, change (of the quantity), target_accuracy, outcome, note}: the outcome is
        `remedy_verdict`'s, None when the quantity was not re-measured.
    """
    assert kind in REMEDY_KINDS, kind
    outcome = remedy_verdict(before, after, change, target) if before and after and change else None
    return {
        "kind": kind,
        "run": run,
        "before": before,
        "after": after,
        "change": change,
        "target_accuracy": target,
        "outcome": outcome,
        "note": note,
    }


NEGATIVE_TRANSFER_REMEDY = (
    "Use a closer or better-ranked source (see metrics/score.json), or feature extraction "
    "(linear_probe) instead of updating the backbone; check the learning rate."
)


def _comparison_status(g: dict, untrusted: str | None = None) -> str:
    """A gain graded against zero (direction "below": negative transfer is a gain below 0); a comparison whose
    training cannot be trusted is undetermined, as the summary gives it no verdict."""
    return "undetermined" if untrusted else grade(g["gain"], g["ci_low"], g["ci_high"], 0.0, "below")


def _negative_transfer_finding(name: str, gains: dict[str, dict], critical: str, confidence: float, **extra) -> dict:
    """One finding from a model's gains over its references: flagged when a whole interval is below zero
    (critical below `critical`, the same architecture from scratch; a warning below the other reference only),
    undetermined when none is below and one straddles zero, ok when all are above."""
    below = [ref for ref, g in gains.items() if g["status"] == "flagged"]
    open_ = [ref for ref, g in gains.items() if g["status"] == "undetermined"]
    decisive = (below or open_ or list(gains))[0]
    g = gains[decisive]
    measured = graded(
        g["gain"],
        g["ci_low"],
        g["ci_high"],
        0.0,
        "below",
        quantity=f"test accuracy gain vs {decisive}",
        interval="paired bootstrap over test samples + Student-t seed term (seed_t), every seed",
        confidence=confidence,
    )
    measured["status"] = "flagged" if below else "undetermined" if open_ else "ok"
    return finding(
        "negative_transfer",
        name,
        measured["status"],
        "critical" if critical in below else "warning",
        {"gain_vs": gains, "below": below, "straddling_zero": open_, "confidence": confidence, **extra},
        NEGATIVE_TRANSFER_REMEDY,
        measured=measured,
    )


def negative_transfer(
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    references: dict[str, np.ndarray],
    *,
    n_bootstrap: int,
    seed: int,
    confidence: float = 0.95,
    critical: str = "scratch",
) -> list[dict]:
    """Every model's accuracy gain over each reference (all seeds' rows, the project's one bootstrap, graded
    against zero): below `critical` (the architecture from scratch) is negative transfer proper (critical);
    below the other reference only, the pre-trained features do not earn their cost (warning).

    Args:
        y: (n,) test labels; preds, references: name -> (n,) or (k_seeds, n) predictions on the same samples.
        n_bootstrap, seed, confidence: compare's (`compare.n_bootstrap`, `seed`, `compare.confidence`), so that a
            gain is the number metrics/summary.json holds for the same pair.
    """
    out = []
    for name in sorted(preds):
        gains = {}
        for ref, rp in references.items():
            if ref != name:
                g = _gain(y, preds[name], rp, n_bootstrap, seed, confidence)
                gains[ref] = {**g, "status": _comparison_status(g)}
        out.append(_negative_transfer_finding(name, gains, critical, confidence))
    return out


def negative_transfer_from_summary(summary: dict, *, exclude: tuple[str, ...] = ()) -> list[dict]:
    """Negative transfer of every strategy, read from the comparison's summary (metrics/summary.json): its gain
    vs `summary['baseline']` (scratch) and vs the best model without transfer, with their intervals and its
    verdicts. The report shows the same rows, so the two cannot disagree about a model.

    Args:
        summary: compare's summary; exclude: names that are references, not findings (scratch, the classical
            baseline).
    """
    base = summary["baseline"]
    ref = (summary.get("best_non_transfer") or {}).get("name")
    conf = summary.get("confidence", 0.95)
    out = []
    for name in sorted(summary["strategies"]):
        row = summary["strategies"][name]
        if name in exclude or name in (base, ref):
            continue
        gains = {}
        for other, block, verdict in (
            (base, row.get(f"gain_vs_{base}"), row.get("verdict")),
            (ref, row.get("gain_vs_best_non_transfer"), (row.get("gain_vs_best_non_transfer") or {}).get("verdict")),
        ):
            if other is None or block is None or other in gains:
                continue
            g = {k: block["accuracy"][k] for k in ("gain", "ci_low", "ci_high")}
            untrusted = verdict if isinstance(verdict, str) and verdict.startswith("inconclusive (") else None
            gains[other] = {**g, "verdict": verdict, "status": _comparison_status(g, untrusted)}
        if gains:
            out.append(_negative_transfer_finding(name, gains, base, conf, source="metrics/summary.json"))
    return out


def overfitting_gap(
    histories: dict[int, list[dict]], *, n_train: int, n_val: int, confidence: float = 0.95
) -> dict[str, Any]:
    """Train minus validation accuracy at each seed's best epoch (`training.rules.best_row`, the checkpoint kept),
    averaged over seeds, with its interval.

    The interval combines, in quadrature, the seed-to-seed spread (Student-t over the seeds' gaps, k-1 df; none
    with one seed) and the sampling noise of the two accuracies (binomial standard errors of the validation
    and training sets' sizes at the measured accuracies; the validation set is the same for every seed, so its
    noise does not average out over seeds). The recorded train accuracy is the epoch's running accuracy.

    Returns:
        {value, ci_low, ci_high, per_seed: {seed: {best_epoch, train_accuracy, val_accuracy, gap}}, seeds}.
    """
    from scipy.stats import norm, t

    per_seed = {}
    for s, hist in sorted(histories.items()):
        g = train_val_gap(hist)
        row = hist[g["best_epoch"]]
        per_seed[int(s)] = {
            "best_epoch": int(row.get("epoch", g["best_epoch"] + 1)),
            "train_accuracy": round(float(row["train_accuracy"]), 6),
            "val_accuracy": round(float(row["val_accuracy"]), 6),
            "gap": round(g["accuracy_gap_at_best"], 6),
        }
    gaps = np.array([r["gap"] for r in per_seed.values()])
    k = len(gaps)
    pv = _binomial_p(np.array([r["val_accuracy"] for r in per_seed.values()]), max(n_val, 1))
    pt = _binomial_p(np.array([r["train_accuracy"] for r in per_seed.values()]), max(n_train, 1))
    var_sampling = float(np.mean(pv * (1 - pv) / max(n_val, 1) + pt * (1 - pt) / max(n_train, 1)))
    z = float(norm.ppf(0.5 + confidence / 2))
    seed_half = float(t.ppf(0.5 + confidence / 2, k - 1) * gaps.std(ddof=1) / math.sqrt(k)) if k > 1 else 0.0
    half = math.hypot(seed_half, z * math.sqrt(var_sampling))
    mean = float(gaps.mean())
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "per_seed": per_seed, "seeds": k}


def overfitting(
    histories: dict[str, dict[int, list[dict]]],
    threshold: float,
    *,
    n_train: int,
    n_val: int,
    confidence: float = 0.95,
) -> list[dict]:
    """One finding per model: the train/validation accuracy gap at the best epoch (`overfitting_gap`, every
    seed) graded against `threshold` (flagged when the whole interval is above it)."""
    out = []
    for name in sorted(histories):
        gap = overfitting_gap(histories[name], n_train=n_train, n_val=n_val, confidence=confidence)
        measured = graded(
            gap["value"],
            gap["ci_low"],
            gap["ci_high"],
            threshold,
            "above",
            quantity="train - validation accuracy at the best epoch (training.rules.best_row), mean over seeds",
            interval="Student-t over seeds + binomial noise of the validation and training set sizes, in quadrature",
            confidence=confidence,
        )
        out.append(
            finding(
                "overfitting",
                name,
                measured["status"],
                "warning",
                {
                    "accuracy_gap_at_best": measured["value"],
                    "per_seed": gap["per_seed"],
                    "threshold": threshold,
                    "val_samples": n_val,
                    "train_samples": n_train,
                },
                "Train fewer parameters (freeze more blocks, or feature extraction), add augmentation or labels, "
                "raise weight decay.",
                measured=measured,
            )
        )
    return out


@torch.no_grad()
def _pooled_blocks(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """Global-average-pooled output of every stage (timm `forward_intermediates`), for CKA."""
    model.eval()
    inter = model.forward_intermediates(x, intermediates_only=True)
    return [(t.float().mean(dim=(2, 3)) if t.ndim == 4 else t.float()).cpu().numpy() for t in inter]


def _group_labels(model: nn.Module) -> dict[str, list[str]]:
    groups = block_groups(model)[:-1]  # without the classifier
    return {f"{i}:{g[0].rsplit('.', 1)[0]}": g for i, g in enumerate(groups)}


FORGETTING_REMEDY = (
    "Lower the backbone learning rate, use L2-SP, freeze the early blocks (finetune_top), or LoRA: all keep "
    "the source behaviour closer, when the source task still matters."
)


@torch.no_grad()
def forgetting_by_proxy(
    source_model: nn.Module,
    tuned: nn.Module | list[nn.Module],
    images: np.ndarray,
    mean: tuple,
    std: tuple,
    *,
    agreement_threshold: float,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    device: torch.device | str | None = None,
) -> dict:
    """Catastrophic forgetting without the source data (ImageNet): on probe images, how often the
    source classifier still predicts what it predicted before, once put on the fine-tuned backbone of each
    training seed (`tuned`: one model per seed); per-stage linear CKA between pre-trained and fine-tuned
    features and per-block relative weight drift (first seed's model).

    The agreement's interval is the project's bootstrap over probe images and seeds (`level`); flagged when the
    whole interval is below `agreement_threshold`. Models run on `device` (default: the CPU) in float32.
    """
    tuned_models = tuned if isinstance(tuned, list) else [tuned]
    device = as_device(device)
    source_model.to(device).eval()
    x = to_input(images, mean, std).to(device)
    head = source_model.get_classifier()
    before = head(source_model.forward_head(source_model.forward_features(x), pre_logits=True)).cpu().numpy()
    rows, kls = [], []
    for m in tuned_models:
        m.to(device).eval()
        after = head(m.forward_head(m.forward_features(x), pre_logits=True)).cpu().numpy()
        rows.append(after.argmax(1))
        kls.append(prediction_agreement(before, after)["mean_symmetric_kl"])
    first = tuned_models[0]
    cka = [
        round(linear_cka(a, b), 6)
        for a, b in zip(_pooled_blocks(source_model, x), _pooled_blocks(first, x), strict=True)
    ]
    s_state = {k: v for k, v in source_model.state_dict().items()}
    t_state = first.state_dict()
    groups = {k: [n for n in v if n in s_state and n in t_state] for k, v in _group_labels(first).items()}
    drift = {k: round(float(v), 6) for k, v in weight_drift(s_state, t_state, groups).items() if k != "_skipped"}
    agree = level(before.argmax(1), np.stack(rows), n_bootstrap, seed, confidence)
    measured = graded(
        agree["value"],
        agree["ci_low"],
        agree["ci_high"],
        agreement_threshold,
        "below",
        quantity="source top-1 agreement on probe images (source head on the fine-tuned backbone), mean over seeds",
        interval="bootstrap over probe images + Student-t seed term",
        confidence=confidence,
    )
    evidence = {
        "probe_images": len(images),
        "seeds": len(tuned_models),
        "source_top1_agreement": measured["value"],
        "source_mean_symmetric_kl": round(float(np.mean(kls)), 6),
        "cka_per_stage": cka,
        "relative_weight_drift": drift,
        "agreement_threshold": agreement_threshold,
    }
    return finding(
        "catastrophic_forgetting",
        "proxy (source data unavailable)",
        "ok",
        "warning",
        evidence,
        FORGETTING_REMEDY,
        measured=measured,
    )


def source_head_predictions(
    tuned: nn.Module,
    source_head: nn.Module,
    images: np.ndarray,
    mean: tuple,
    std: tuple,
    *,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Per-sample predictions on the source task: the fine-tuned backbone with the ORIGINAL source head,
    both moved to `device` (default: the CPU)."""
    device = as_device(device)
    tuned.to(device).eval()
    source_head.to(device)
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = to_input(images[i : i + 256], mean, std).to(device, non_blocking=True)
            logits = source_head(tuned.forward_head(tuned.forward_features(x), pre_logits=True))
            preds.append(logits.argmax(1).cpu())
    return torch.cat(preds).numpy()


def bn_gap_graded(
    models: list[nn.Module],
    images: np.ndarray,
    mean: tuple,
    std: tuple,
    *,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    confidence: float,
    device: torch.device | str | None = None,
) -> dict:
    """The mean standardised BatchNorm statistics gap of `models` (averaged over them) on target images, graded
    against `threshold` with its bootstrap interval over the images (`measures.bn_gap_interval`)."""
    x = to_input(images, mean, std)
    models = [copy.deepcopy(m).to(as_device(device)) for m in models]
    gap = bn_gap_interval(models, x, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    if gap is None:
        return None
    return graded(
        gap["value"],
        gap["ci_low"],
        gap["ci_high"],
        threshold,
        "above",
        quantity="mean standardised BatchNorm mean gap (source running statistics vs target activations)",
        interval="percentile bootstrap over the probe images",
        confidence=confidence,
    )


def domain_shift(
    source_model: nn.Module,
    target_images: np.ndarray,
    source_feats: np.ndarray | None,
    target_feats: np.ndarray | None,
    mean: tuple,
    std: tuple,
    *,
    source_domain: str,
    n_permutations: int,
    seed: int,
    pad_threshold: float,
    bn_gap_threshold: float,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    unmeasured_reason: str = "no source-domain images (set diagnose.source_images to a folder of them)",
    device: torch.device | str | None = None,
) -> dict:
    """Domain shift from evidence that measures the source domain, and nothing else.

    * The BatchNorm statistics gap: the source model's own running statistics (estimated on its
      pre-training data) against the activations of target images, averaged over layers, graded against
      `bn_gap_threshold` with a bootstrap interval over the images (`bn_gap_graded`).
    * MMD (permutation test) and the proxy A-distance between features of real source-domain images and
      target images, when such images exist. Flags when p < 0.05 and PAD > `pad_threshold` (the permutation
      test is the uncertainty statement; PAD has no interval). Without them both are "not measurable offline".

    Returns:
        A `domain_shift` finding: flagged when either measurement flags, undetermined when the BN gap's
        interval straddles its threshold and nothing flags; `evidence.flagged_by` lists what flagged.
    """
    from transferlab.diagnosis.measures import bn_statistics_gap

    probe_model = copy.deepcopy(source_model).to(as_device(device))
    gaps = bn_statistics_gap(probe_model, to_input(target_images, mean, std))
    bn = (
        bn_gap_graded(
            [source_model],
            target_images,
            mean,
            std,
            threshold=bn_gap_threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
            confidence=confidence,
            device=device,
        )
        if gaps
        else None
    )
    evidence: dict[str, Any] = {
        "source_domain": source_domain,
        "target_probe_images": len(target_images),
        "bn_layers": len(gaps),
        "bn_mean_gap_avg": bn["value"] if bn else None,
        "bn_mean_gap_first_layer": round(float(gaps[0]["mean_gap"]), 6) if gaps else None,
        "bn_worst_layers": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in g.items()}
            for g in sorted(gaps, key=lambda g: -g["mean_gap"])[:3]
        ],
        "bn_gap_threshold": bn_gap_threshold,
        "pad_threshold": pad_threshold,
    }
    flagged_by = []
    if bn and bn["status"] == "flagged":
        flagged_by.append("bn_statistics_gap")
    if source_feats is None or target_feats is None:
        evidence.update({"mmd2": NOT_MEASURABLE, "mmd_p_value": NOT_MEASURABLE, "proxy_a_distance": NOT_MEASURABLE})
        evidence["not_measurable_because"] = unmeasured_reason
    else:
        mmd = mmd_permutation_test(source_feats, target_feats, n_permutations=n_permutations, seed=seed)
        pad = proxy_a_distance(source_feats, target_feats, seed=seed)
        evidence.update(
            {
                "source_images": len(source_feats),
                "mmd2": round(float(mmd["mmd2"]), 6),
                "mmd_p_value": round(float(mmd["p_value"]), 6),
                "proxy_a_distance": round(float(pad), 6),
            }
        )
        if mmd["p_value"] < 0.05 and pad > pad_threshold:
            flagged_by.append("mmd_and_proxy_a_distance")
    evidence["flagged_by"] = flagged_by
    status = "flagged" if flagged_by else "undetermined" if bn and bn["status"] == "undetermined" else "ok"
    f = finding(
        "domain_shift",
        source_domain,
        status,
        "warning",
        evidence,
        "AdaBN (re-estimate BatchNorm statistics on target data), fine-tune the early blocks too, or a source "
        "closer to the target domain.",
    )
    f["measured"] = bn
    return f


def resolution(source: str, target_size: int, source_size: int, *, ratio_threshold: float, size_origin: str) -> dict:
    """Flag a target image size far below the size the source was pre-trained at (`target < ratio x source`):
    the source's filters then see objects at a scale they never saw, and the deepest stages shrink to
    1-2 pixels. The ratio is exact (no sampling noise): graded without an interval."""
    ratio = target_size / source_size
    measured = graded(
        ratio,
        None,
        None,
        ratio_threshold,
        "below",
        quantity="target size / source input size",
        interval="none: an exact ratio of sizes",
    )
    return finding(
        "resolution",
        source,
        "ok",
        "warning",
        {
            "target_image_size": target_size,
            "source_input_size": source_size,
            "source_input_size_from": size_origin,
            "ratio": round(ratio, 6),
            "ratio_threshold": ratio_threshold,
        },
        "Upsample the target images toward the source's input size (data.image_size), when the compute allows.",
        measured=measured,
    )


def training_run_failed(history: list[dict], record: dict, num_classes: int) -> dict:
    """One run's evidence under the train stage's rule (`training.loop.training_failure`), beside the verdict
    the train stage recorded: failed when the train stage recorded a failure, `training_failure` flags the
    history (best validation accuracy near chance, or a training loss that never fell well below ln(C)), the
    history is empty, or a loss in it is not finite. Returns the evidence, with `reasons` ([] when trained)."""
    chance = 1.0 / num_classes
    ln_c = float(np.log(num_classes))
    loss = np.array([float(r.get("train_loss", np.nan)) for r in history], dtype=float)
    val = np.array([float(r.get("val_accuracy", np.nan)) for r in history], dtype=float)
    best_val = float(np.nanmax(val)) if np.isfinite(val).any() else None
    reasons = []
    if record.get("training_failed"):
        reasons.append(f"train stage: {record.get('failure_reason') or 'failed'}")
    if len(history) == 0:
        reasons.append("no history")
    elif not np.isfinite(loss).all():
        reasons.append("loss not finite (diverged)")
    elif best_val is None:
        reasons.append("no validation accuracy in the history")
    elif not record.get("training_failed"):  # else the recorded reason is this rule's, on the same run
        why = training_failure(history, num_classes, best_val)
        if why:
            reasons.append(f"history: {why}")

    def col(key: str) -> list | None:
        vals = [r.get(key) for r in history if r.get(key) is not None]
        return [round(float(v), 6) for v in (vals[0], vals[-1])] if vals else None

    return {
        "epochs_run": len(history),
        "train_loss_first_last": col("train_loss"),
        "loss_at_chance_ln_c": round(ln_c, 6),
        "best_val_accuracy": round(best_val, 6) if best_val is not None else None,
        "chance_accuracy": round(chance, 6),
        "lr_first_last": col("lr"),
        "grad_norm_first_last": col("grad_norm"),
        "lr_chosen_on_validation": record.get("lr"),
        "converged": record.get("converged"),
        "reasons": reasons,
    }


def training_failed(name: str, runs: dict[int, tuple[list[dict], dict]], num_classes: int) -> dict:
    """Did the training of `name` fail, on any seed? One finding per model, every seed's run judged by the
    train stage's own rule (`training_run_failed`): a run diagnosed as failed is one the train stage marks
    failed and the comparison gives no verdict. A rule on each run, not an estimate: no interval.

    Args:
        runs: seed -> (that seed's history rows, its record in metrics/train/<name>.json).

    Returns:
        A `training_failed` finding (critical when a seed failed): evidence per seed and the failed seeds.
    """
    per_seed = {int(s): training_run_failed(h, r, num_classes) for s, (h, r) in sorted(runs.items())}
    failed = [s for s, e in per_seed.items() if e["reasons"]]
    chosen = next((e["lr_chosen_on_validation"] for e in per_seed.values() if e["lr_chosen_on_validation"]), None)
    remedy = (
        "The train stage retries other learning rates and keeps the one best on validation"
        + (f" (chosen: {chosen:g})" if isinstance(chosen, (int, float)) else "")
        + "; if every rate fails, check the data (labels, normalisation) and lower strategies.<name>.lr."
    )
    evidence = {
        "rule": "transferlab.training.loop.training_failure",
        "seeds": sorted(per_seed),
        "failed_seeds": failed,
        "per_seed": per_seed,
    }
    return finding("training_failed", name, bool(failed), "critical", evidence, remedy)


def _binomial_p(p: np.ndarray | float, n: int) -> np.ndarray | float:
    """p kept half a count away from 0 and 1: a perfect accuracy on n examples still carries sampling noise."""
    return np.clip(p, 0.5 / n, 1 - 0.5 / n)


def _binomial_se(p: float, n: int | None) -> float | None:
    if not n:
        return None
    q = float(_binomial_p(p, n))
    return math.sqrt(q * (1 - q) / n)


def lr_sensitivity(
    sweep: list[dict],
    *,
    spread_threshold: float,
    forgetting_threshold: float,
    subject: str = "finetune_full",
    n_val: int | None = None,
    n_source: int | None = None,
    confidence: float = 0.95,
) -> dict:
    """Validation accuracy and source-task forgetting at each learning rate of a fine-tuning sweep.

    The best rate and the spread are read on the VALIDATION split; each row's test accuracy is reported
    only. Every rate has the same short budget (`epochs` in each row): a sensitivity probe, not converged
    runs. The spread (best - worst validation accuracy) is graded against `spread_threshold` with a normal
    interval from the binomial standard errors of the two accuracies (`n_val` examples); each rate's source
    drop against `forgetting_threshold` likewise (`n_source`). Without sizes: graded on the values.

    Args:
        subject: the model measured, in words (e.g. "finetune_full on mnist_cnn").
    """
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    best = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"]))
    worst = min(sweep, key=lambda r: r["val_accuracy"])
    spread = float(best["val_accuracy"] - worst["val_accuracy"])
    se_b, se_w = _binomial_se(best["val_accuracy"], n_val), _binomial_se(worst["val_accuracy"], n_val)
    half = z * math.hypot(se_b, se_w) if se_b is not None else None
    measured = graded(
        spread,
        spread - half if half is not None else None,
        spread + half if half is not None else None,
        spread_threshold,
        "above",
        quantity="validation accuracy spread over the swept learning rates",
        interval="normal, binomial standard errors of the two validation accuracies"
        if half is not None
        else "none (validation size unknown)",
        confidence=confidence,
    )
    wrecks = {}
    for r in sweep:
        if "source_accuracy_drop" not in r:
            continue
        d = float(r["source_accuracy_drop"])
        se = (
            math.hypot(
                _binomial_se(r["source_accuracy_after"], n_source), _binomial_se(r["source_accuracy_before"], n_source)
            )
            if n_source and "source_accuracy_before" in r
            else None
        )
        wrecks[r["lr"]] = grade(
            d, d - z * se if se else None, d + z * se if se else None, forgetting_threshold, "above"
        )
    wrecked = [lr for lr, s in wrecks.items() if s == "flagged"]
    statuses = [measured["status"], *wrecks.values()]
    status = "flagged" if "flagged" in statuses else "undetermined" if "undetermined" in statuses else "ok"
    evidence = {
        "sweep": sweep,
        "val_accuracy_spread": round(spread, 6),
        "best_lr_on_validation": best["lr"],
        "rates_that_wreck_the_source_task": wrecked,
        "source_drop_status_by_lr": {str(k): v for k, v in wrecks.items()},
        "spread_threshold": spread_threshold,
    }
    f = finding(
        "lr_sensitivity",
        subject,
        status,
        "warning",
        evidence,
        f"Use a learning rate near {best['lr']:g} (the sweep's best on validation); avoid {wrecked or 'none'} where "
        "the source task is wrecked; or tune with `tune@<strategy>`.",
    )
    f["measured"] = measured
    return f


def summarize(findings: list[dict], controls: list[dict] | None = None) -> dict[str, Any]:
    """Counts per type (checked / flagged / undetermined / ok), remedies by outcome, evidence apart, the worst
    severity, for the metrics file and the report."""
    by_type: dict[str, dict[str, int]] = {}
    remedies: dict[str, int] = {}
    evidence: dict[str, int] = {}
    for f in findings:
        t = by_type.setdefault(f["type"], {"checked": 0, "flagged": 0, "undetermined": 0, "ok": 0})
        t["checked"] += 1
        t[f.get("status", "flagged" if f["flagged"] else "ok")] += 1
        r = f.get("remedy_result")
        if r:
            bucket = remedies if r.get("kind") == "remedy" else evidence
            key = r.get("outcome") or "not re-measured"
            bucket[key] = bucket.get(key, 0) + 1
    worst = max((SEVERITIES.index(f["severity"]) for f in findings), default=0)
    return {
        "by_type": by_type,
        "worst_severity": SEVERITIES[worst],
        "flagged": sum(f["flagged"] for f in findings),
        "undetermined": sum(f.get("status") == "undetermined" for f in findings),
        "remedy_runs": {"count": sum(remedies.values()), "by_outcome": dict(sorted(remedies.items()))},
        "evidence": {"count": sum(evidence.values()), "by_outcome": dict(sorted(evidence.items()))},
        "controls": len(controls or []),
    }

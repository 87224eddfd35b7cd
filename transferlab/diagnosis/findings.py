"""Findings: what went wrong in a transfer, measured, each with its evidence, a severity and a remedy.

One function per problem turns measurements (from `measures`) into findings:
negative transfer, catastrophic forgetting (exact for in-pipeline sources, by proxy for ImageNet ones),
domain shift, learning-rate sensitivity, over-fitting and failed training. The checks in
`transferlab.diagnosis.checks` call them, run the remedies and attach their before/after numbers with
`remedy_result`; `reporting.diagnosis_md.to_markdown` writes the report.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.core.device import as_device
from transferlab.diagnosis.measures import (
    bn_statistics_gap,
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

SEVERITIES = ("ok", "info", "warning", "critical")
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


def finding(kind: str, subject: str, flagged: bool, severity: str, evidence: dict, remedy: str) -> dict:
    """A finding as written to metrics/diagnosis.json."""
    assert severity in SEVERITIES, severity
    return {
        "type": kind,
        "subject": subject,
        "flagged": bool(flagged),
        "severity": severity if flagged else "ok",
        "evidence": evidence,
        "remedy": remedy,
        "remedy_result": None,
    }


def _gain(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_bootstrap: int, seed: int, confidence: float = 0.95) -> dict:
    """Accuracy gain of `a` over `b` with its paired bootstrap interval, rounded (the project's one bootstrap)."""
    g = paired_bootstrap_gain(y, a, b, metric="accuracy", n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    return {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high")}


def remedy_outcome(
    y: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    n_bootstrap: int,
    seed: int,
    what: str,
    metric: str = "target test accuracy",
    confidence: float = 0.95,
) -> dict:
    """Before/after accuracy of a remedy on the same samples, with the paired bootstrap CI of the change.

    Args:
        y, before, after: labels and the two predictions, aligned on the same samples.
        n_bootstrap, seed, confidence: the paired bootstrap (params `diagnose.n_bootstrap`, `seed`,
            `compare.confidence`).
        what: the remedy run, in words; metric: what the accuracy is measured on.

    Returns:
        `{remedy_run, metric, confidence, before, after, change: {gain, ci_low, ci_high}, verdict}`; the
        verdict is "helped" / "hurt" only when the whole interval is on one side of zero.
    """
    g = _gain(y, after, before, n_bootstrap, seed, confidence)
    verdict = "helped" if g["ci_low"] > 0 else "hurt" if g["ci_high"] < 0 else "no clear effect"
    return {
        "remedy_run": what,
        "metric": metric,
        "confidence": confidence,
        "before": round(float((before == y).mean()), 6),
        "after": round(float((after == y).mean()), 6),
        "change": g,
        "verdict": verdict,
    }


def negative_transfer(
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    references: dict[str, np.ndarray],
    *,
    n_bootstrap: int,
    seed: int,
    confidence: float = 0.95,
) -> list[dict]:
    """Flag every model whose whole CI of the gain over a reference (scratch, raw pixels) lies below zero.

    Below scratch (same architecture, no pre-training) is negative transfer proper: critical. Below the
    raw-pixel linear model only: the pre-trained features do not earn their cost (warning).
    """
    out = []
    for name in sorted(preds):
        gains = {
            ref: _gain(y, preds[name], rp, n_bootstrap, seed, confidence)
            for ref, rp in references.items()
            if ref != name
        }
        below = [ref for ref, g in gains.items() if g["ci_high"] < 0]
        severity = "critical" if "scratch" in below else "warning"
        remedy = (
            "Use a closer or better-ranked source (see metrics/score.json), or feature extraction "
            "(linear_probe) instead of updating the backbone; check the learning rate."
        )
        out.append(
            finding(
                "negative_transfer",
                name,
                bool(below),
                severity,
                {"gain_vs": gains, "below": below, "confidence": confidence},
                remedy,
            )
        )
    return out


def overfitting(histories: dict[str, list[dict]], threshold: float) -> list[dict]:
    """Flag a train/validation accuracy gap above `threshold` at the best-validation epoch."""
    out = []
    for name in sorted(histories):
        gap = train_val_gap(histories[name])
        flagged = gap["accuracy_gap_at_best"] > threshold
        out.append(
            finding(
                "overfitting",
                name,
                flagged,
                "warning",
                {**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in gap.items()}, "threshold": threshold},
                "Train fewer parameters (freeze more blocks, or feature extraction), add augmentation or labels, "
                "raise weight decay.",
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


@torch.no_grad()
def forgetting_by_proxy(
    source_model: nn.Module,
    tuned: nn.Module,
    images: np.ndarray,
    mean: tuple,
    std: tuple,
    *,
    agreement_threshold: float,
    device: torch.device | str | None = None,
) -> dict:
    """Catastrophic forgetting without the source data (ImageNet): on probe images, how often the
    source classifier still predicts what it predicted before, once put on the fine-tuned backbone;
    per-stage linear CKA between pre-trained and fine-tuned features; per-block relative weight drift.

    Both models are moved to `device` (default: the CPU) and run there in float32.
    """
    device = as_device(device)
    source_model.to(device).eval()
    tuned.to(device).eval()
    x = to_input(images, mean, std).to(device)
    head = source_model.get_classifier()
    before = head(source_model.forward_head(source_model.forward_features(x), pre_logits=True)).cpu().numpy()
    after = head(tuned.forward_head(tuned.forward_features(x), pre_logits=True)).cpu().numpy()
    agree = prediction_agreement(before, after)
    cka = [
        round(linear_cka(a, b), 6)
        for a, b in zip(_pooled_blocks(source_model, x), _pooled_blocks(tuned, x), strict=True)
    ]
    s_state = {k: v for k, v in source_model.state_dict().items()}
    t_state = tuned.state_dict()
    groups = {k: [n for n in v if n in s_state and n in t_state] for k, v in _group_labels(tuned).items()}
    drift = {k: round(float(v), 6) for k, v in weight_drift(s_state, t_state, groups).items() if k != "_skipped"}
    evidence = {
        "probe_images": len(images),
        "source_top1_agreement": round(agree["top1_agreement"], 6),
        "source_mean_symmetric_kl": round(agree["mean_symmetric_kl"], 6),
        "cka_per_stage": cka,
        "relative_weight_drift": drift,
        "agreement_threshold": agreement_threshold,
    }
    flagged = agree["top1_agreement"] < agreement_threshold
    return finding(
        "catastrophic_forgetting",
        "proxy (source data unavailable)",
        flagged,
        "warning",
        evidence,
        "Lower the backbone learning rate, use L2-SP, freeze the early blocks (finetune_top), or LoRA: all keep "
        "the source behaviour closer, when the source task still matters.",
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
    unmeasured_reason: str = "no source-domain images (set diagnose.source_images to a folder of them)",
    device: torch.device | str | None = None,
) -> dict:
    """Domain shift from evidence that measures the source domain, and nothing else.

    * The BatchNorm statistics gap: the source model's own running statistics (estimated on its
      pre-training data) against the activations of target images. Flags when the mean standardised gap,
      averaged over layers, exceeds `bn_gap_threshold`.
    * MMD (permutation test) and the proxy A-distance between features of real source-domain images and
      target images, when such images exist (an in-pipeline source's own data, or `diagnose.source_images`).
      Flags when p < 0.05 and PAD > `pad_threshold`. Without them (`source_feats is None`) both are
      reported as "not measurable offline": a stand-in domain (e.g. crops of two sample photos) is
      separable from any dataset by construction (PAD = 2), so it says nothing about this target.

    The statistics pass runs on a copy of the source model on `device` (default: the CPU).

    Returns:
        A `domain_shift` finding; `evidence.flagged_by` lists the measurements over their thresholds.
    """
    probe_model = copy.deepcopy(source_model).to(as_device(device))
    gaps = bn_statistics_gap(probe_model, to_input(target_images, mean, std))
    mean_gap = [g["mean_gap"] for g in gaps]
    gap_avg = float(np.mean(mean_gap)) if gaps else None
    evidence: dict[str, Any] = {
        "source_domain": source_domain,
        "target_probe_images": len(target_images),
        "bn_layers": len(gaps),
        "bn_mean_gap_avg": round(gap_avg, 6) if gap_avg is not None else None,
        "bn_mean_gap_first_layer": round(float(mean_gap[0]), 6) if gaps else None,
        "bn_worst_layers": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in g.items()}
            for g in sorted(gaps, key=lambda g: -g["mean_gap"])[:3]
        ],
        "bn_gap_threshold": bn_gap_threshold,
        "pad_threshold": pad_threshold,
    }
    flagged_by = []
    if gap_avg is not None and gap_avg > bn_gap_threshold:
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
    return finding(
        "domain_shift",
        source_domain,
        bool(flagged_by),
        "warning",
        evidence,
        "AdaBN (re-estimate BatchNorm statistics on target data), fine-tune the early blocks too, or a source "
        "closer to the target domain.",
    )


def resolution(source: str, target_size: int, source_size: int, *, ratio_threshold: float, size_origin: str) -> dict:
    """Flag a target image size far below the size the source was pre-trained at (`target < ratio x source`):
    the source's filters then see objects at a scale they never saw, and the deepest stages shrink to
    1-2 pixels."""
    ratio = target_size / source_size
    return finding(
        "resolution",
        source,
        ratio < ratio_threshold,
        "warning",
        {
            "target_image_size": target_size,
            "source_input_size": source_size,
            "source_input_size_from": size_origin,
            "ratio": round(ratio, 6),
            "ratio_threshold": ratio_threshold,
        },
        "Upsample the target images toward the source's input size (data.image_size), when the compute allows.",
    )


def training_failed(name: str, seed: int, history: list[dict], record: dict, num_classes: int) -> dict:
    """Did a training run fail? The train stage's own rule, `training.loop.training_failure`, applied to the
    run's per-epoch history, beside the verdict the train stage recorded.

    Failed when any of: the train stage recorded a failure (`training_failed`, with `failure_reason`);
    `training_failure` flags the history (best validation accuracy near chance, or a training loss that never
    fell well below ln(C), the loss of a uniform guess: its thresholds, not a second set); the history is empty,
    or a loss in it is not finite (a divergence, which the training loop itself stops on). One rule for both
    stages: a run diagnosed as failed is one the train stage marks failed and the comparison gives no verdict.

    Returns:
        A `training_failed` finding (critical) with the loss curve's first/last values, the best validation
        accuracy, the learning rate and gradient norm when the history has them, and the reasons.
    """
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

    evidence = {
        "seed": seed,
        "epochs_run": len(history),
        "train_loss_first_last": col("train_loss"),
        "loss_at_chance_ln_c": round(ln_c, 6),
        "best_val_accuracy": round(best_val, 6) if best_val is not None else None,
        "chance_accuracy": round(chance, 6),
        "rule": "transferlab.training.loop.training_failure",
        "lr_first_last": col("lr"),
        "grad_norm_first_last": col("grad_norm"),
        "lr_chosen_on_validation": record.get("lr"),
        "converged": record.get("converged"),
        "reasons": reasons,
    }
    chosen = record.get("lr")
    remedy = (
        "The train stage retries other learning rates and keeps the one best on validation"
        + (f" (chosen: {chosen:g})" if isinstance(chosen, (int, float)) else "")
        + "; if every rate fails, check the data (labels, normalisation) and lower strategies.<name>.lr."
    )
    return finding("training_failed", f"{name} (seed {seed})", bool(reasons), "critical", evidence, remedy)


def lr_sensitivity(sweep: list[dict], *, spread_threshold: float, forgetting_threshold: float) -> dict:
    """Validation accuracy and source-task forgetting at each learning rate of a fine-tuning sweep.

    The best rate and the spread are read on the VALIDATION split; each row's test accuracy is reported
    only (choosing on test would make the reported number optimistic). Every rate has the same short
    budget (`epochs` in each row): a sensitivity probe, not converged runs.
    """
    accs = [r["val_accuracy"] for r in sweep]
    spread = float(max(accs) - min(accs))
    best = max(sweep, key=lambda r: (r["val_accuracy"], -r["lr"]))
    wrecked = [r["lr"] for r in sweep if r.get("source_accuracy_drop", 0) > forgetting_threshold]
    flagged = spread > spread_threshold or bool(wrecked)
    evidence = {
        "sweep": sweep,
        "val_accuracy_spread": round(spread, 6),
        "best_lr_on_validation": best["lr"],
        "rates_that_wreck_the_source_task": wrecked,
        "spread_threshold": spread_threshold,
    }
    return finding(
        "lr_sensitivity",
        "finetune_full",
        flagged,
        "warning",
        evidence,
        f"Use a learning rate near {best['lr']:g} (the sweep's best on validation); avoid {wrecked or 'none'} where "
        "the source task is wrecked; or tune with `tune@<strategy>`.",
    )


def summarize(findings: list[dict]) -> dict[str, Any]:
    """Counts per type and severity, for the metrics file and the report."""
    by_type: dict[str, dict[str, int]] = {}
    for f in findings:
        t = by_type.setdefault(f["type"], {"checked": 0, "flagged": 0})
        t["checked"] += 1
        t["flagged"] += int(f["flagged"])
    worst = max((SEVERITIES.index(f["severity"]) for f in findings), default=0)
    return {"by_type": by_type, "worst_severity": SEVERITIES[worst], "flagged": sum(f["flagged"] for f in findings)}

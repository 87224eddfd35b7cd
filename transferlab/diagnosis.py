"""Findings: what went wrong in a transfer, measured, each with its evidence, a severity and a remedy.

One function per problem turns measurements (from `diagnostics`) into findings:
negative transfer, catastrophic forgetting (exact for in-pipeline sources, by proxy for ImageNet ones),
domain shift, learning-rate sensitivity and over-fitting. The `diagnose` stage runs the remedies and
attaches their before/after numbers with `remedy_result`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.backbones import block_groups, to_input
from transferlab.diagnostics import (
    bn_statistics_gap,
    linear_cka,
    mmd_permutation_test,
    paired_bootstrap_gain,
    prediction_agreement,
    proxy_a_distance,
    train_val_gap,
    weight_drift,
)

SEVERITIES = ("ok", "info", "warning", "critical")


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


def _gain(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    g = paired_bootstrap_gain(y, a, b, n_bootstrap=n_bootstrap, seed=seed)
    return {k: round(float(g[k]), 6) for k in ("gain", "ci_low", "ci_high")}


def remedy_outcome(
    y: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    n_bootstrap: int,
    seed: int,
    what: str,
    metric: str = "target test accuracy",
) -> dict:
    """Before/after accuracy of a remedy on the same samples, with the paired bootstrap CI of the change."""
    g = _gain(y, after, before, n_bootstrap, seed)
    verdict = "helped" if g["ci_low"] > 0 else "hurt" if g["ci_high"] < 0 else "no clear effect"
    return {
        "remedy_run": what,
        "metric": metric,
        "before": round(float((before == y).mean()), 6),
        "after": round(float((after == y).mean()), 6),
        "change": g,
        "verdict": verdict,
    }


def negative_transfer(
    y: np.ndarray, preds: dict[str, np.ndarray], references: dict[str, np.ndarray], *, n_bootstrap: int, seed: int
) -> list[dict]:
    """Flag every model whose whole CI of the gain over a reference (scratch, raw pixels) lies below zero.

    Below scratch (same architecture, no pre-training) is negative transfer proper: critical. Below the
    raw-pixel linear model only: the pre-trained features do not earn their cost (warning).
    """
    out = []
    for name in sorted(preds):
        gains = {ref: _gain(y, preds[name], rp, n_bootstrap, seed) for ref, rp in references.items() if ref != name}
        below = [ref for ref, g in gains.items() if g["ci_high"] < 0]
        severity = "critical" if "scratch" in below else "warning"
        remedy = (
            "Use a closer or better-ranked source (see metrics/score.json), or feature extraction "
            "(linear_probe) instead of updating the backbone; check the learning rate."
        )
        out.append(
            finding("negative_transfer", name, bool(below), severity, {"gain_vs": gains, "below": below}, remedy)
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
    return [t.float().mean(dim=(2, 3)).numpy() if t.ndim == 4 else t.float().numpy() for t in inter]


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
) -> dict:
    """Catastrophic forgetting without the source data (ImageNet): on probe images, how often the
    source classifier still predicts what it predicted before, once put on the fine-tuned backbone;
    per-stage linear CKA between pre-trained and fine-tuned features; per-block relative weight drift.
    """
    source_model.eval()
    tuned.eval()
    x = to_input(images, mean, std)
    head = source_model.get_classifier()
    before = head(source_model.forward_head(source_model.forward_features(x), pre_logits=True)).numpy()
    after = head(tuned.forward_head(tuned.forward_features(x), pre_logits=True)).numpy()
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
    tuned: nn.Module, source_head: nn.Module, images: np.ndarray, mean: tuple, std: tuple
) -> np.ndarray:
    """Per-sample predictions on the source task: the fine-tuned backbone with the ORIGINAL source head."""
    tuned.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = to_input(images[i : i + 256], mean, std)
            preds.append(source_head(tuned.forward_head(tuned.forward_features(x), pre_logits=True)).argmax(1))
    return torch.cat(preds).numpy()


def domain_shift(
    source_model: nn.Module,
    target_images: np.ndarray,
    source_feats: np.ndarray,
    target_feats: np.ndarray,
    mean: tuple,
    std: tuple,
    *,
    source_domain: str,
    n_permutations: int,
    seed: int,
    pad_threshold: float,
) -> dict:
    """BatchNorm statistics gap (source running stats vs target activations), MMD with a permutation test
    and the proxy A-distance between source-domain and target features."""
    gaps = bn_statistics_gap(copy.deepcopy(source_model), to_input(target_images, mean, std))
    mmd = mmd_permutation_test(source_feats, target_feats, n_permutations=n_permutations, seed=seed)
    pad = proxy_a_distance(source_feats, target_feats, seed=seed)
    mean_gap = [g["mean_gap"] for g in gaps]
    evidence = {
        "source_domain": source_domain,
        "bn_layers": len(gaps),
        "bn_mean_gap_avg": round(float(np.mean(mean_gap)), 6) if gaps else None,
        "bn_mean_gap_first_layer": round(float(mean_gap[0]), 6) if gaps else None,
        "bn_worst_layers": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in g.items()}
            for g in sorted(gaps, key=lambda g: -g["mean_gap"])[:3]
        ],
        "mmd2": round(float(mmd["mmd2"]), 6),
        "mmd_p_value": round(float(mmd["p_value"]), 6),
        "proxy_a_distance": round(float(pad), 6),
        "pad_threshold": pad_threshold,
    }
    flagged = mmd["p_value"] < 0.05 and pad > pad_threshold
    return finding(
        "domain_shift",
        source_domain,
        flagged,
        "warning",
        evidence,
        "AdaBN (re-estimate BatchNorm statistics on target data), fine-tune the early blocks too, or a source "
        "closer to the target domain.",
    )


def lr_sensitivity(sweep: list[dict], *, spread_threshold: float, forgetting_threshold: float) -> dict:
    """Target accuracy and source-task forgetting at each learning rate of a fine-tuning sweep."""
    accs = [r["target_accuracy"] for r in sweep]
    spread = float(max(accs) - min(accs))
    best = max(sweep, key=lambda r: (r["target_accuracy"], -r["lr"]))
    wrecked = [r["lr"] for r in sweep if r.get("source_accuracy_drop", 0) > forgetting_threshold]
    flagged = spread > spread_threshold or bool(wrecked)
    evidence = {
        "sweep": sweep,
        "target_accuracy_spread": round(spread, 6),
        "best_lr": best["lr"],
        "rates_that_wreck_the_source_task": wrecked,
        "spread_threshold": spread_threshold,
    }
    return finding(
        "lr_sensitivity",
        "finetune_full",
        flagged,
        "warning",
        evidence,
        f"Use a learning rate near {best['lr']:g} (the best of the sweep); avoid {wrecked or 'none'} where the "
        "source task is wrecked; or tune with `tune@<strategy>`.",
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


def to_markdown(findings: list[dict], summary: dict) -> str:
    """reports/diagnosis.md: one section per finding type, flagged findings first."""
    lines = [
        "# Diagnosis",
        "",
        f"Worst severity: **{summary['worst_severity']}**; {summary['flagged']} finding(s) flagged.",
        "",
    ]
    for kind in ("negative_transfer", "catastrophic_forgetting", "domain_shift", "lr_sensitivity", "overfitting"):
        group = [f for f in findings if f["type"] == kind]
        if not group:
            continue
        lines += [f"## {kind.replace('_', ' ')}", ""]
        for f in sorted(group, key=lambda f: (not f["flagged"], f["subject"])):
            mark = f"**{f['severity'].upper()}**" if f["flagged"] else "ok"
            lines.append(f"- {mark} `{f['subject']}`: {_evidence_line(f)}")
            if f["flagged"]:
                lines.append(f"  - remedy: {f['remedy']}")
            r = f.get("remedy_result")
            if r:
                lines.append(
                    f"  - remedy run ({r['remedy_run']}): {r['metric']} {r['before']:.3f} -> "
                    f"{r['after']:.3f}, change {r['change']['gain']:+.3f} "
                    f"[{r['change']['ci_low']:+.3f}, {r['change']['ci_high']:+.3f}] -> **{r['verdict']}**"
                    + (f"; {r['note']}" if r.get("note") else "")
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def _evidence_line(f: dict) -> str:
    e = f["evidence"]
    if f["type"] == "negative_transfer":
        return "; ".join(
            f"vs {ref}: {g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" for ref, g in e["gain_vs"].items()
        )
    if f["type"] == "overfitting":
        return f"train-val accuracy gap at best epoch {e['accuracy_gap_at_best']:.3f} (threshold {e['threshold']})"
    if f["type"] == "domain_shift":
        return (
            f"MMD^2 {e['mmd2']:.4f} (p={e['mmd_p_value']:.3f}), proxy A-distance {e['proxy_a_distance']:.2f}, "
            f"mean BN gap {e['bn_mean_gap_avg']}"
        )
    if f["type"] == "lr_sensitivity":
        rows = ", ".join(f"{r['lr']:g}: {r['target_accuracy']:.3f}" for r in e["sweep"])
        return f"target accuracy by lr {rows}; wrecks source at {e['rates_that_wreck_the_source_task']}"
    if f["type"] == "catastrophic_forgetting":
        if "source_accuracy_before" in e:
            return (
                f"source-task accuracy {e['source_accuracy_before']:.3f} -> {e['source_accuracy_after']:.3f} "
                f"(drop {e['source_accuracy_drop']:.3f}) after fine-tuning at lr {e['lr']:g}"
            )
        return (
            f"source top-1 agreement {e['source_top1_agreement']:.3f} on {e['probe_images']} probe images, "
            f"CKA by stage {e['cka_per_stage']}"
        )
    return str(e)

"""The diagnosis as Markdown (`reports/diagnosis.md`): per finding type, the flagged and undetermined findings in
full (the graded quantity with its interval and threshold, the evidence, the remedy, and each remedy's outcome
beside its target-accuracy change), the findings that are ok collapsed to one line per check, and the controls
(random-init sources) in their own short list: reference points, never findings."""

from __future__ import annotations

from typing import Any

from transferlab.diagnosis.findings import NOT_MEASURABLE, REPORT_ORDER


def _interval(m: dict) -> str:
    if m.get("ci_low") is None:
        return f"{m['value']:.4f} (exact)"
    conf = f"{m['confidence']:.0%} " if m.get("confidence") else ""
    return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] ({conf}CI)"


def measured_line(m: dict | None) -> str:
    """'<quantity> 0.1527 [0.128, 0.178] (95% CI) vs threshold 0.15 (flagged above) -> undetermined'."""
    if not m:
        return ""
    side = "above" if m["direction"] == "above" else "below"
    return f"{m['quantity']} {_interval(m)} vs threshold {m['threshold']} (a problem {side}) -> **{m['status']}**"


def _change(c: dict | None) -> str:
    if not c:
        return "n/a"
    if c.get("ci_low") is None:
        return f"{c['gain']:+.3f}"
    return f"{c['gain']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def remedy_line(r: dict) -> str:
    """One line: what ran (remedy) or was compared (evidence), the quantity re-graded, the outcome beside the
    target-accuracy change."""
    label = "remedy run" if r["kind"] == "remedy" else "evidence (existing models, not a remedy run)"
    parts = [f"{label}: {r['run']}"]
    if r.get("before") and r.get("after"):
        parts.append(
            f"{r['before']['quantity']} {_interval(r['before'])} -> {_interval(r['after'])} "
            f"(now {r['after']['status']}; change {_change(r.get('change'))})"
        )
    t = r.get("target_accuracy")
    target = (
        f"target test accuracy {t['before']:.3f} -> {t['after']:.3f}, change {_change(t['change'])}"
        if t
        else "target accuracy not measured"
    )
    outcome = r.get("outcome") or "quantity not re-measured"
    parts.append(f"**{outcome}** | {target}")
    if r.get("note"):
        parts.append(r["note"])
    return "; ".join(parts)


def _counts(block: dict | None) -> str:
    """'3 (resolved 1, trade-off 2)'."""
    block = block or {}
    outcomes = ", ".join(f"{k} {v}" for k, v in block.get("by_outcome", {}).items())
    return f"{block.get('count', 0)}" + (f" ({outcomes})" if outcomes else "")


def to_markdown(findings: list[dict], summary: dict, controls: list[dict] | None = None) -> str:
    """reports/diagnosis.md: one section per finding type; flagged, then undetermined findings in full; the ok
    findings of each check on one line; the controls apart."""
    lines = [
        "# Diagnosis",
        "",
        f"Worst severity: **{summary['worst_severity']}**; {summary['flagged']} finding(s) flagged, "
        f"{summary.get('undetermined', 0)} undetermined (an interval that straddles its threshold). "
        f"Remedy runs: {_counts(summary.get('remedy_runs'))}; evidence from existing models (not remedy runs): "
        f"{_counts(summary.get('evidence'))}.",
        "",
    ]
    kinds = [k for k in REPORT_ORDER if any(f["type"] == k for f in findings)]
    kinds += sorted({f["type"] for f in findings} - set(REPORT_ORDER))
    for kind in kinds:
        group = [f for f in findings if f["type"] == kind]
        lines += [f"## {kind.replace('_', ' ')}", ""]
        order = {"flagged": 0, "undetermined": 1}
        for f in sorted(group, key=lambda f: (order.get(f.get("status"), 2), f["subject"])):
            if f.get("status", "flagged" if f["flagged"] else "ok") == "ok":
                continue
            mark = f"**{f['severity'].upper()}**"
            lines.append(f"- {mark} `{f['subject']}`: {_evidence_line(f)}")
            if f.get("measured"):
                lines.append(f"  - graded: {measured_line(f['measured'])}")
            if f["flagged"]:
                lines.append(f"  - remedy: {f['remedy']}")
            r = f.get("remedy_result")
            if r:
                lines.append(f"  - {remedy_line(r)}")
                for alt in r.get("alternatives", []):
                    lines.append(f"  - alternative: {remedy_line(alt)}")
        by_check: dict[str, list[str]] = {}
        for f in group:
            if f.get("status", "flagged" if f["flagged"] else "ok") == "ok":
                why = f["evidence"].get("not_measurable_because")  # an ok that measured only part says so
                label = f"`{f['subject']}`" + (f" (MMD / proxy A-distance {NOT_MEASURABLE}: {why})" if why else "")
                by_check.setdefault(f.get("check", kind), []).append(label)
        for check, subjects in sorted(by_check.items()):
            lines.append(f"- ok ({check}, {len(subjects)}): {', '.join(sorted(subjects))}")
        lines.append("")
    if controls:
        lines += ["## reference points (controls)", ""]
        for c in controls:
            gains = "; ".join(f"vs {ref}: {_change(g)}" for ref, g in c["gain_vs"].items())
            lines.append(f"- `{c['subject']}`: {gains} ({c['note']})")
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _evidence_line(f: dict) -> str:
    e = f["evidence"]
    if f["type"] == "negative_transfer":
        conf = f"{e.get('confidence', 0.95):.0%} CI"
        return (
            "; ".join(
                f"vs {ref}: {g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
                for ref, g in e["gain_vs"].items()
            )
            + f" ({conf})"
        )
    if f["type"] == "overfitting":
        seeds = ", ".join(f"seed {s}: {r['gap']:.3f} at epoch {r['best_epoch']}" for s, r in e["per_seed"].items())
        return f"train-val accuracy gap at the best epoch {e['accuracy_gap_at_best']:.3f} ({seeds})"
    if f["type"] == "domain_shift" and e.get("measure") == "text":
        t, r = e["target"], e["reference"]
        return (
            f"unknown-token rate {t['unknown_token_rate']:.4f} vs {r['unknown_token_rate']:.4f} (reference), "
            "word-pieces "
            f"per word {t['pieces_per_word']:.2f} vs {r['pieces_per_word']:.2f}, emoji {t['emoji_rate']:.2f} vs "
            f"{r['emoji_rate']:.2f}, hashtags {t['hashtag_rate']:.2f} vs {r['hashtag_rate']:.2f}, mentions "
            f"{t['mention_rate']:.2f} vs {r['mention_rate']:.2f}, URLs {t['url_rate']:.2f} vs {r['url_rate']:.2f}, "
            f"non-ASCII {t['non_ascii_rate']:.2f} vs {r['non_ascii_rate']:.2f}; MMD^2 {e['mmd2']:.4f} "
            f"(p={e['mmd_p_value']:.3f}), proxy A-distance {e['proxy_a_distance']:.2f}"
        )
    if f["type"] == "domain_shift":
        text = (
            f"mean BN statistics gap {e['bn_mean_gap_avg']} (threshold {e['bn_gap_threshold']}); "
            f"MMD^2 {_fmt(e['mmd2'], '.4f')} (p={_fmt(e['mmd_p_value'], '.3f')}), "
            f"proxy A-distance {_fmt(e['proxy_a_distance'], '.2f')}"
        )
        if e.get("not_measurable_because"):
            text += f" ({e['not_measurable_because']})"
        return text
    if f["type"] == "resolution":
        return (
            f"target {e['target_image_size']} px vs source input {e['source_input_size']} px "
            f"(ratio {e['ratio']:.2f}, threshold {e['ratio_threshold']})"
        )
    if f["type"] == "training_failed":
        return "; ".join(
            f"seed {s}: loss first/last {r['train_loss_first_last']} (ln C = {r['loss_at_chance_ln_c']:.3f}), best "
            f"val accuracy {r['best_val_accuracy']} (chance {r['chance_accuracy']:.3f}); "
            f"{', '.join(r['reasons']) or 'trained'}"
            for s, r in e["per_seed"].items()
        )
    if f["type"] == "lr_sensitivity":
        rows = ", ".join(
            f"{r['lr']:g}: val {r['val_accuracy']:.3f} (test {r['test_accuracy']:.3f})" for r in e["sweep"]
        )
        return (
            f"accuracy by lr {rows}; best on validation {e['best_lr_on_validation']:g}; wrecks source at "
            f"{e['rates_that_wreck_the_source_task']}"
        )
    if f["type"] == "catastrophic_forgetting":
        if e.get("measure") == "text_similarity":
            return (
                f"pairwise sentence similarities kept (Spearman) {e['similarity_spearman']:.3f} (threshold "
                f"{e['threshold']}), nearest neighbour kept {e['nearest_neighbour_kept']:.3f}, on "
                f"{e['reference_texts']} general-English passages"
            )
        if "source_accuracy_before" in e:
            return (
                f"source-task accuracy {e['source_accuracy_before']:.3f} -> {e['source_accuracy_after']:.3f} "
                f"as fine-tuned (drop {e['source_accuracy_drop']:.3f}), "
                f"{e['source_accuracy_after_bn_restored']:.3f} with the source's BatchNorm statistics restored "
                f"(drop {e['source_accuracy_drop_bn_restored']:.3f}); fine-tuned at lr {e['lr']:g}"
            )
        return (
            f"source top-1 agreement {e['source_top1_agreement']:.3f} on {e['probe_images']} probe images "
            f"({e.get('seeds', 1)} seed(s)), CKA by stage {e['cka_per_stage']}"
        )
    return str(e)

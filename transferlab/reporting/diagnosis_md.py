"""The diagnosis as Markdown (`reports/diagnosis.md`): findings in report order, each with its evidence,
severity and remedy, and the remedies' before/after numbers."""

from __future__ import annotations

from typing import Any

from transferlab.diagnosis.findings import REPORT_ORDER


def to_markdown(findings: list[dict], summary: dict) -> str:
    """reports/diagnosis.md: one section per finding type, flagged findings first."""
    lines = [
        "# Diagnosis",
        "",
        f"Worst severity: **{summary['worst_severity']}**; {summary['flagged']} finding(s) flagged.",
        "",
    ]
    kinds = [k for k in REPORT_ORDER if any(f["type"] == k for f in findings)]
    kinds += sorted({f["type"] for f in findings} - set(REPORT_ORDER))
    for kind in kinds:
        group = [f for f in findings if f["type"] == kind]
        lines += [f"## {kind.replace('_', ' ')}", ""]
        for f in sorted(group, key=lambda f: (not f["flagged"], f["subject"])):
            mark = f"**{f['severity'].upper()}**" if f["flagged"] else "ok"
            lines.append(f"- {mark} `{f['subject']}`: {_evidence_line(f)}")
            if f["flagged"]:
                lines.append(f"  - remedy: {f['remedy']}")
            r = f.get("remedy_result")
            if r:
                conf = f"{r.get('confidence', 0.95):.0%}"
                lines.append(
                    f"  - remedy run ({r['remedy_run']}): {r['metric']} {r['before']:.3f} -> "
                    f"{r['after']:.3f}, change {r['change']['gain']:+.3f} "
                    f"[{r['change']['ci_low']:+.3f}, {r['change']['ci_high']:+.3f}] ({conf} CI) -> **{r['verdict']}**"
                    + (f"; {r['note']}" if r.get("note") else "")
                )
                for alt in r.get("alternatives", []):
                    lines.append(
                        f"  - alternative remedy run ({alt['remedy_run']}): {alt['metric']} {alt['before']:.3f} -> "
                        f"{alt['after']:.3f}, change {alt['change']['gain']:+.3f} [{alt['change']['ci_low']:+.3f}, "
                        f"{alt['change']['ci_high']:+.3f}] -> **{alt['verdict']}**"
                    )
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
        return f"train-val accuracy gap at best epoch {e['accuracy_gap_at_best']:.3f} (threshold {e['threshold']})"
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
        return (
            f"loss first/last {e['train_loss_first_last']} (ln C = {e['loss_at_chance_ln_c']:.3f}), best val "
            f"accuracy {e['best_val_accuracy']} (chance {e['chance_accuracy']:.3f}), lr {e['lr_first_last']}, "
            f"grad norm {e['grad_norm_first_last']}; {', '.join(e['reasons']) or 'trained'}"
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
            f"source top-1 agreement {e['source_top1_agreement']:.3f} on {e['probe_images']} probe images, "
            f"CKA by stage {e['cka_per_stage']}"
        )
    return str(e)

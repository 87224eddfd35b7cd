"""The page a person reads, answer first: the recommendation (what to use, by how much over the best model
without transfer, how sure), the headline figure and the table of every model; then the protocol, equal compute
against scratch, the source ranking and how far to trust it, and the diagnosis (flagged findings one per line,
the checks that found nothing one line each). Markdown, and one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

# What each figure shows, for people (not its file name).
FIGURE_TITLES = {
    "gain_over_best_non_transfer.png": "Test accuracy gain over the best model without transfer, with its interval",
    "gain_over_scratch.png": "Test accuracy gain over scratch, with its interval",
    "compute.png": "Validation accuracy against training compute (transfer vs scratch at equal compute)",
    "agreement.png": "Did the source ranking predict what training achieved? (estimate vs achieved accuracy)",
    "learning_curves.png": "Learning curves: every model, every seed, to its plateau",
    "confusion_recommended.png": "Test confusion of the recommended model",
    "confusion_scratch.png": "Test confusion of scratch (the same architecture from random weights)",
}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _pp(g: dict) -> str:
    return f"{100 * g['gain']:+.1f} pp [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def read_train_seconds(perf_dir: str | Path) -> dict[str, float]:
    """strategy -> total training seconds over its seeds (`train_seconds_total` of perf/train/<strategy>.json)."""
    return {
        f.stem: json.loads(f.read_text()).get("train_seconds_total", 0.0) for f in sorted(Path(perf_dir).glob("*.json"))
    }


def _side(v: str) -> str:
    """A verdict in words: how sure."""
    return {"better": "better beyond noise", "worse": "worse beyond noise", "inconclusive": "within noise"}.get(v, v)


def recommendation_text(summary: dict, source: str | None) -> str:
    """The report's first paragraph: what to use, by how much over the best model without transfer, how sure."""
    rec = summary.get("recommendation", {})
    head = summary.get("headline") or {}
    rows = summary["strategies"]
    choice = rec.get("choice")
    if choice is None:
        return "No recommendation: " + rec.get("reason", "no model can be trusted") + "."
    if not head:  # a summary from before the best-non-transfer reference: its reason, against scratch
        if rec.get("classical_baseline_wins"):
            return f"**Use the baseline; transfer does not pay here.** {rec['reason']}."
        return f"Use **{choice}** from source **{source}**: {rec.get('reason', '')}."
    ref = head["reference"]
    pct = f"{round(100 * summary['confidence'])}% CI"
    test = f"Test accuracy {_pct(rows[choice]['test_accuracy'])}"
    close = rec.get("within_noise_of_best") or []
    tail = f" Within one standard error of {choice} on validation: {', '.join(close)}." if close else ""
    tail += " (Chosen on the validation split; the test split only reports.)"
    val = {n: c["val_accuracy"] for n, c in (summary.get("best_non_transfer") or {}).get("candidates", {}).items()}
    why = (
        f" {ref} is the reference because it validates at {_pct(val[ref])}, against "
        + ", ".join(f"{n}'s {_pct(v)}" for n, v in val.items() if n != ref)
        + "."
        if ref in val and len(val) > 1
        else ""
    )
    model, g = head.get("model"), head.get("test_accuracy_gain")
    if rec.get("transfer_wins"):
        out = (
            f"**Use {choice}** (source {source}): **{_pp(g)}** test accuracy ({pct}) over **{ref}**, the best model "
            f"without transfer: {_side(head['verdict'])}. {test}."
        )
        scratch = head.get(f"gain_vs_{summary['baseline']}")
        if scratch:
            out += f" Against {summary['baseline']}: {_pp(scratch)}."
        return out + why + tail
    lead = (
        "**Use the baseline; transfer does not pay here.**"
        if rec.get("classical_baseline_wins")
        else f"**Use {choice}; transfer does not pay here.**"
    )
    out = f"{lead} {choice} validates best, every transfer strategy included. {test}."
    if model and g:
        out += (
            f" The best transfer strategy on validation, {model}, is {_pp(g)} ({pct}) against it on test, "
            f"{_side(head['verdict'])}."
        )
    return out + tail


def _diagnosis_rows(findings: list[dict], controls: list[dict] | None = None) -> list[list[str]]:
    """Every flagged or undetermined finding on its own line, its remedy's outcome (or the evidence's) beside the
    target-accuracy change; the findings that are ok collapsed to one line per check; the controls on one line."""

    def status(f: dict) -> str:
        return f.get("status", "flagged" if f["flagged"] else "ok")

    rows = []
    for f in sorted((f for f in findings if status(f) != "ok"), key=lambda f: (f["type"], status(f), f["subject"])):
        r = f.get("remedy_result")
        res = "—"
        if r:
            t, what = r.get("target_accuracy"), "remedy" if r.get("kind") == "remedy" else "evidence"
            target = (
                f"target accuracy {t['before']:.3f} → {t['after']:.3f} ({t['change']['gain']:+.3f} "
                f"[{t['change']['ci_low']:+.3f}, {t['change']['ci_high']:+.3f}])"
                if t
                else "target accuracy not measured"
            )
            res = f"{what}: {r.get('outcome') or 'not re-measured'}; {target}"
        rows.append([f["type"].replace("_", " "), f["subject"], f["severity"], res])
    ok: dict[str, list[str]] = {}
    for f in findings:
        if status(f) == "ok":
            ok.setdefault(f.get("check", f["type"]), []).append(f["subject"])
    for check, subjects in sorted(ok.items()):
        rows.append([check.replace("_", " "), f"{len(subjects)} ok: {', '.join(subjects)}", "ok", "—"])
    if controls:
        names = ", ".join(c["subject"] for c in controls)
        rows.append(["controls", names, "reference point", "not findings: see reports/diagnosis.md"])
    return rows


def build_sections(
    summary: dict, score: dict, agreement: dict, diagnosis: dict, data: dict, timings: dict[str, float]
) -> list[tuple[str, str, list[list[str]] | None]]:
    """(title, paragraph, table rows with a header row or None) for every section of the report, the
    recommendation first and the table of every model second (`to_html` puts the headline figure between)."""
    base = summary["baseline"]
    key = f"gain_vs_{base}"
    rows = summary["strategies"]
    pct_ci = f"{round(100 * summary['confidence'])}% CI"
    rec_info = summary.get("recommendation", {})
    choice = rec_info.get("choice")
    source = score.get("train_source", score.get("selected"))
    ref = (summary.get("best_non_transfer") or {}).get("name")
    sections: list[tuple[str, str, list[list[str]] | None]] = [
        ("Recommendation", recommendation_text(summary, source), None)
    ]
    header = ["model", "val accuracy", "test accuracy"]
    two_refs = bool(ref) and ref != base  # the best without transfer is not the baseline: both columns
    if two_refs:
        header += [f"gain vs {ref}, best without transfer ({pct_ci})", f"verdict vs {ref}"]
    header += [f"gain vs {base} ({pct_ci})", f"verdict vs {base}", "macro F1", "seeds (test acc.)"]
    header += ["converged", "lr", "train s"]
    table = [header]
    for n in summary.get("ranking_by_val", sorted(rows)):
        r = rows[n]
        per_seed = r.get("per_seed_test_accuracy", {})
        role = " (recommended)" if n == choice else ""
        role += " (reference)" if n == ref else ""
        line = [n + role, _pct(r.get("val_accuracy")), _pct(r["test_accuracy"])]
        if two_refs:
            best = r.get("gain_vs_best_non_transfer")
            line += [_pp(best["accuracy"]) if best else "—", best["verdict"] if best else "reference"]
        line += [
            _pp(r[key]["accuracy"]) if key in r else "—",
            r.get("verdict", "baseline" if n == base else "classical bar"),
            f"{r['macro_f1']:.3f}",
            ", ".join(_pct(v) for v in per_seed.values()) or "deterministic",
            ("no (training failed)" if r.get("training_failed") else "yes" if r.get("converged") else "no")
            if "converged" in r
            else "closed form",
            f"{r['lr']:g}" if r.get("lr") else "—",
            f"{timings[n]:.0f}" if n in timings else "—",
        ]
        table.append(line)
    title = (
        f"Every model against {ref} (the best without transfer, chosen on validation) and against {base}"
        if two_refs
        else f"Every model against {base}, the classical bar included"
        + (" (the best without transfer, chosen on validation)" if ref == base else "")
    )
    sections.append(
        (
            title,
            f"{data['test_samples']} test {'texts' if data.get('modality') == 'text' else 'images'}, "
            f"{data['train_samples']} training labels "
            f"({data['num_classes']} classes). Intervals: {summary.get('interval_covers', 'test samples')}, "
            f"{summary['n_bootstrap']} replicates. 'inconclusive' means the interval contains zero; "
            "'inconclusive (under-trained)' or '(training failed)' means no verdict can be drawn.",
            table,
        )
    )
    sections.append(("Protocol", summary.get("protocol", ""), None))
    table = [
        [
            "strategy",
            "GFLOPs to its best epoch",
            "its val acc.",
            f"{base} val acc. at that compute",
            f"{base} GFLOPs to match",
        ]
    ]
    for n, r in rows.items():
        ec = r.get("equal_compute")
        if not ec:
            continue
        at = ec["scratch_val_accuracy_at_that_compute"]
        match = ec["scratch_gflops_to_match"]
        table.append(
            [
                n,
                f"{ec['strategy_gflops']:.1f}",
                _pct(ec["strategy_val_accuracy"]),
                _pct(at) if at is not None else f"below one {base} epoch",
                f"{match:.1f}" if match is not None else f"not reached ({ec['scratch_reached_in_seeds']} seeds)",
            ]
        )
    sections.append(
        (
            f"Transfer against {base} at equal compute",
            f"Against {base} only (the classical baseline has no training curve), on validation accuracy, so the "
            "test split stays untouched; each model at its kept checkpoint. Training compute: forward + backward "
            "FLOPs per training image seen, frozen layers forward only (the protocol above states the rule); "
            "the learning-rate search is not included (metrics/train/<strategy>.json: lr_search_gflops). Figure: "
            "accuracy against compute.",
            table,
        )
    )
    known = ("logme", "leep", "nce", "hscore", "hscore_shrinkage", "sfda", "knn_accuracy", "linear_probe_accuracy")
    candidates = score["candidates"].values()
    est_names = [k for k in known if any(c.get(k) is not None for c in candidates)]
    undefined = [k for k in known if k not in est_names and any(k in c for c in candidates)]
    table = [["candidate", "rank", *est_names, "params (M)", "GFLOPs/img", "train-step MB"]]
    for n in [*score["ranking"], *score.get("unranked", [])]:
        c = score["candidates"][n]
        table.append(
            [
                n + (" (selected)" if n == score["selected"] else ""),
                "unranked" if c.get("rank") is None else str(c["rank"]),
                *[("—" if c.get(e) is None else f"{c[e]:.3f}") for e in est_names],
                f"{c.get('params_millions', 0):.2f}",
                f"{c.get('gflops_per_image', 0):.3f}",
                f"{c.get('train_step_memory_mb', 0):.0f}",
            ]
        )
    excluded = "; ".join(f"{k}: {v}" for k, v in score.get("excluded", {}).items())
    gone = (
        f" Undefined for every candidate here, so not shown: {', '.join(undefined)} (e.g. H-score and SFDA "
        "saturate when the feature rank reaches the sample count; the reason is in metrics/score.json)."
        if undefined
        else ""
    )
    sections.append(
        (
            "Source candidates (one forward pass each)",
            f"Ranked by {score['select_by']}. Not selectable: {excluded or 'none'}. '—': the estimate is "
            "undefined for that candidate and is left out of the ranking and the agreement." + gone,
            table,
        )
    )
    agree_txt = " ".join(r["summary"] for r in agreement.get("recipes", {}).values())
    table = [["recipe", *sorted(agreement.get("candidates", []))]]
    for recipe, r in agreement.get("recipes", {}).items():
        table.append([recipe, *[_pct(r["test_accuracy"].get(c)) for c in sorted(agreement["candidates"])]])
    sections.append(("Did the ranking predict what training achieved?", agree_txt, table))
    table = [
        ["finding", "subject", "severity", "remedy outcome | target accuracy"],
        *_diagnosis_rows(diagnosis["findings"], diagnosis.get("controls")),
    ]
    sections.append(
        (
            "Diagnosis",
            f"Worst severity: {diagnosis['summary']['worst_severity']}; {diagnosis['summary']['flagged']} flagged, "
            f"{diagnosis['summary'].get('undetermined', 0)} undetermined "
            "(one line each); the checks that found nothing, one line per check. Evidence for each finding: "
            "reports/diagnosis.md and metrics/diagnosis.json.",
            table,
        )
    )
    return sections


def to_markdown(sections: list) -> str:
    out = ["# transferlab report", ""]
    for title, text, table in sections:
        out += [f"## {title}", "", text, ""]
        if table:
            out.append("| " + " | ".join(table[0]) + " |")
            out.append("|" + "---|" * len(table[0]))
            out += ["| " + " | ".join(row) + " |" for row in table[1:]]
            out.append("")
    return "\n".join(out) + "\n"


# After load, the page records on <body> how many figures it has and how many decoded: a headless browser's
# DOM dump then shows whether every figure rendered (tests/test_report_browser.py). No network involved.
_SELF_CHECK = (
    "<script>window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images);"
    "document.body.setAttribute('data-figures',i.length);document.body.setAttribute('data-figures-decoded',"
    "i.filter(function(x){return x.complete&&x.naturalWidth>0;}).length);"
    "document.body.setAttribute('data-tables',document.querySelectorAll('table').length);"
    "document.body.setAttribute('data-errors',window.__errors||0);});</script>"
)
# In <head>, before anything loads: counts failed resources (a figure or script that does not load, any request
# to the network, which the report never makes) and uncaught script errors.
_ERROR_COUNTER = (
    "<script>window.__errors=0;window.addEventListener('error',function(){window.__errors++;},true);</script>"
)


def to_html(sections: list, images: list[Path], *, headline: Path | None = None) -> str:
    """One self-contained page (figures inlined as base64 PNG).

    Args:
        sections: `build_sections`'s sections, in page order.
        images: figures placed after the sections.
        headline: a figure placed right after the first section (the recommendation), before the table.
    """

    def figure(img: Path) -> str:
        data = base64.b64encode(img.read_bytes()).decode()
        return (
            f'<h3>{html.escape(FIGURE_TITLES.get(img.name, img.stem))}</h3><img alt="{html.escape(img.name)}" '
            f'src="data:image/png;base64,{data}">'
        )

    def md_inline(text: str) -> str:
        parts = html.escape(text).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for i, (title, text, table) in enumerate(sections):
        body.append(f"<h2>{html.escape(title)}</h2><p>{md_inline(text)}</p>")
        if table:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if i == 0 and headline is not None and headline.is_file():
            body.append(figure(headline))
    body += [figure(img) for img in images if img.is_file()]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f4f4f4}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>{_ERROR_COUNTER}"
        f"<style>{style}</style></head><body><h1>transferlab report</h1>{''.join(body)}{_SELF_CHECK}</body></html>\n"
    )

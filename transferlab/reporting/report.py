"""The page a person reads: the recommendation, the comparison against scratch, the source ranking and
how far to trust it, and the diagnosis, as Markdown and as one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

# What each figure shows, for people (not its file name).
FIGURE_TITLES = {
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


def build_sections(
    summary: dict, score: dict, agreement: dict, diagnosis: dict, data: dict, timings: dict[str, float]
) -> list[tuple[str, str, list[list[str]] | None]]:
    """(title, paragraph, table rows with a header row or None) for every section of the report."""
    base = summary["baseline"]
    key = f"gain_vs_{base}"
    rows = summary["strategies"]
    pct_ci = f"{round(100 * summary['confidence'])}% CI"
    rec_info = summary.get("recommendation", {})
    choice = rec_info.get("choice")
    source = score.get("train_source", score.get("selected"))
    if choice is None:
        rec = "No recommendation: " + rec_info.get("reason", "no model can be trusted")
    elif rec_info.get("classical_baseline_wins"):
        rec = (
            f"**Use the baseline; transfer does not pay here.** {rec_info['reason']}. Test accuracy "
            f"{_pct(rows[choice]['test_accuracy'])}."
        )
    else:
        rec = f"Use **{choice}** from source **{source}**: {rec_info.get('reason', '')}."
    sections: list[tuple[str, str, list[list[str]] | None]] = [
        ("Recommendation", rec + " (Chosen on the validation split; the test split only reports.)", None),
        ("Protocol", summary.get("protocol", ""), None),
    ]
    table = [
        [
            "model",
            "val accuracy",
            "test accuracy",
            "macro F1",
            "seeds (test acc.)",
            f"accuracy gain vs {base} ({pct_ci})",
            "verdict",
            "converged",
            "lr",
            "train s",
        ]
    ]
    for n in summary.get("ranking_by_val", sorted(rows)):
        r = rows[n]
        per_seed = r.get("per_seed_test_accuracy", {})
        table.append(
            [
                n,
                _pct(r.get("val_accuracy")),
                _pct(r["test_accuracy"]),
                f"{r['macro_f1']:.3f}",
                ", ".join(_pct(v) for v in per_seed.values()) or "deterministic",
                _pp(r[key]["accuracy"]) if key in r else "—",
                r.get("verdict", "baseline" if n == base else "classical bar"),
                ("no (training failed)" if r.get("training_failed") else "yes" if r.get("converged") else "no")
                if "converged" in r
                else "closed form",
                f"{r['lr']:g}" if r.get("lr") else "—",
                f"{timings[n]:.0f}" if n in timings else "—",
            ]
        )
    sections.append(
        (
            "Every model against scratch, the classical bar included",
            f"{data['test_samples']} test {'texts' if data.get('modality') == 'text' else 'images'}, "
            f"{data['train_samples']} training labels "
            f"({data['num_classes']} classes). Intervals: {summary.get('interval_covers', 'test samples')}, "
            f"{summary['n_bootstrap']} replicates. 'inconclusive' means the interval contains zero; "
            "'inconclusive (under-trained)' or '(training failed)' means no verdict can be drawn.",
            table,
        )
    )
    table = [
        [
            "strategy",
            "GFLOPs to its best epoch",
            "its val acc.",
            "scratch val acc. at that compute",
            "scratch GFLOPs to match",
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
                _pct(at) if at is not None else "below one scratch epoch",
                f"{match:.1f}" if match is not None else f"not reached ({ec['scratch_reached_in_seeds']} seeds)",
            ]
        )
    sections.append(
        (
            "Transfer against training from scratch at equal compute",
            "Training compute = forward + backward (about 3x the forward FLOPs) per training sample seen; "
            "validation accuracy, so the test split stays untouched. Figure: accuracy against compute.",
            table,
        )
    )
    est_names = [
        k
        for k in ("logme", "leep", "nce", "hscore", "hscore_shrinkage", "sfda", "knn_accuracy", "linear_probe_accuracy")
        if any(k in c for c in score["candidates"].values())
    ]
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
    sections.append(
        (
            "Source candidates (one forward pass each)",
            f"Ranked by {score['select_by']}. Not selectable: {excluded or 'none'}. '—': the estimate is "
            "undefined here (e.g. H-score and SFDA saturate when the feature rank reaches the sample count; "
            "the reason is in metrics/score.json) and is left out of the ranking and the agreement.",
            table,
        )
    )
    agree_txt = " ".join(r["summary"] for r in agreement.get("recipes", {}).values())
    table = [["recipe", *sorted(agreement.get("candidates", []))]]
    for recipe, r in agreement.get("recipes", {}).items():
        table.append([recipe, *[_pct(r["test_accuracy"].get(c)) for c in sorted(agreement["candidates"])]])
    sections.append(("Did the ranking predict what training achieved?", agree_txt, table))
    table = [["finding", "subject", "severity", "remedy result"]]
    for f in sorted(diagnosis["findings"], key=lambda f: (not f["flagged"], f["type"], f["subject"])):
        r = f.get("remedy_result")
        res = f"{r['remedy_run']}: {r['metric']} {r['before']:.3f} → {r['after']:.3f} ({r['verdict']})" if r else "—"
        table.append([f["type"].replace("_", " "), f["subject"], f["severity"], res])
    sections.append(
        (
            "Diagnosis",
            f"Worst severity: {diagnosis['summary']['worst_severity']}; {diagnosis['summary']['flagged']} flagged. "
            "Evidence for each finding: reports/diagnosis.md and metrics/diagnosis.json.",
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


def to_html(sections: list, images: list[Path]) -> str:
    """One self-contained page (figures inlined as base64 PNG)."""

    def md_inline(text: str) -> str:
        parts = html.escape(text).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for title, text, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2><p>{md_inline(text)}</p>")
        if table:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    for img in images:
        if img.is_file():
            data = base64.b64encode(img.read_bytes()).decode()
            body.append(
                f'<h3>{html.escape(FIGURE_TITLES.get(img.name, img.stem))}</h3><img alt="{html.escape(img.name)}" '
                f'src="data:image/png;base64,{data}">'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f4f4f4}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>{_ERROR_COUNTER}"
        f"<style>{style}</style></head><body><h1>transferlab report</h1>{''.join(body)}{_SELF_CHECK}</body></html>\n"
    )

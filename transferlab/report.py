"""The page a person reads: the recommendation, the comparison against scratch, the source ranking and
how far to trust it, and the diagnosis, as Markdown and as one self-contained HTML file."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _pp(g: dict) -> str:
    return f"{100 * g['gain']:+.1f} pp [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def build_sections(
    summary: dict, score: dict, agreement: dict, diagnosis: dict, data: dict, timings: dict[str, float]
) -> list[tuple[str, str, list[list[str]] | None]]:
    """(title, paragraph, table rows with a header row or None) for every section of the report."""
    base = summary["baseline"]
    key = f"gain_vs_{base}"
    rows = summary["strategies"]
    best = summary["best_strategy"]
    transfer = {n: r for n, r in rows.items() if key in r and n != "raw_pixel_logreg"}
    best_transfer = max(transfer, key=lambda n: rows[n]["test_accuracy"]) if transfer else best
    raw = rows.get("raw_pixel_logreg")
    rec = (
        f"Use **{best_transfer}** from source **{score.get('train_source', score.get('selected'))}**: test accuracy "
        f"{_pct(rows[best_transfer]['test_accuracy'])}"
        + (
            f", {_pp(rows[best_transfer][key]['accuracy'])} over {base} (95% CI)."
            if key in rows[best_transfer]
            else "."
        )
    )
    vs_raw = next(
        (
            f["evidence"]["gain_vs"].get("raw_pixel_logreg")
            for f in diagnosis.get("findings", [])
            if f["type"] == "negative_transfer" and f["subject"] == best_transfer
        ),
        None,
    )
    if raw and vs_raw:
        beats = "clearly beats it" if vs_raw["ci_low"] > 0 else "does not clearly beat it (the interval includes zero)"
        if vs_raw["ci_high"] < 0:
            beats = "is worse than it: the pre-trained features do not earn their cost here"
        rec += (
            f" A logistic regression on raw pixels reaches {_pct(raw['test_accuracy'])}; {best_transfer} "
            f"{beats}: {_pp(vs_raw)}."
        )
    sections: list[tuple[str, str, list[list[str]] | None]] = [("Recommendation", rec, None)]
    table = [["model", "test accuracy", "macro F1", f"accuracy gain vs {base} (95% CI)", "verdict", "train s"]]
    for n in summary["ranking"]:
        r = rows[n]
        table.append(
            [
                n,
                _pct(r["test_accuracy"]),
                f"{r['macro_f1']:.3f}",
                _pp(r[key]["accuracy"]) if key in r else "—",
                r.get("verdict", "baseline"),
                f"{timings[n]:.0f}" if n in timings else "—",
            ]
        )
    sections.append(
        (
            "Every strategy against scratch",
            f"{data['test_samples']} test images, {data['train_samples']} training labels "
            f"({data['num_classes']} classes). Paired bootstrap over the test samples ({summary['n_bootstrap']} "
            "resamples). 'inconclusive' means the interval contains zero.",
            table,
        )
    )
    est_names = [
        k
        for k in ("logme", "leep", "nce", "hscore_shrinkage", "knn_accuracy", "linear_probe_accuracy")
        if any(k in c for c in score["candidates"].values())
    ]
    table = [["candidate", "rank", *est_names, "params (M)", "GFLOPs/img", "train-step MB"]]
    for n in score["ranking"]:
        c = score["candidates"][n]
        table.append(
            [
                n + (" (selected)" if n == score["selected"] else ""),
                str(c["rank"]),
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
            f"Ranked by {score['select_by']}. Not selectable: {excluded or 'none'}.",
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
                f'<h3>{html.escape(img.name)}</h3><img alt="{html.escape(img.name)}" '
                f'src="data:image/png;base64,{data}">'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f4f4f4}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>transferlab report</title>"
        f"<style>{style}</style></head><body><h1>transferlab report</h1>{''.join(body)}</body></html>\n"
    )

"""The report's own figures, drawn from the pipeline's outputs: the headline (every transfer strategy's gain over
the best model without transfer, with its interval), every learning curve, and the test confusion of the
recommended model and of scratch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.core import layout
from transferlab.reporting.plots import confusion_png, curves_png, gain_png, headline_rows


def report_figures(
    summary: dict,
    class_names: list[str],
    gain_rows: list[dict],
    *,
    figures: list[Path],
    history_dir: str | Path,
    confusion_dir: str | Path,
    out_dir: str | Path,
) -> tuple[Path | None, list[Path]]:
    """Draw the report's figures into `out_dir` and list them in the page's order.

    Args:
        summary: the compare stage's summary (baseline, best_non_transfer, confidence, recommendation).
        class_names: the target classes, in label order.
        gain_rows: the rows of plots/gain.csv.
        figures: figures drawn by other stages (compute, agreement), placed after the headline.
        history_dir: `<model>/seed_<s>.csv` histories (a learning-curves figure when there is one).
        confusion_dir: `<model>.csv` actual/predicted pairs; the recommended model's and scratch's are
            drawn (scratch's only when it is not the recommended model).
        out_dir: where the new PNGs go.

    Returns:
        (headline, rest): the headline figure, the page's first (None when no transfer strategy has a gain to
        draw), and `figures`, then the learning curves and confusions that could be drawn.
    """
    out_dir = Path(out_dir)
    pct = round(100 * summary["confidence"])
    # The summary's key, spelled out: the report stage's declared deps (dvc.yaml) do not include the evaluation
    # package, so the page is drawn from the outputs alone.
    best = summary.get("best_non_transfer")
    if best:  # every transfer strategy against the best model without transfer
        rows = headline_rows(gain_rows, set(best["candidates"]))
        title = f"Test accuracy gain over {best['name']}, the best model without transfer ({pct}% CI)"
        reference, png = best["name"], "gain_over_best_non_transfer.png"
    else:  # a summary written before the reference existed: against scratch
        rows = [r for r in gain_rows if r.get("gain") is not None]
        title = f"Test accuracy gain over {summary['baseline']} ({pct}% CI over test samples and seeds)"
        reference, png = summary["baseline"], "gain_over_scratch.png"
    headline = gain_png(rows, title, out_dir / png, reference=reference) if rows else None
    out = list(map(Path, figures))
    curves = {
        d.name: {s: h.to_dict("records") for s, h in layout.read_histories(d).items()}
        for d in sorted(Path(history_dir).iterdir())
        if d.is_dir()
    }
    if curves:
        out.append(curves_png(curves, out_dir / "learning_curves.png"))
    choice = (summary.get("recommendation") or {}).get("choice")
    index = {c: i for i, c in enumerate(class_names)}
    for role, model in (("recommended", choice), ("scratch", summary["baseline"])):
        conf_csv = Path(confusion_dir) / f"{model}.csv"
        if not model or not conf_csv.is_file() or (role == "scratch" and model == choice):
            continue
        conf = pd.read_csv(conf_csv)
        matrix = np.zeros((len(class_names), len(class_names)), dtype=int)
        np.add.at(matrix, (conf["actual"].map(index), conf["predicted"].map(index)), 1)
        png = out_dir / f"confusion_{role}.png"
        out.append(confusion_png(matrix, class_names, f"{model}: test confusion (all seeds)", png))
    return headline, out

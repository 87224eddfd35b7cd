"""The report's own figures, drawn from the pipeline's outputs: the gain over the baseline with its interval,
every learning curve, and the test confusion of the recommended model and of the baseline (scratch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.core import layout
from transferlab.reporting.plots import confusion_png, curves_png, gain_png


def report_figures(
    summary: dict,
    class_names: list[str],
    gain_rows: list[dict],
    *,
    figures: list[Path],
    history_dir: str | Path,
    confusion_dir: str | Path,
    out_dir: str | Path,
) -> list[Path]:
    """Draw the report's figures into `out_dir` and list them in the page's order.

    Args:
        summary: the compare stage's summary (baseline, confidence, recommendation).
        class_names: the target classes, in label order.
        gain_rows: the rows of plots/gain.csv.
        figures: figures drawn by other stages (compute, agreement), placed after the gain.
        history_dir: `<model>/seed_<s>.csv` histories (a learning-curves figure when there is one).
        confusion_dir: `<model>.csv` actual/predicted pairs; the recommended model's and the baseline's are
            drawn (the baseline's only when it is not the recommended model).
        out_dir: where the new PNGs go.

    Returns:
        The gain figure, `figures`, then the learning curves and confusions that could be drawn.
    """
    out_dir = Path(out_dir)
    pct = round(100 * summary["confidence"])
    title = f"Test accuracy gain over {summary['baseline']} ({pct}% CI over test samples and seeds)"
    out = [gain_png(gain_rows, title, out_dir / "gain_over_scratch.png"), *map(Path, figures)]
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
    return out

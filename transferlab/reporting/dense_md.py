"""The dense tasks for people: reports/dense_<task>.md (the table of test scores with intervals, the
recommendation made on validation, the negative-transfer check, what does not apply) and a PNG of predictions
against ground truth on a few test images. Reads only `evaluation.dense_metrics.dense_summary`'s dict and the
prepared test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def predictions_png(
    images: np.ndarray,
    truth: list[Any],
    predicted: dict[str, list[Any]],
    task: str,
    class_names: list[str],
    path: str | Path,
    score_threshold: float = 0.3,
) -> Path:
    """One row per test image: the ground truth, then each strategy's prediction (boxes with a score of at
    least `score_threshold`, or the label mask), seed 0's model."""
    names = list(predicted)
    fig, axes = plt.subplots(
        len(images), 1 + len(names), figsize=(1.8 * (1 + len(names)), 1.8 * len(images)), squeeze=False
    )
    for i, img in enumerate(images):
        panels = [("ground truth", truth[i])] + [(n, predicted[n][i]) for n in names]
        for j, (title, item) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if task == "segmentation":
                overlay = np.zeros((*item.shape, 4))
                for c in range(1, len(class_names) + 1):
                    overlay[item == c] = matplotlib.colors.to_rgba(COLOURS[(c - 1) % len(COLOURS)], 0.55)
                ax.imshow(overlay)
                continue
            if j == 0:
                boxes = [(o["bbox"], o["category"], None) for o in item]
            else:
                boxes = [
                    (b, lab, s)
                    for b, lab, s in zip(item["boxes"], item["labels"], item["scores"], strict=True)
                    if s >= score_threshold
                ]
            for (x, y, w, h), lab, s in boxes:
                colour = COLOURS[int(lab) % len(COLOURS)]
                ax.add_patch(patches.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, linewidth=1.2))
                label = class_names[int(lab)] + ("" if s is None else f" {s:.2f}")
                ax.text(x, y - 1, label, color=colour, fontsize=5, va="bottom")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def dense_markdown(summary: dict[str, Any], figure: str, baseline: str) -> str:
    """reports/dense_<task>.md from `dense_summary`'s dict; `figure`: the PNG's path relative to the report."""
    task, metric = summary["task"], summary["metric"]
    label = "mAP@[.5:.95]" if metric == "map" else "mean IoU"
    gains = summary[f"gain_vs_{baseline}"]
    rec = summary["recommendation"]
    lines = [
        f"# Dense task: {task}",
        "",
        f"Classes: {', '.join(summary['class_names'])}; {summary['test_images']} test images. Recommended (chosen "
        f"on {rec['chosen_on']}): **{rec['strategy']}**.",
        "",
        f"| strategy | test {label} (mean over seeds) | per seed |"
        + (" mAP@.5 |" if metric == "map" else "")
        + f" val {label} | gain vs {baseline} [interval] | verdict | epochs | under-trained |",
        "|---|---|---|" + ("---|" if metric == "map" else "") + "---|---|---|---|---|",
    ]
    for s, row in summary["strategies"].items():
        per = ", ".join(f"{v:.3f}" for v in row[f"test_{metric}_per_seed"].values())
        g = gains.get(s)
        gain = "(reference)" if g is None else f"{g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        verdict = "" if g is None else g["verdict"]
        extra = f" {_fmt(row.get('test_map_50'))} |" if metric == "map" else ""
        lines.append(
            f"| {s} | {_fmt(row[f'test_{metric}'])} | {per} |{extra} {_fmt(row[f'val_{metric}'])} | {gain} | {verdict} "
            f"| {row['epochs']} | {'yes' if row['under_trained'] else 'no'} |"
        )
    neg = summary["negative_transfer"]
    lines += [
        "",
        f"Intervals: {summary['interval']}.",
        "",
        f"Negative transfer ({summary['negative_transfer_rule']}): " + (", ".join(neg) if neg else "none found") + ".",
        "",
        "Training fit at the end (training images, seed by seed): "
        + "; ".join(
            f"{s}: {label} "
            + ", ".join(f"{v:.3f}" for v in r["final_train_score"].values())
            + " (loss "
            + ", ".join(f"{v:.3f}" for v in r["final_train_loss"].values())
            + ")"
            for s, r in summary["strategies"].items()
        )
        + ".",
        "",
        f"![predictions vs ground truth]({figure})",
        "",
        "## Checks of the classification pipeline that do not apply here",
        "",
        *[f"- {k}: {v}" for k, v in summary["not_applicable"].items()],
        "",
    ]
    return "\n".join(lines)

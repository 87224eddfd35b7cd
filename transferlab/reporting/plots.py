"""PNG figures for people (DVC plots get the CSVs; these go to MLflow and the report)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_png(confusion: np.ndarray, class_names: list[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    norm = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(class_names), 1 + 0.5 * len(class_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                int(confusion[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def headline_rows(gain_rows: list[dict], exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """The headline figure's bars from the rows of plots/gain.csv: each model's gain over the best model without
    transfer (`gain_vs_best_non_transfer` and its interval), renamed to `gain_png`'s fields.

    Args:
        gain_rows: plots/gain.csv's rows (read back by pandas, so a missing gain is NaN).
        exclude: models to leave out (the models without transfer themselves).

    Returns:
        [{'name', 'gain', 'ci_low', 'ci_high', 'verdict'}] for every row with a gain against the reference.
    """
    out = []
    for r in gain_rows:
        g = r.get("gain_vs_best_non_transfer")
        if r["name"] in exclude or g is None or (isinstance(g, float) and math.isnan(g)):
            continue
        out.append(
            {
                "name": r["name"],
                "gain": float(g),
                "ci_low": float(r["ci_low_vs_best_non_transfer"]),
                "ci_high": float(r["ci_high_vs_best_non_transfer"]),
                "verdict": r.get("verdict_vs_best_non_transfer"),
            }
        )
    return out


def gain_png(rows: list[dict], title: str, path: str | Path, *, reference: str = "baseline") -> Path:
    """Horizontal bars: each model's test accuracy gain over `reference` with its CI as error bars, the
    numbers written beside each bar (green: the interval is above zero, red: below, gray: it straddles zero)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["gain"])  # barh draws bottom-up: the largest gain on top
    names = [r["name"] for r in rows]
    gain = np.array([r["gain"] for r in rows]) * 100
    lo = gain - np.array([r["ci_low"] for r in rows]) * 100
    hi = np.array([r["ci_high"] for r in rows]) * 100 - gain
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    colors = ["tab:green" if r["ci_low"] > 0 else "tab:red" if r["ci_high"] < 0 else "tab:gray" for r in rows]
    ax.barh(names, gain, xerr=[lo, hi], color=colors, capsize=4)
    # The numbers in a column right of the axes (x in axes units, y in data units): never over a bar or a whisker.
    column = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
    for i, r in enumerate(rows):
        label = f"{100 * r['gain']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
        ax.text(1.02, i, label, transform=column, va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"gain over {reference} (percentage points; whiskers: the CI)", fontsize=9)
    fig.suptitle(textwrap.fill(title, 70), fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the right fifth holds the numbers
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def agreement_panels(frame) -> tuple[list[str], list[str]]:
    """(estimators with at least one defined estimate, estimators undefined for every candidate): only the
    first get a panel (an undefined estimator, e.g. H-score when the feature rank reaches the sample count,
    would be a blank plot)."""
    names = sorted(frame["estimator"].unique())
    defined = [e for e in names if frame.loc[frame["estimator"] == e, "estimate"].notna().any()]
    return defined, [e for e in names if e not in defined]


def agreement_png(frame, path: str | Path) -> Path:
    """One panel per estimator defined here: estimate (x) against achieved test accuracy (y), one point per
    candidate, one marker per recipe; the undefined estimators are named under the panels, not drawn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    estimators, undefined = agreement_panels(frame)
    cols = max(1, min(4, len(estimators)))
    rows = max(1, -(-len(estimators) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    markers = {"linear_probe": "o", "short_finetune": "s"}
    for ax, est in zip(axes.flat, estimators, strict=False):
        sub = frame[(frame["estimator"] == est) & frame["estimate"].notna()]
        for recipe, g in sub.groupby("recipe"):
            ax.scatter(g["estimate"], g["test_accuracy"], marker=markers.get(recipe, "x"), label=recipe)
            for _, r in g.iterrows():
                ax.annotate(r["candidate"], (r["estimate"], r["test_accuracy"]), fontsize=6)
        ax.set_title(est, fontsize=9)
        ax.set_xlabel("estimate", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
    for ax in list(axes.flat)[len(estimators) :]:
        ax.axis("off")
    if estimators:
        axes.flat[0].legend(fontsize=7)
    else:
        axes.flat[0].text(0.5, 0.5, "no estimator is defined for these candidates", ha="center", va="center")
    if undefined:
        note = f"not drawn, undefined for every candidate (reason in metrics/score.json): {', '.join(undefined)}"
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if undefined else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compute_png(curves: list[dict], path: str | Path) -> Path:
    """Validation accuracy against cumulative training compute (GFLOPs, log scale), one line per strategy
    and seed: where transfer pays off against training from scratch at equal compute."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({c["name"] for c in curves})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for name in names:
        seeds = sorted({c["seed"] for c in curves if c["name"] == name})
        for k, seed in enumerate(seeds):
            pts = sorted(
                (c["train_gflops"], c["val_accuracy"]) for c in curves if c["name"] == name and c["seed"] == seed
            )
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, marker=".", color=colors[name], alpha=0.85, label=name if k == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (GFLOPs, forward + backward ~ 3x forward, cumulative)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy against training compute (one line per seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_png(curves: dict[str, dict[int, list[dict]]], path: str | Path) -> Path:
    """Learning curves: training and validation accuracy per epoch, one panel per strategy, one line per
    seed (the plateau each run stopped on is visible as its flat tail)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(curves)
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for k, (seed, hist) in enumerate(sorted(curves[name].items())):
            epochs = [r["epoch"] for r in hist]
            ax.plot(epochs, [r["val_accuracy"] for r in hist], color=f"C{k}", label=f"val, seed {seed}")
            ax.plot(epochs, [r["train_accuracy"] for r in hist], color=f"C{k}", ls=":", label=f"train, seed {seed}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""PNG figures for people (DVC plots get the CSVs; these go to MLflow and the report)."""

from __future__ import annotations

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


def gain_png(rows: list[dict], title: str, path: str | Path) -> Path:
    """Horizontal bars: each strategy's accuracy gain over the baseline with its CI as error bars."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in rows]
    gain = np.array([r["gain"] for r in rows]) * 100
    lo = gain - np.array([r["ci_low"] for r in rows]) * 100
    hi = np.array([r["ci_high"] for r in rows]) * 100 - gain
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    colors = ["tab:green" if r["ci_low"] > 0 else "tab:red" if r["ci_high"] < 0 else "tab:gray" for r in rows]
    ax.barh(names, gain, xerr=[lo, hi], color=colors, capsize=4)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("test accuracy gain over baseline (percentage points; bars: the configured CI)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def agreement_png(frame, path: str | Path) -> Path:
    """One panel per estimator: estimate (x) against achieved test accuracy (y), one point per candidate,
    one marker per recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    estimators = sorted(frame["estimator"].unique())
    cols = min(4, len(estimators))
    rows = -(-len(estimators) // cols)
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
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
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

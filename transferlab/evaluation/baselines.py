"""Classical baselines that need no pre-training: the bar any transfer result should clear honestly.

Images: multinomial logistic regression on raw (grayscale) pixels (`raw_pixel_logreg`). Texts: the same
classifier on TF-IDF word uni- and bigrams (`tfidf_logreg`), the classical text-classification bar.

The baseline gets the same protocol as every strategy: its one hyper-parameter (the inverse L2 strength
C) is chosen on the validation split from a grid, and the test split is only used to report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from transferlab.evaluation.metrics import classification_metrics
from transferlab.evaluation.predictions import predictions_frame

if TYPE_CHECKING:
    import pandas as pd

    from transferlab.data.splits import Prepared


def raw_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float (N, H*W) grayscale pixels in [0, 1]."""
    return images.astype(np.float32).mean(axis=3).reshape(len(images), -1) / 255.0


def _proba(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    proba = np.zeros((x.shape[0], num_classes))
    proba[:, clf.classes_] = clf.predict_proba(x)
    return proba


def _choose_C(x: dict, labels: dict, C_grid: list[float], make, num_classes: int) -> tuple:
    grid, best = [], None
    for C in sorted(C_grid):
        clf = make(C)
        clf.fit(x["train"], labels["train"])
        val_proba = _proba(clf, x["val"], num_classes)
        acc = float((val_proba.argmax(1) == labels["val"]).mean())
        grid.append({"C": C, "val_accuracy": round(acc, 6)})
        if best is None or acc > best[0]:
            best = (acc, C, clf, val_proba)
    acc, C, clf, val_proba = best
    return val_proba, _proba(clf, x["test"], num_classes), {"C": C, "val_accuracy": round(acc, 6), "grid": grid}


def tfidf_logreg(
    texts: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    C_grid: list[float],
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Logistic regression on TF-IDF of word uni- and bigrams (sublinear tf, fitted on train only), C chosen
    on validation accuracy. Same arguments and returns as `raw_pixel_logreg`, with texts for images."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    num_classes = int(max(labels[s].max() for s in labels)) + 1
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)
    vec.fit([str(t) for t in texts["train"]])
    x = {s: vec.transform([str(t) for t in texts[s]]) for s in ("train", "val", "test")}
    return _choose_C(
        x, labels, C_grid, lambda C: LogisticRegression(C=C, max_iter=max_iter, random_state=seed), num_classes
    )


def raw_pixel_logreg(
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    C_grid: list[float],
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Standardised multinomial logistic regression on raw pixels, C chosen on validation accuracy.

    Args:
        images, labels: the prepared splits ('train', 'val', 'test').
        C_grid: candidate inverse L2 strengths; ties go to the smaller C (the stronger regulariser).
        max_iter: L-BFGS iterations.
        seed: `random_state` of the solver.

    Returns:
        (val_proba, test_proba, search): probabilities of the chosen model on val and test, and
        {'C', 'val_accuracy', 'grid': [{'C', 'val_accuracy'}, ...]}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = int(max(labels[s].max() for s in labels)) + 1
    x = {s: raw_pixels(images[s]) for s in ("train", "val", "test")}
    return _choose_C(
        x,
        labels,
        C_grid,
        lambda C: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)),
        num_classes,
    )


# `baseline.model` -> (fit, the Prepared field it reads): raw pixels of images, or texts.
BASELINES = {"raw_pixel_logreg": (raw_pixel_logreg, "images"), "tfidf_logreg": (tfidf_logreg, "texts")}


def evaluate_baseline(
    name: str, data: Prepared, *, C_grid: list[float], max_iter: int, seed: int
) -> tuple[dict, pd.DataFrame]:
    """Fit the classical baseline `name` (C chosen on validation) and evaluate it on test like a strategy.

    Args:
        name: a key of BASELINES (`baseline.model`); it must read what `data` holds (images or texts).
        data: the prepared splits.
        C_grid, max_iter, seed: as for `raw_pixel_logreg`.

    Returns:
        (metrics, predictions): the test metrics (`classification_metrics` without the confusion matrix) plus
        the fields of a strategy's train metrics that the comparison reads (best_val_accuracy_mean,
        val_samples) and the C search; the per-sample test predictions (`predictions_frame`, seed 0).

    Raises:
        ValueError: `name` is not a classical baseline.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline.model: unknown baseline '{name}' (valid: {sorted(BASELINES)})")
    fit, field = BASELINES[name]
    _, proba, search = fit(getattr(data, field), data.labels, C_grid=list(C_grid), max_iter=max_iter, seed=seed)
    metrics = classification_metrics(data.labels["test"], proba, data.class_names)
    metrics.pop("confusion")
    # The same fields as a strategy's train metrics, so that the recommendation (on validation) and the
    # comparison treat it as one more row.
    metrics.update(
        {
            "best_val_accuracy_mean": search["val_accuracy"],
            "val_samples": len(data.labels["val"]),
            "C": search["C"],
            "C_search": search["grid"],
        }
    )
    frame = predictions_frame(data.ids["test"], 0, data.labels["test"], proba, data.class_names)
    return metrics, frame

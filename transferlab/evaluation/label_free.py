"""Predicting a model's accuracy on unlabelled deployment images from its confidences.

* Average confidence (AC): the mean of the top softmax probability on the deployment images. The baseline a
  label-free predictor must beat (Hendrycks & Gimpel 2017 show confidences track accuracy only roughly).
* Average thresholded confidence (ATC; Garg, Balakrishnan, Lipton, Neyshabur & Sedghi, "Leveraging Unlabeled
  Data to Predict Out-of-Distribution Performance", ICLR 2022): a threshold t is chosen on labelled
  in-distribution VALIDATION data so that the fraction of validation images whose score exceeds t equals the
  validation accuracy; the predicted deployment accuracy is the fraction of deployment images whose score
  exceeds t. The score is the negative entropy of the softmax (the paper's ATC-NE, its better variant).
* Difference of confidences (DoC; Guillory et al. 2021): validation accuracy minus the drop in average
  confidence from validation to deployment. Reported beside the two; not used to choose.

A predictor is called useful only where deployment labels exist and its error is below AC's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREDICTORS = ("atc", "average_confidence", "doc")


def _check_proba(p: Any, name: str) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < 2:
        raise ValueError(f"{name} must be (n, classes) probabilities with n >= 1, classes >= 2; got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def negative_entropy(proba: np.ndarray) -> np.ndarray:
    """sum_k p_k log p_k per row (0 log 0 = 0): 0 for a one-hot prediction, -log K for a uniform one."""
    p = np.clip(proba, 1e-300, 1.0)
    return np.sum(np.where(proba > 0, proba * np.log(p), 0.0), axis=1)


def atc_threshold(val_proba: Any, val_labels: Any) -> float:
    """The ATC threshold: t with mean(score_val > t) = validation accuracy (score: negative entropy).

    With n validation images and accuracy a, t is the score of the (n - round(a n))-th smallest score, so that
    exactly round(a n) scores lie strictly above it when scores are distinct.
    """
    p = _check_proba(val_proba, "val_proba")
    y = np.asarray(val_labels)
    if y.shape != (len(p),):
        raise ValueError(f"val_labels must be ({len(p)},), got {y.shape}")
    acc = float((p.argmax(1) == y).mean())
    scores = np.sort(negative_entropy(p))
    k = len(scores) - int(round(acc * len(scores)))  # scores strictly above t: the top round(a n)
    if k <= 0:
        return float(scores[0] - 1.0)  # every score above: the threshold sits below the lowest
    return float(scores[k - 1])


def predict_accuracy(val_proba: Any, val_labels: Any, deploy_proba: Any) -> dict[str, float]:
    """Every predictor's estimate of the deployment accuracy of one model.

    Args:
        val_proba, val_labels: the model's probabilities on labelled in-distribution validation images.
        deploy_proba: its probabilities on the deployment images (no labels).

    Returns:
        {"atc", "average_confidence", "doc", "atc_threshold", "val_accuracy", "val_confidence"}.
    """
    p_val = _check_proba(val_proba, "val_proba")
    p_dep = _check_proba(deploy_proba, "deploy_proba")
    if p_val.shape[1] != p_dep.shape[1]:
        raise ValueError(f"val and deployment probabilities have {p_val.shape[1]} and {p_dep.shape[1]} classes")
    y = np.asarray(val_labels)
    t = atc_threshold(p_val, y)
    val_acc = float((p_val.argmax(1) == y).mean())
    val_conf = float(p_val.max(1).mean())
    dep_conf = float(p_dep.max(1).mean())
    return {
        "atc": float((negative_entropy(p_dep) > t).mean()),
        "average_confidence": dep_conf,
        "doc": float(np.clip(val_acc - (val_conf - dep_conf), 0.0, 1.0)),
        "atc_threshold": t,
        "val_accuracy": val_acc,
        "val_confidence": val_conf,
    }


def predictor_errors(predicted: list[dict[str, float]], measured: list[float]) -> dict[str, Any]:
    """Mean absolute error of each predictor over cases (models, seeds, groups), and whether ATC is useful.

    Args:
        predicted: one `predict_accuracy` result per case.
        measured: the case's accuracy on labelled deployment images, in the same order.

    Returns:
        {"mae": {predictor: error}, "cases": n, "atc_useful": ATC's error below AC's, "best": the predictor
        with the lowest error}.
    """
    if len(predicted) != len(measured) or not measured:
        raise ValueError(f"need one measured accuracy per prediction (got {len(predicted)} and {len(measured)})")
    m = np.asarray(measured, dtype=np.float64)
    mae = {k: float(np.mean(np.abs(np.array([p[k] for p in predicted]) - m))) for k in PREDICTORS}
    return {
        "mae": {k: round(v, 6) for k, v in mae.items()},
        "cases": len(m),
        "atc_useful": mae["atc"] < mae["average_confidence"],
        "best": min(mae, key=mae.get),
    }

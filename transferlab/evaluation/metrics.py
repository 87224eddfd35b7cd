"""Test-set metrics for one trained model: accuracy, balanced accuracy, macro and per-class precision /
recall / F1, confusion matrix, calibration (ECE, NLL), and latency per image (CPU unless a device is given)."""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., ICML 2017)."""
    conf = proba.max(1)
    correct = proba.argmax(1) == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Every test metric of one model.

    Args:
        y_true: int labels (N,).
        proba: predicted class probabilities (N, C).
        class_names: names of the C classes.

    Returns:
        Flat headline metrics, `per_class` {name: precision, recall, f1, support} and `confusion` (C x C,
        rows = true class).
    """
    y_pred = proba.argmax(1)
    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    eps = 1e-12
    nll = float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1)).mean())
    r6 = lambda v: round(float(v), 6)  # noqa: E731 - six decimals keep diffs readable, far below CI widths
    return {
        "test_accuracy": r6((y_pred == y_true).mean()),
        "balanced_accuracy": r6(balanced_accuracy_score(y_true, y_pred)),
        "macro_precision": r6(mp),
        "macro_recall": r6(mr),
        "macro_f1": r6(mf),
        "nll": r6(nll),
        "ece": r6(expected_calibration_error(proba, y_true)),
        "test_samples": len(y_true),
        "per_class": {
            name: {"precision": r6(p[i]), "recall": r6(r[i]), "f1": r6(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


@torch.no_grad()
def latency_ms_per_image(
    model: nn.Module,
    example: torch.Tensor,
    n_images: int,
    batch_size: int = 1,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Median wall time per image at `batch_size`, after two warm-up batches (milliseconds).

    On the CPU by default: the deployment latency this project reports. With a CUDA `device` the model is
    moved there, run in float32 (what is timed is the model as saved, not autocast), and each batch is
    synchronised before the clock stops (CUDA kernels are asynchronous).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    model.to(device).eval()
    x = example[:batch_size]
    if len(x) < batch_size:
        x = x.repeat(math_ceil(batch_size, len(x)), *([1] * (x.dim() - 1)))[:batch_size]  # images or token ids
    x = x.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        model(x)
    sync()
    times = []
    for _ in range(max(1, n_images // batch_size)):
        t = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t) / batch_size)
    return float(np.median(times) * 1000)


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)

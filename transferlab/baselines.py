"""Classical baselines that need no pre-training: the bar any transfer result should clear honestly."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def raw_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float (N, H*W) grayscale pixels in [0, 1]."""
    return images.astype(np.float32).mean(axis=3).reshape(len(images), -1) / 255.0


def raw_pixel_logreg(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, *, C: float, max_iter: int, seed: int
) -> np.ndarray:
    """Fit a standardised multinomial logistic regression on raw pixels; return test probabilities."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(raw_pixels(train_images), train_labels)
    proba = np.zeros((len(test_images), int(train_labels.max()) + 1))
    proba[:, clf.classes_] = clf.predict_proba(raw_pixels(test_images))
    return proba

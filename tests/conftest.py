"""Shared fixtures: tiny data and a tiny timm source, so that every test runs in seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from transferlab.backbones import SourceModel, load_source
from transferlab.params import SourceSpec

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

TINY_ARCH = "test_efficientnet"  # timm's own ~100k-parameter EfficientNet for tests


def make_images(n_per_class: int, n_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable synthetic images: class c is a bright horizontal band at a class-specific height."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    band = max(1, size // n_classes)
    for c in range(n_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[c * band : (c + 1) * band] = rng.integers(180, 255, (min(band, size - c * band), size, 3))
            images.append(img)
            labels.append(c)
    return np.stack(images), np.asarray(labels, np.int64)


@pytest.fixture
def tiny_data() -> dict:
    """3 classes, 32 px: train 8/class, val 4/class, test 6/class."""
    out = {"images": {}, "labels": {}}
    for i, (split, n) in enumerate((("train", 8), ("val", 4), ("test", 6))):
        out["images"][split], out["labels"][split] = make_images(n, 3, 32, seed=i)
    out["class_names"] = ["a", "b", "c"]
    return out


@pytest.fixture
def tiny_source() -> SourceModel:
    torch.manual_seed(0)
    return load_source("tiny", SourceSpec(kind="random_init", arch=TINY_ARCH), seed=0)


@pytest.fixture
def tiny_features(tiny_source, tiny_data) -> dict:
    """The tiny source's penultimate features of the train and val images: a features cache."""
    from transferlab.backbones import extract

    return {
        s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std, with_logits=False)[0]
        for s in ("train", "val")
    }

"""Shared fixtures: tiny data and a tiny timm source, so that every test runs in seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from transferlab.models.sources import SourceModel, load_source
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
    from transferlab.models.inference import extract

    return {
        s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std, with_logits=False)[0]
        for s in ("train", "val")
    }


def two_worker_study(storage_url: str, calls_dir, study_name: str = "parallel", **kw) -> dict:
    """Ten trials of a known objective optimised by two forked workers on one study in `storage_url`, with
    the checks every parallel storage must pass: each trial of the budget ran once (none lost, none duplicated),
    in both workers and never in this process, on the values the study recorded, and the best reported is the
    best of all, in the storage too. Returns `tune`'s result (`kw` goes to `tune`, e.g. on_trial_end)."""
    import math

    import optuna

    from transferlab.tuning.optuna_backend import open_storage, tune
    from transferlab.tuning.space import SearchSpace

    space = SearchSpace.from_dict({"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    calls_dir.mkdir()

    def objective(config, report):
        (calls_dir / f"{os.getpid()}-{config['lr']:.17g}").write_text("")
        return -((math.log10(config["lr"]) + 2) ** 2)

    common = dict(storage_url=storage_url, base_config={"kind": "lora"}, pruner=False, study_name=study_name)
    result = tune(objective, space, n_trials=10, seed=0, workers=2, **common, **kw)
    assert sorted(t["number"] for t in result["trials"]) == list(range(10))
    assert [t["state"] for t in result["trials"]].count("COMPLETE") == 10
    made = [p.name.split("-") for p in calls_dir.iterdir()]
    pids = {int(pid) for pid, _ in made}
    assert len(made) == 10 and len(pids) == 2 and os.getpid() not in pids  # each trial once, in both workers
    assert sorted(float(lr) for _, lr in made) == sorted(t["params"]["lr"] for t in result["trials"])
    assert result["best_value"] == max(t["value"] for t in result["trials"])
    reloaded = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    assert sorted(t.number for t in reloaded.trials) == list(range(10))
    assert reloaded.best_value == result["best_value"] and reloaded.best_params == result["best_params"]
    return result

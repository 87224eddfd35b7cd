"""In-pipeline source models: pre-train a small network on a known source task (MNIST digits by default),
so that the source task's accuracy can be measured before and after transfer (catastrophic forgetting),
and so that a near-domain source can be contrasted with ImageNet ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from transferlab.io import save_torch, write_npy
from transferlab.params import DataParams

if TYPE_CHECKING:
    import torch

    from transferlab.training import TrainResult

# params validation reads `PretrainSpec`: torch, timm and the training loop are imported by `pretrain` only.


class PretrainSpec(BaseModel):
    """`pretrain.<name>` in params: what to train and on which source task."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field("mnist_digits", description="a dataset loader name (see transferlab.data.LOADERS)")
    path: str | None = Field(None, description="dataset folder, for loaders that need one")
    # ResNet-10-T reached 96% on held-out digits after 2 epochs of 2,000 images (about a minute on 2 cores);
    # MobileNetV3-small reached 39% with the same budget: depthwise nets train slowly from scratch.
    arch: str = Field("resnet10t", description="timm architecture, trained from random init")
    # Digits need no more than 32 px; the network is fully convolutional, so it runs at the target size too.
    image_size: int = Field(32, ge=16, le=512, description="pre-training image size (source task)")
    train_per_class: int = Field(200, ge=1)
    test_per_class: int = Field(100, ge=1, description="held-out source-task test set (kept for forgetting checks)")
    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)


def pretrain(
    spec: PretrainSpec, seed: int, generator: torch.Generator, label: str = "pretrain"
) -> tuple[TrainResult, dict, dict]:
    """Train `spec.arch` from scratch on the source task.

    Returns:
        (result, source_test, metrics): the trained model, the held-out source test split {images, labels,
        class_names}, and {source_test_accuracy, ...}.
    """
    import timm
    import torch

    from transferlab.data import load_dataset, prepare_splits
    from transferlab.strategies.base import Strategy, StrategyConfig
    from transferlab.training import fit, image_batches, predict_logits

    data_params = DataParams(
        dataset=spec.dataset,
        path=spec.path,
        image_size=spec.image_size,
        train_per_class=spec.train_per_class,
        val_per_class=max(1, spec.test_per_class // 2),
        test_per_class=spec.test_per_class,
    )
    raw = load_dataset(data_params)
    splits, _ = prepare_splits(raw, data_params, seed)
    torch.manual_seed(seed)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=len(raw.class_names))
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    cfg = StrategyConfig(kind="scratch", lr=spec.lr)
    result = fit(
        model,
        Strategy(),
        cfg,
        image_batches(splits["train"]["images"], norm, "crop", generator),
        splits["train"]["labels"],
        image_batches(splits["val"]["images"], norm, "none", generator),
        splits["val"]["labels"],
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        patience=spec.epochs,
        weight_decay=1e-4,
        generator=generator,
        label=label,
    )
    test_images, test_labels = splits["test"]["images"], splits["test"]["labels"]
    batches = image_batches(test_images, norm, "none", generator)
    logits = predict_logits(result.model, lambda idx: batches(idx, False), len(test_labels))
    accuracy = float((logits.argmax(1).numpy() == test_labels).mean())
    metrics = {
        "source_test_accuracy": round(accuracy, 6),
        "source_val_accuracy": round(result.best_val_accuracy, 6),
        "best_epoch": result.best_epoch,
        "source_classes": len(raw.class_names),
        "source_train_samples": int(len(splits["train"]["labels"])),
        "source_test_samples": int(len(test_labels)),
    }
    source_test = {"images": test_images, "labels": test_labels, "class_names": raw.class_names, **norm}
    return result, source_test, metrics


def save_pretrained(out_dir: str | Path, result: TrainResult, spec: PretrainSpec, source_test: dict) -> None:
    """model.pt (what `backbones` kind 'pipeline' loads) + the held-out source-task test split."""
    out_dir = Path(out_dir)
    save_torch(
        out_dir / "model.pt",
        {
            "arch": spec.arch,
            "num_classes": len(source_test["class_names"]),
            "kwargs": {},
            "mean": list(source_test["mean"]),
            "std": list(source_test["std"]),
            "state_dict": result.model.state_dict(),
            "class_names": source_test["class_names"],
        },
    )
    write_npy(out_dir / "source_test_images.npy", source_test["images"])
    write_npy(out_dir / "source_test_labels.npy", np.asarray(source_test["labels"]))

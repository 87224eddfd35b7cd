"""The training loop every strategy shares: seeded batches, light augmentation, cosine learning rate,
per-epoch train/val loss and accuracy, early stopping on validation accuracy with the best weights kept,
and a clear error when the loss diverges."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transferlab.backbones import SourceModel, count_params, to_input
from transferlab.strategies import Strategy, StrategyConfig

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the message names the strategy, the step and the fix."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    train_seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random shift (pad by 1/8 of the side, reflect, crop back) and, with 'crop_flip', horizontal flips."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if mode == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, inputs: Callable[[np.ndarray], torch.Tensor], n: int, batch_size: int = 256
) -> torch.Tensor:
    """Logits of `model` (eval mode) over n samples; `inputs(idx)` builds a batch."""
    model.eval()
    out = [model(inputs(np.arange(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]
    return torch.cat(out).float()


def predict_images(model: nn.Module, images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """Logits of `model` (eval mode) over uint8 (N, H, W, 3) images, normalised with `mean` / `std`."""
    return predict_logits(model, lambda idx: to_input(images[idx], mean, std), len(images))


def fit(
    model: nn.Module,
    strategy: Strategy,
    cfg: StrategyConfig,
    train_inputs: Callable[[np.ndarray, bool], torch.Tensor],
    train_labels: np.ndarray,
    val_inputs: Callable[[np.ndarray, bool], torch.Tensor],
    val_labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    weight_decay: float,
    generator: torch.Generator,
    label: str = "",
) -> TrainResult:
    """Train `model` with early stopping on validation accuracy; the best epoch's weights are restored.

    Args:
        model: the module whose output is the logits (the whole network, or just the head for
            strategies that train on cached features).
        strategy, cfg: the strategy (its optimizer param groups, epoch hook, BatchNorm policy) and config.
        train_inputs, val_inputs: `fn(indices, train)` -> input batch (augmented when train is True).
        train_labels, val_labels: int labels.
        epochs, batch_size, patience, weight_decay: the recipe (params `train`, `strategies.<name>`).
        generator: seeded generator for shuffling and augmentation.
        label: name for progress bars and errors.

    Returns:
        TrainResult with the best model, the per-epoch history and the training time.

    Raises:
        DivergenceError: the loss became NaN/inf.
    """
    y_train = torch.as_tensor(train_labels, dtype=torch.long)
    y_val = torch.as_tensor(val_labels, dtype=torch.long)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(strategy.param_groups(model, cfg), weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    result = TrainResult(model=model)
    best_state, best_acc, since_best = None, -1.0, 0
    start = time.perf_counter()
    strategy.before_training(model, cfg, train_inputs, n)
    bar = tqdm(range(1, epochs + 1), desc=f"train {label}", disable=None, leave=False)
    for epoch in bar:
        strategy.on_epoch_start(model, epoch, cfg, optimizer)
        strategy.set_train_mode(model)
        order = torch.randperm(n, generator=generator).numpy()
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            inputs = train_inputs(idx, True)
            logits = model(inputs)
            loss = strategy.loss(logits, y_train[idx], inputs, cfg)
            extra = strategy.penalty(model, cfg)
            if extra is not None:
                loss = loss + extra
            if not torch.isfinite(loss):
                lrs = [g["lr"] for g in optimizer.param_groups]
                raise DivergenceError(
                    f"{label}: loss is {loss.item()} at epoch {epoch}, step {step + 1} (learning rates {lrs}). "
                    f"Lower strategies.{label}.lr (now {cfg.lr}) and run again; other strategies' results "
                    "are kept."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        val_logits = predict_logits(model, lambda i: val_inputs(i, False), len(y_val))
        val_loss = float(F.cross_entropy(val_logits, y_val))
        val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        row = {
            "epoch": epoch,
            "train_loss": round(loss_sum / n, 6),
            "train_accuracy": round(correct / n, 6),
            "val_loss": round(val_loss, 6),
            "val_accuracy": round(val_acc, 6),
        }
        result.history.append(row)
        bar.set_postfix(val_acc=f"{val_acc:.3f}")
        log.info("%s epoch %d: %s", label, epoch, row)
        if val_acc > best_acc:
            best_acc, since_best, result.best_epoch = val_acc, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= patience:
                result.stopped_early = epoch < epochs
                break
    result.train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    result.best_val_accuracy = best_acc
    return result


def image_batches(
    images: np.ndarray, source: SourceModel | dict, augment: str, gen: torch.Generator
) -> Callable[[np.ndarray, bool], torch.Tensor]:
    """`fn(indices, train)` -> normalised (and, when training, augmented) image batch."""
    mean, std = (source["mean"], source["std"]) if isinstance(source, dict) else (source.mean, source.std)

    def batch(idx: np.ndarray, train: bool) -> torch.Tensor:
        x = to_input(images[idx], mean, std)
        return augment_batch(x, augment, gen) if train else x

    return batch


def tensor_batches(array: np.ndarray) -> Callable[[np.ndarray, bool], torch.Tensor]:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return lambda idx, train: t[idx]


def train_strategy(
    strategy: Strategy,
    cfg: StrategyConfig,
    source: SourceModel,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    weight_decay: float,
    augment: str,
    seed: int,
    generator: torch.Generator,
    features: dict[str, np.ndarray] | None = None,
    label: str = "",
) -> TrainResult:
    """Build the strategy's model from the source and train it on the prepared splits.

    Strategies with `uses_features` train their head on `features` (the cache of the frozen
    backbone's penultimate features); the others train on the images.

    Raises:
        ValueError: a feature strategy got no features cache.
        DivergenceError: see `fit`.
    """
    if hasattr(strategy, "set_data"):  # strategies that train helpers of their own (a distillation teacher)
        strategy.set_data(images, labels)
    model = strategy.build(source, num_classes, cfg, seed)
    trainable, total = count_params(model)
    if strategy.uses_features:
        if features is None:
            raise ValueError(f"{label}: strategy '{strategy.name}' needs the features cache (features@<source>)")
        head = model.get_classifier()
        result = fit(
            head,
            strategy,
            cfg,
            tensor_batches(features["train"]),
            labels["train"],
            tensor_batches(features["val"]),
            labels["val"],
            epochs=epochs,
            batch_size=batch_size,
            patience=patience,
            weight_decay=weight_decay,
            generator=generator,
            label=label,
        )
        result.model = model.eval()
    else:
        result = fit(
            model,
            strategy,
            cfg,
            image_batches(images["train"], source, augment, generator),
            labels["train"],
            image_batches(images["val"], source, "none", generator),
            labels["val"],
            epochs=epochs,
            batch_size=batch_size,
            patience=patience,
            weight_decay=weight_decay,
            generator=generator,
            label=label,
        )
    result.trainable_params, result.total_params = trainable, total
    return result

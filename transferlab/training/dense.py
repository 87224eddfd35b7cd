"""Training of the dense tasks: the protocol of `dense-train@<strategy>`.

1. **Rate on validation.** Each multiplier of `dense.lr_grid` times the strategy's `lr` is trained for
   `dense.lr_search_epochs` (a cosine schedule of that length) on the first seed; the best validation score wins
   (ties: the multiplier nearest 1).
2. **One run per seed**: AdamW, a one-epoch linear warm-up, then cosine decay to 1% over the strategy's epochs
   (scratch's longer schedule: `strategies.dense.Scratch`); random horizontal flips. The checkpoint kept is the
   epoch with the best validation score (mAP@[.5:.95] for detection, mean IoU for segmentation).
3. **Under-trained** (`UNDER_TRAINED_RULE`): the last third of the schedule still raised the best validation
   score by more than `UNDER_TRAINED_GAIN`; such a run gets no verdict against it in the report.

The test split is never read here. The validation score is handed in (`score`), so this layer does not import
the evaluation layer above it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferlab.data.dense import DenseSplit
from transferlab.models.dense import decode_detections, detection_targets, to_batch
from transferlab.strategies.dense import DenseStrategy, DenseStrategyConfig

log = logging.getLogger(__name__)

UNDER_TRAINED_GAIN = 0.01
UNDER_TRAINED_RULE = (
    f"under-trained: the last third of the cosine schedule still raised the best validation score by more than "
    f"{UNDER_TRAINED_GAIN} (absolute)"
)
WARMUP_EPOCHS = 1
MIN_LR_RATIO = 0.01
# CenterNet's loss weights (Zhou et al. 2019): size regression at 0.1, offset at 1.
SIZE_WEIGHT, OFFSET_WEIGHT = 0.1, 1.0
TRAIN_EVAL_IMAGES = 80  # training images scored at the end (the fit on the training set, without flips)


@dataclass
class RunResult:
    """One training run: the best-validation checkpoint and the evidence around it."""

    state_dict: dict
    best_epoch: int
    best_val_score: float
    history: list[dict[str, float]]
    final_train_loss: float
    final_train_score: float
    under_trained: bool
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_val_score": round(self.best_val_score, 6),
            "final_train_loss": round(self.final_train_loss, 6),
            "final_train_score": round(self.final_train_score, 6),
            "under_trained": self.under_trained,
            "history": [{k: round(v, 6) for k, v in row.items()} for row in self.history],
        }


@dataclass
class Batches:
    """A split's inputs and targets, precomputed (both orientations, for the flips)."""

    split: DenseSplit
    task: str
    num_classes: int
    mean: tuple
    std: tuple
    targets: list[list[dict]] = field(default_factory=list)  # [orientation][image]

    def __post_init__(self) -> None:
        if self.task == "detection":
            size = self.split.images.shape[1]
            flipped = [
                [{**o, "bbox": [size - o["bbox"][0] - o["bbox"][2], *o["bbox"][1:]]} for o in objs]
                for objs in self.split.objects
            ]
            self.targets = [
                [detection_targets(o, self.num_classes, size) for o in objs] for objs in (self.split.objects, flipped)
            ]

    def inputs(self, rows: np.ndarray, flip: np.ndarray) -> tuple[Any, Any]:
        import torch

        imgs = self.split.images[rows].copy()
        imgs[flip] = imgs[flip][:, :, ::-1]
        x = to_batch(imgs, self.mean, self.std)
        if self.task == "segmentation":
            masks = self.split.masks[rows].copy()
            masks[flip] = masks[flip][:, :, ::-1]
            return x, torch.from_numpy(masks.astype(np.int64))
        t = [self.targets[int(f)][r] for r, f in zip(rows, flip, strict=True)]
        return x, t


def dense_loss(out: dict, targets: Any, task: str) -> Any:
    """Cross-entropy per pixel (segmentation); CenterNet's focal heatmap loss plus L1 size and offset at the
    object centres, normalised by the number of objects (detection)."""
    import torch
    from torch.nn import functional as F

    if task == "segmentation":
        return F.cross_entropy(out["logits"], targets)
    heat_t = torch.from_numpy(np.stack([t["heatmap"] for t in targets]))
    pred = torch.sigmoid(out["heatmap"]).clamp(1e-4, 1 - 1e-4)
    pos = heat_t.eq(1).float()
    neg_w = (1 - heat_t) ** 4
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred**2 * neg_w * (1 - pos)).sum()
    n_obj = max(1.0, float(pos.sum()))
    loss = -(pos_loss + neg_loss) / n_obj
    b = len(targets)
    idx = [torch.from_numpy(t["index"]) for t in targets]
    if sum(len(i) for i in idx):
        batch = torch.cat([torch.full((len(i),), k, dtype=torch.long) for k, i in enumerate(idx)])
        cells = torch.cat(idx)
        size = out["size"].reshape(b, 2, -1)[batch, :, cells]
        off = out["offset"].reshape(b, 2, -1)[batch, :, cells]
        size_t = torch.from_numpy(np.concatenate([t["size"] for t in targets]))
        off_t = torch.from_numpy(np.concatenate([t["offset"] for t in targets]))
        n = float(len(cells))
        loss = loss + SIZE_WEIGHT * F.l1_loss(size, size_t, reduction="sum") / n
        loss = loss + OFFSET_WEIGHT * F.l1_loss(off, off_t, reduction="sum") / n
    return loss


def predict(model: Any, data: Batches, batch_size: int, max_detections: int) -> tuple[list, float]:
    """Predictions of a split (per image: detection dicts, or (H, W) uint8 label masks) and the mean loss."""
    import torch

    model.eval()
    preds: list = []
    losses = []
    n = len(data.split)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            x, t = data.inputs(rows, np.zeros(len(rows), bool))
            out = model(x)
            losses.append(float(dense_loss(out, t, data.task)) * len(rows))
            if data.task == "detection":
                preds.extend(decode_detections(out, max_detections))
            else:
                preds.extend(out["logits"].argmax(1).numpy().astype(np.uint8))
    return preds, float(np.sum(losses) / n)


def _set_train_mode(model: Any) -> None:
    """Train mode, except BatchNorm layers whose weights are frozen (they keep the source's statistics)."""
    from torch import nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _lr_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    warm = min(WARMUP_EPOCHS, max(epochs - 1, 0)) * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    total = max(1, epochs * steps_per_epoch - warm)
    progress = (step - warm) / total
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit_dense(
    model: Any,
    strategy: DenseStrategy,
    cfg: DenseStrategyConfig,
    train: Batches,
    val: Batches,
    score: Callable[[list, DenseSplit], float],
    *,
    lr_mult: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    max_detections: int,
    seed: int,
) -> RunResult:
    """Train one model (see the module docstring) and return the best-validation checkpoint with its history.

    Raises:
        FloatingPointError: the training loss became NaN or infinite (a rate too high).
    """
    import torch

    start_time = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    groups = strategy.param_groups(model, cfg)
    for g in groups:
        g["lr"] *= lr_mult
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    n = len(train.split)
    steps = max(1, math.ceil(n / batch_size))
    history: list[dict[str, float]] = []
    best = (-math.inf, math.inf)
    best_state, best_epoch, step = None, 0, 0
    for epoch in range(1, epochs + 1):
        _set_train_mode(model)
        order = rng.permutation(n)
        flips = rng.random(n) < 0.5
        total = 0.0
        for b in range(steps):
            rows = order[b * batch_size : (b + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * _lr_factor(step, steps, epochs)
            x, t = train.inputs(rows, flips[rows])
            loss = dense_loss(model(x), t, train.task)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{strategy.name}: training loss {float(loss)} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            step += 1
        preds, val_loss = predict(model, val, batch_size, max_detections)
        val_score = float(score(preds, val.split))
        history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "val_score": val_score})
        log.info(
            "%s epoch %d: train loss %.4f val loss %.4f val score %.4f",
            strategy.name,
            epoch,
            total / n,
            val_loss,
            val_score,
        )
        if (val_score, -val_loss) > (best[0], -best[1]):
            best = (val_score, val_loss)
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
    sub = Batches(
        train.split.subset(np.arange(min(n, TRAIN_EVAL_IMAGES))), train.task, train.num_classes, train.mean, train.std
    )
    train_preds, train_loss = predict(model, sub, batch_size, max_detections)
    train_score = float(score(train_preds, sub.split))
    cut = epochs - max(1, epochs // 3)
    scores = [h["val_score"] for h in history]
    under = epochs >= 3 and max(scores[cut:]) - max(scores[:cut]) > UNDER_TRAINED_GAIN
    return RunResult(
        best_state, best_epoch, best[0], history, train_loss, train_score, bool(under), time.perf_counter() - start_time
    )


def choose_lr(
    build: Callable[[int], Any],
    strategy: DenseStrategy,
    cfg: DenseStrategyConfig,
    train: Batches,
    val: Batches,
    score: Callable[[list, DenseSplit], float],
    *,
    lr_grid: list[float],
    search_epochs: int,
    seed: int,
    **kw: Any,
) -> tuple[float, dict[str, float]]:
    """The multiplier of `lr_grid` with the best validation score after `search_epochs` (first seed)."""
    if len(lr_grid) == 1:
        return lr_grid[0], {}
    results = {}
    for mult in lr_grid:
        try:
            run = fit_dense(
                build(seed), strategy, cfg, train, val, score, lr_mult=mult, epochs=search_epochs, seed=seed, **kw
            )
            results[mult] = run.best_val_score
        except FloatingPointError as exc:
            log.warning("%s: rate x%s diverged (%s)", strategy.name, mult, exc)
            results[mult] = -math.inf
    chosen = max(results, key=lambda m: (results[m], -abs(math.log(m))))
    return chosen, {str(m): (None if v == -math.inf else round(v, 6)) for m, v in results.items()}


def train_dense_strategy(
    build: Callable[[int], Any],
    strategy: DenseStrategy,
    cfg: DenseStrategyConfig,
    train: Batches,
    val: Batches,
    score: Callable[[list, DenseSplit], float],
    *,
    seeds: list[int],
    epochs: int,
    lr_grid: list[float],
    lr_search_epochs: int,
    batch_size: int,
    weight_decay: float,
    max_detections: int,
) -> tuple[dict[str, Any], dict[int, RunResult]]:
    """The rate on validation (first seed), then one run per seed (see the module docstring).

    Args:
        build: seed -> a fresh model (source weights, new decoder, the strategy's adaptation).

    Returns:
        (record: rate choice, epochs, per-seed evidence; {seed: RunResult}).
    """
    kw = {"batch_size": batch_size, "weight_decay": weight_decay, "max_detections": max_detections}
    n_epochs = strategy.epochs(cfg, epochs)
    mult, grid = choose_lr(
        build, strategy, cfg, train, val, score, lr_grid=lr_grid, search_epochs=lr_search_epochs, seed=seeds[0], **kw
    )
    runs = {}
    for seed in seeds:
        runs[seed] = fit_dense(
            build(seed), strategy, cfg, train, val, score, lr_mult=mult, epochs=n_epochs, seed=seed, **kw
        )
    record = {
        "strategy": strategy.name,
        "summary": strategy.summary,
        "lr": cfg.lr * mult,
        "lr_multiplier": mult,
        "lr_search_val_score": grid,
        "epochs": n_epochs,
        "val_score_mean": round(float(np.mean([r.best_val_score for r in runs.values()])), 6),
        "under_trained": any(r.under_trained for r in runs.values()),
        "under_trained_rule": UNDER_TRAINED_RULE,
        "per_seed": {str(s): r.record() for s, r in runs.items()},
    }
    return record, runs


def build_fn(
    arch: str, source: Any, strategy: DenseStrategy, cfg: DenseStrategyConfig, task: str, num_classes: int, width: int
) -> Callable[[int], Any]:
    """seed -> a fresh dense model: the source's encoder (random for scratch), a new decoder and head, the
    strategy's adaptation (LoRA)."""
    from transferlab.models.dense import build_dense_model, encoder_from_source

    def build(seed: int) -> Any:
        enc = encoder_from_source(arch, source if strategy.pretrained else None, seed)
        model = build_dense_model(enc, task, num_classes, width)
        strategy.adapt(model, cfg)
        return model

    return build


def load_dense_model(meta: dict[str, Any], state_dict: dict, strategy: DenseStrategy, cfg: DenseStrategyConfig) -> Any:
    """A trained dense model rebuilt from its `meta.json` and saved state (no source weights needed: every
    weight is in the state dict)."""
    model = build_fn(meta["arch"], None, strategy, cfg, meta["task"], len(meta["class_names"]), meta["width"])(0)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model

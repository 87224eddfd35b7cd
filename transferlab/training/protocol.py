"""TODO docstring: training.protocol."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transferlab.core.device import as_device
from transferlab.models.sources import SourceModel, count_params
from transferlab.strategies import Strategy, StrategyConfig
from transferlab.training.loop import DivergenceError, TrainResult, fit, image_batches, tensor_batches, training_failure

log = logging.getLogger(__name__)


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
    device: torch.device | str | None = None,
    channels_last: bool = False,
    **schedule: Any,
) -> TrainResult:
    """Build the strategy's model from the source and train it on the prepared splits.

    Strategies with `uses_features` train their head on `features` (the cache of the frozen
    backbone's penultimate features); the others train on the images. `schedule` passes
    `lr_patience`, `lr_factor`, `min_delta` and `warmup` on to `fit`. Training runs on `device` (default:
    the CPU); the returned model is back on the CPU, ready to save. `channels_last` trains image
    strategies in channels-last memory order (1.7-1.9x faster on this project's CPU, measured in
    benchmarks/; other floating-point results than the default order, reproducible run to run); the
    returned model is back in the default order.

    Raises:
        ValueError: a feature strategy got no features cache.
        DivergenceError: see `fit`.
    """
    device = as_device(device)
    if hasattr(strategy, "set_data"):  # strategies that train helpers of their own (a distillation teacher)
        strategy.set_data(images, labels, device=device)
    model = strategy.build(source, num_classes, cfg, seed)
    trainable, total = count_params(model)
    recipe = dict(
        epochs=epochs, batch_size=batch_size, patience=patience, weight_decay=weight_decay, device=device, **schedule
    )
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
            generator=generator,
            label=label,
            **recipe,
        )
        result.model = model.eval()
    else:
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        result = fit(
            model,
            strategy,
            cfg,
            image_batches(images["train"], source, augment, generator, channels_last),
            labels["train"],
            image_batches(images["val"], source, "none", generator, channels_last),
            labels["val"],
            generator=generator,
            label=label,
            **recipe,
        )
    if channels_last and not strategy.uses_features:  # safetensors (LoRA adapters) needs contiguous tensors
        result.model = result.model.to(memory_format=torch.contiguous_format)
    if device.type != "cpu":  # hand the model back where it is saved and evaluated from
        result.model = result.model.to("cpu")
        strategy.move_to(result.model, torch.device("cpu"))
    result.trainable_params, result.total_params = trainable, total
    return result


@dataclass
class ProtocolResult:
    """What `train_protocol` found: the rate chosen on validation and one converged run per seed."""

    lr: float
    lr_search: list[dict]
    runs: dict[int, TrainResult]
    failures: dict[int, str]


def train_protocol(
    strategy: Strategy,
    cfg: StrategyConfig,
    make_source: Callable[[], SourceModel],
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    *,
    seeds: list[int],
    lr_grid: list[float],
    lr_search_epochs: int,
    lr_grid_extend: int = 1,
    epochs: int,
    batch_size: int,
    patience: int,
    weight_decay: float,
    augment: str,
    num_threads: int = 0,
    features: dict[str, np.ndarray] | None = None,
    label: str = "",
    device: torch.device | str | None = None,
    **schedule: Any,
) -> ProtocolResult:
    """The protocol behind every trained number: rate on validation, then each seed to a plateau.

    1. Learning rate: for each multiplier m of `lr_grid`, a short run (`lr_search_epochs`, first seed)
       at `cfg.lr * m`; the rate with the best validation accuracy wins (ties: lower validation loss;
       a rate that diverged or whose short run failed, see `training_failure`, loses); a best rate on
       an edge of the grid extends it (`lr_grid_extend`). Every strategy gets the same grid and rule,
       scratch included. The test split is never touched.
    2. One run per seed in `seeds` at that rate, to a plateau or the cap `epochs`.

    Args:
        make_source: a fresh source model per run (strategies replace its head in place).
        seeds: training seeds (model init, batch order, augmentation).
        lr_grid: multipliers of the configured rate; [1.0] skips the search.
        lr_grid_extend: when the best rate sits on an edge of the grid, try up to this many more rates
            beyond that edge (one grid step each).
        num_threads: torch CPU threads (0: torch's default), set with each seed.
        device: where every run trains (default: the CPU); the returned models are on the CPU.

    Returns:
        ProtocolResult: the chosen rate, the search table, the runs by seed, and the seeds whose
        training failed (see `training_failure`) with the reason.

    Raises:
        DivergenceError: the chosen rate diverged in a seed's run (after the search let it through).
    """
    from transferlab.core.seeding import seed_everything

    common = dict(
        epochs=epochs,
        batch_size=batch_size,
        patience=patience,
        weight_decay=weight_decay,
        augment=augment,
        features=features,
        device=device,
        **schedule,
    )
    search: list[dict] = []

    def try_rate(mult: float) -> dict:
        lr = float(f"{cfg.lr * mult:.6g}")
        gen = seed_everything(seeds[0], num_threads)
        row: dict[str, Any] = {"lr_multiplier": float(f"{mult:.6g}"), "lr": lr, "epochs": lr_search_epochs}
        try:
            res = train_strategy(
                strategy,
                cfg.model_copy(update={"lr": lr}),
                make_source(),
                images,
                labels,
                num_classes,
                seed=seeds[0],
                generator=gen,
                label=f"{label} lr={lr:g}",
                **{**common, "epochs": lr_search_epochs, "patience": lr_search_epochs},
            )
            row.update(val_accuracy=round(res.best_val_accuracy, 6), val_loss=round(res.best_val_loss, 6))
            failed = training_failure(res.history, num_classes, res.best_val_accuracy)
            if failed:
                row["failed"] = failed
        except DivergenceError as exc:
            row.update(val_accuracy=None, val_loss=None, diverged=str(exc))
        search.append(row)
        return row

    def pick() -> dict | None:
        ok = [r for r in search if r["val_accuracy"] is not None and not r.get("superseded")]
        # A rate whose short run already failed (loss stuck at ln C, accuracy at chance) is out, unless
        # every rate failed: a lucky validation accuracy must not elect a rate that does not train.
        ok = [r for r in ok if "failed" not in r] or ok
        if not ok:
            return None
        return max(ok, key=lambda r: (r["val_accuracy"], -r["val_loss"], -abs(math.log(r["lr_multiplier"]))))

    if len(lr_grid) > 1:
        grid = sorted(lr_grid)
        for mult in grid:
            try_rate(mult)
        if all("failed" in r or r["val_accuracy"] is None for r in search):
            # Every short run is still at chance: the budget says nothing about the rates (a network from
            # random weights often needs more than two epochs to move). Once, the same grid at twice the
            # budget; the same rule for every strategy.
            log.warning(
                "%s: every rate of the search failed in %d epochs; retrying at %d",
                label,
                lr_search_epochs,
                2 * lr_search_epochs,
            )
            for r in search:
                r["superseded"] = True
            lr_search_epochs *= 2
            for mult in grid:
                try_rate(mult)
        # A best rate on the grid's edge says the optimum may lie beyond it: extend by the grid's own
        # step, `lr_grid_extend` times at most on each side (the same rule for every strategy).
        low_step, high_step = grid[1] / grid[0], grid[-1] / grid[-2]
        for _ in range(lr_grid_extend):
            best = pick()
            mults = [r["lr_multiplier"] for r in search]
            if best is None or min(mults) < best["lr_multiplier"] < max(mults):
                break
            if best["lr_multiplier"] == max(mults):
                try_rate(max(mults) * high_step)
            else:
                try_rate(min(mults) / low_step)
        best = pick()
        if best is None:
            raise DivergenceError(
                f"{label}: every rate of the grid {[r['lr'] for r in search]} diverged; lower strategies.{label}.lr"
            )
        lr = best["lr"]
        for r in search:
            r["chosen"] = r is best
        search.sort(key=lambda r: (r["epochs"], r["lr_multiplier"]))
    else:
        lr = float(cfg.lr * lr_grid[0]) if lr_grid else cfg.lr
    chosen = cfg.model_copy(update={"lr": lr})
    runs: dict[int, TrainResult] = {}
    failures: dict[int, str] = {}
    for seed in seeds:
        gen = seed_everything(seed, num_threads)
        res = train_strategy(
            strategy,
            chosen,
            make_source(),
            images,
            labels,
            num_classes,
            seed=seed,
            generator=gen,
            label=f"{label} seed={seed}",
            **common,
        )
        runs[seed] = res
        why = training_failure(res.history, num_classes, res.best_val_accuracy)
        if why:
            failures[seed] = why
            log.warning("%s seed %d: training failed: %s", label, seed, why)
    return ProtocolResult(lr=lr, lr_search=search, runs=runs, failures=failures)

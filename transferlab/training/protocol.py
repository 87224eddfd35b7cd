"""The one training recipe and protocol behind every trained number (train@, tune@, agreement, diagnosis).

* `TrainRecipe` and `build_recipe` (defined in `transferlab.training.recipe`, which `fit` reads too, and
  exported here): how a run trains, made in one place from params `train` and a strategy's config.
* `train_strategy`: one run: the strategy's helper networks (a distillation teacher) trained with the same
  recipe, its per-run state, its model built from the source, trained by `fit` on images or on the features
  cache, and handed back on the CPU.
* `train_protocol`: the learning rate chosen on validation (`search_learning_rate`, by `LR_CHOICE_RULE`), then
  one run per training seed (`train_seeds`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from transferlab.core.device import as_device
from transferlab.core.seeding import seed_everything
from transferlab.models.costs import count_parameters, example_input, train_flops_per_image
from transferlab.models.sources import SourceModel, load_source
from transferlab.strategies import Strategy, StrategyConfig, get_strategy, strategy_config
from transferlab.strategies.base import Teacher, UnlabelledBatches
from transferlab.training.loop import DivergenceError, TrainResult, fit, image_batches, tensor_batches, training_failure
from transferlab.training.recipe import TrainRecipe, build_recipe
from transferlab.training.rules import LR_CHOICE_RULE

__all__ = [
    "LR_CHOICE_RULE",
    "ProtocolResult",
    "TrainRecipe",
    "build_recipe",
    "search_learning_rate",
    "train_protocol",
    "train_seeds",
    "train_strategy",
]

log = logging.getLogger(__name__)

# --- one run ---------------------------------------------------------------------------------------------


def train_strategy(
    strategy: Strategy,
    cfg: StrategyConfig,
    source: SourceModel,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    recipe: TrainRecipe,
    *,
    seed: int,
    generator: torch.Generator,
    features: dict[str, np.ndarray] | None = None,
    label: str = "",
) -> TrainResult:
    """Build the strategy's model from the source and train it on the prepared splits with `recipe`.

    Strategies with `uses_features` train their head on `features` (the cache of the frozen backbone's
    penultimate features); the others train on the images. A strategy's helper network (a distillation
    teacher, `Strategy.teacher_spec`) is trained first, with the same recipe; its per-run state
    (`Strategy.start_run`) travels with this call only. Strategies with `uses_unlabelled` (dann) also get
    `images["unlabelled"]`, unlabelled deployment images (uint8, the shape convention of `images["train"]`), as
    `UnlabelledBatches` in `start_run`: built like the training batches (same normalisation and augmentation),
    drawn by a generator of their own seeded from `seed`, so a strategy that does not use them draws exactly what
    it drew without them (it never reads the key). Such a strategy's training compute per training image counts
    the network's passes twice (each labelled image is paired with an unlabelled one). Training runs on
    `recipe.device` (default: the CPU); the returned model is back on the CPU, ready to save.
    `recipe.channels_last` trains image strategies in channels-last memory order (1.7-1.9x faster on this
    project's CPU, measured in benchmarks/; other floating-point results than the default order, reproducible
    run to run); the returned model is back in the default order.

    Raises:
        ValueError: a feature strategy got no features cache; a strategy with `uses_unlabelled` got no
            unlabelled images, or ones of another shape or type than the training images.
        DivergenceError: see `fit`.
    """
    if strategy.uses_features and features is None:
        raise ValueError(f"{label}: strategy '{strategy.name}' needs the features cache (features@<source>)")
    unlabelled = _unlabelled_batches(strategy, images, source, recipe, seed, label)  # checked before any work
    device = as_device(recipe.device)
    teacher = _train_teacher(strategy, cfg, images, labels, num_classes, recipe, seed)
    # Only a strategy that uses unlabelled images is handed them: the others' `start_run` is called as before.
    extra = {"unlabelled": unlabelled} if strategy.uses_unlabelled else {}
    state = strategy.start_run(source, cfg, teacher, **extra)
    model = strategy.build(source, num_classes, cfg, seed)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    if strategy.uses_features:  # the head trains on the cached features
        train_flops = train_flops_per_image(model.get_classifier(), torch.zeros(1, features["train"].shape[1]))
    else:
        train_flops = train_flops_per_image(model, example_input(model, int(images["train"].shape[1])))
    if strategy.uses_unlabelled:  # one unlabelled image through the same network per training image
        train_flops = {k: 2 * v for k, v in train_flops.items()}
    if strategy.uses_features:
        result = _fit_head(model, strategy, cfg, features, labels, recipe, generator, label, state)
    else:
        result = _fit_network(model, strategy, cfg, source, images, labels, recipe, generator, label, state)
    result.model = _hand_back(result.model, strategy, recipe, device, state)
    result.trainable_params, result.total_params = trainable, total
    result.train_flops = train_flops
    return result


def _unlabelled_seed(seed: int) -> int:
    """The seed of a run's unlabelled-pool generator: a stream of its own derived from the run's seed (not the
    seed itself, whose stream shuffles the labelled batches: the two orders would be the same permutation)."""
    return int(np.random.SeedSequence([seed, 0x0DA77]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def _unlabelled_batches(
    strategy: Strategy,
    images: dict[str, np.ndarray],
    source: SourceModel,
    recipe: TrainRecipe,
    seed: int,
    label: str,
) -> UnlabelledBatches | None:
    """The run's unlabelled deployment images as `UnlabelledBatches` for a strategy with `uses_unlabelled`
    (None for the others, whatever `images` holds).

    Augmented as the training batches are (`recipe.augment`): otherwise a domain classifier could tell the
    labelled from the unlabelled images by the augmentation alone (shifted, reflect-padded borders only on one
    side), and the adversarial loss would spend itself hiding augmentation instead of the domain.

    Raises:
        ValueError: no `images["unlabelled"]` (or an empty one), or images of another shape or type than
            `images["train"]`.
    """
    if not strategy.uses_unlabelled:
        return None
    pool = images.get("unlabelled")
    if pool is None or len(pool) == 0:
        raise ValueError(
            f"{label}: strategy '{strategy.name}' trains on unlabelled deployment images, and this run got none "
            f"(images['unlabelled'] missing or empty; got {sorted(images)}). Set deploy.data to the deployment images "
            "and run the deployment pipeline, which passes them; the default pipeline's train@ stages have none, "
            f"so leave '{strategy.name}' out of `strategies` there."
        )
    train = images["train"]
    if pool.shape[1:] != train.shape[1:] or pool.dtype != train.dtype:
        raise ValueError(
            f"{label}: images['unlabelled'] are {pool.dtype} {tuple(pool.shape[1:])} per image, the training images "
            f"{train.dtype} {tuple(train.shape[1:])}: prepare the deployment images like the training split "
            "(same size, channels and dtype)"
        )
    gen = torch.Generator().manual_seed(_unlabelled_seed(seed))
    batches = image_batches(pool, source, recipe.augment, gen, recipe.channels_last)
    return UnlabelledBatches(inputs=batches, n=len(pool), generator=gen)


def _train_teacher(
    strategy: Strategy,
    cfg: StrategyConfig,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    recipe: TrainRecipe,
    seed: int,
) -> Teacher | None:
    """The helper network `strategy.teacher_spec(cfg)` asks for, fine-tuned on the target with the run's
    recipe at the spec's fixed budget, or None. Its batches come from a generator of its own (seeded with the
    run's seed), so the student draws the same batches as it would without a teacher."""
    spec = strategy.teacher_spec(cfg)
    if spec is None:
        return None
    teacher_source = load_source("teacher", spec.source, seed=seed)
    kind = get_strategy(spec.kind)
    result = train_strategy(
        kind,
        strategy_config("teacher", {"kind": spec.kind, **spec.config}),
        teacher_source,
        images,
        labels,
        num_classes,
        recipe.short_run(spec.epochs),
        seed=seed,
        generator=torch.Generator().manual_seed(seed),
        label=spec.label,
    )
    return Teacher(model=result.model, source=teacher_source, val_accuracy=result.best_val_accuracy)


def _fit_head(
    model: torch.nn.Module,
    strategy: Strategy,
    cfg: StrategyConfig,
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    recipe: TrainRecipe,
    generator: torch.Generator,
    label: str,
    state: Any,
) -> TrainResult:
    """Train the classifier of `model` on the cached features; the result holds the whole model."""
    result = fit(
        model.get_classifier(),
        strategy,
        cfg,
        tensor_batches(features["train"]),
        labels["train"],
        tensor_batches(features["val"]),
        labels["val"],
        recipe,
        generator=generator,
        label=label,
        state=state,
    )
    result.model = model.eval()
    return result


def _fit_network(
    model: torch.nn.Module,
    strategy: Strategy,
    cfg: StrategyConfig,
    source: SourceModel,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    recipe: TrainRecipe,
    generator: torch.Generator,
    label: str,
    state: Any,
) -> TrainResult:
    """Train the whole `model` on the images (augmented as the recipe says, validation never)."""
    channels_last = recipe.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return fit(
        model,
        strategy,
        cfg,
        image_batches(images["train"], source, recipe.augment, generator, channels_last),
        labels["train"],
        image_batches(images["val"], source, "none", generator, channels_last),
        labels["val"],
        recipe,
        generator=generator,
        label=label,
        state=state,
    )


def _hand_back(
    model: torch.nn.Module, strategy: Strategy, recipe: TrainRecipe, device: torch.device, state: Any
) -> torch.nn.Module:
    """The trained model in the default memory order (safetensors, which saves LoRA adapters, needs
    contiguous tensors) and on the CPU, where it is saved and evaluated from."""
    if recipe.channels_last and not strategy.uses_features:
        model = model.to(memory_format=torch.contiguous_format)
    if device.type != "cpu":
        model = model.to("cpu")
        strategy.move_to(model, torch.device("cpu"), state)
    return model


# --- the protocol: a rate chosen on validation, then one run per seed ------------------------------------


@dataclass
class ProtocolResult:
    """What `train_protocol` found: the rate chosen on validation (with `choose_rate`'s record of the choice:
    the rule, the best accuracy, the noise band and the candidates within it; empty without a search) and one
    run per seed."""

    lr: float
    lr_search: list[dict]
    runs: dict[int, TrainResult]
    failures: dict[int, str]
    lr_choice: dict = field(default_factory=dict)


# (cfg, recipe, seed, label) -> one run's TrainResult, of one strategy on one data set from a fresh source.
RunFn = Callable[[StrategyConfig, TrainRecipe, int, str], TrainResult]


def train_protocol(
    strategy: Strategy,
    cfg: StrategyConfig,
    make_source: Callable[[], SourceModel],
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    recipe: TrainRecipe,
    *,
    features: dict[str, np.ndarray] | None = None,
    label: str = "",
) -> ProtocolResult:
    """The protocol behind every trained number: rate on validation, then each seed to a plateau.

    1. Learning rate (`search_learning_rate`): for each multiplier m of `recipe.lr_grid`, a short run
       (`recipe.lr_search_epochs`, first seed) at `cfg.lr * m`; among the rates within noise of the best
       validation accuracy, the one nearest `cfg.lr` wins (`LR_CHOICE_RULE`). Every strategy gets the same grid
       and rule, scratch included (its search budget may be its own). The test split is never touched.
    2. One run per seed in `recipe.seeds` at that rate, to a plateau or the cap `recipe.epochs`
       (`train_seeds`).

    Args:
        make_source: a fresh source model per run (strategies replace its head in place).
        recipe: the run's recipe (`build_recipe`); `recipe.device` is where every run trains (the returned
            models are on the CPU), `recipe.num_threads` is set with each seed.

    Returns:
        ProtocolResult: the chosen rate, the search table, the runs by seed, and the seeds whose
        training failed (see `training_failure`) with the reason.

    Raises:
        DivergenceError: every rate of the grid diverged, or the chosen rate diverged in a seed's run.
    """

    def run(run_cfg: StrategyConfig, run_recipe: TrainRecipe, seed: int, run_label: str) -> TrainResult:
        gen = seed_everything(seed, recipe.num_threads)
        return train_strategy(
            strategy,
            run_cfg,
            make_source(),
            images,
            labels,
            num_classes,
            run_recipe,
            seed=seed,
            generator=gen,
            features=features,
            label=run_label,
        )

    lr, search = search_learning_rate(run, cfg, recipe, num_classes, label)
    runs, failures = train_seeds(run, cfg.model_copy(update={"lr": lr}), recipe, num_classes, label)
    choice = choose_rate(search)[2] if search else {}
    return ProtocolResult(lr=lr, lr_search=search, runs=runs, failures=failures, lr_choice=choice)


def search_learning_rate(
    run: RunFn, cfg: StrategyConfig, recipe: TrainRecipe, num_classes: int, label: str
) -> tuple[float, list[dict]]:
    """The rate of `cfg.lr * m` over the multipliers m of `recipe.lr_grid` chosen by `LR_CHOICE_RULE`.

    Each rate gets a short run (`recipe.lr_search_epochs`) on the first seed; the winner is the rate nearest
    `cfg.lr` among those within one binomial standard error of the best validation accuracy (`choose_rate`),
    so that floating-point noise between machines does not flip the choice. A rate that diverged or whose short
    run failed (see `training_failure`) loses. When every short run failed, the grid is tried once more at twice
    the budget; a winner on an edge of the grid extends it by the grid's own step (`recipe.lr_grid_extend`
    times at most).

    Returns:
        (lr, search table): one row per rate tried, sorted by (budget, multiplier); `chosen` marks the winner,
        `within_noise` the rates within noise of the best (the candidates). A one-rate grid skips the search:
        (`cfg.lr * lr_grid[0]`, []).

    Raises:
        DivergenceError: every rate of the grid diverged.
    """
    if len(recipe.lr_grid) <= 1:
        return float(cfg.lr * recipe.lr_grid[0]), []
    search: list[dict] = []
    budget = recipe.lr_search_epochs

    def try_rate(mult: float) -> None:
        lr = float(f"{cfg.lr * mult:.6g}")
        row: dict[str, Any] = {"lr_multiplier": float(f"{mult:.6g}"), "lr": lr, "epochs": budget}
        try:
            res = run(
                cfg.model_copy(update={"lr": lr}), recipe.short_run(budget), recipe.seeds[0], f"{label} lr={lr:g}"
            )
            row.update(val_accuracy=round(res.best_val_accuracy, 6), val_loss=round(res.best_val_loss, 6))
            row["val_size"] = res.val_size
            failed = training_failure(res.history, num_classes, res.best_val_accuracy)
            if failed:
                row["failed"] = failed
        except DivergenceError as exc:
            row.update(val_accuracy=None, val_loss=None, diverged=str(exc))
        search.append(row)

    grid = sorted(recipe.lr_grid)
    for mult in grid:
        try_rate(mult)
    if all("failed" in r or r["val_accuracy"] is None for r in search):
        # Every short run is still at chance: the budget says nothing about the rates (a network from random
        # weights often needs more than two epochs to move). Once, the same grid at twice the budget; the
        # same rule for every strategy.
        log.warning("%s: every rate of the search failed in %d epochs; retrying at %d", label, budget, 2 * budget)
        for r in search:
            r["superseded"] = True
        budget *= 2
        for mult in grid:
            try_rate(mult)
    # A winner on the grid's edge says the optimum may lie beyond it: extend by the grid's own step,
    # `lr_grid_extend` times at most on each side (the same rule for every strategy).
    low_step, high_step = grid[1] / grid[0], grid[-1] / grid[-2]
    for _ in range(recipe.lr_grid_extend):
        best = choose_rate(search)[0]
        mults = [r["lr_multiplier"] for r in search if not r.get("superseded")]
        if best is None or min(mults) < best["lr_multiplier"] < max(mults):
            break
        if best["lr_multiplier"] == max(mults):
            try_rate(max(mults) * high_step)
        else:
            try_rate(min(mults) / low_step)
    best, within, _ = choose_rate(search)
    if best is None:
        raise DivergenceError(
            f"{label}: every rate of the grid {[r['lr'] for r in search]} diverged; lower strategies.{label}.lr"
        )
    for r in search:
        r["chosen"] = r is best
        if not r.get("superseded") and r["val_accuracy"] is not None:
            r["within_noise"] = any(r is w for w in within)
    search.sort(key=lambda r: (r["epochs"], r["lr_multiplier"]))
    return best["lr"], search


def choose_rate(search: list[dict]) -> tuple[dict | None, list[dict], dict[str, Any]]:
    """`LR_CHOICE_RULE` on the search table so far: the winning row (None when every rate diverged), the rows
    within noise of the best, and the record of the choice.

    Args:
        search: rows with `lr_multiplier`, `lr`, `val_accuracy` (None: diverged), `val_loss`, `val_size` (the
            validation examples) and, where they apply, `failed` and `superseded`.

    Returns:
        (winner, rows within noise, record): the record holds "rule", "best_val_accuracy", "val_size",
        "noise_se" (the binomial standard error at the best accuracy), "candidates" (the rates within noise of
        the best, ascending) and "chosen_lr".
    """
    ok = [r for r in search if r["val_accuracy"] is not None and not r.get("superseded")]
    # A rate whose short run already failed (loss stuck at ln C, accuracy at chance) is out, unless every
    # rate failed: a lucky validation accuracy must not elect a rate that does not train.
    ok = [r for r in ok if "failed" not in r] or ok
    if not ok:
        return None, [], {"rule": LR_CHOICE_RULE, "candidates": [], "chosen_lr": None}
    best_acc = max(r["val_accuracy"] for r in ok)
    n = min((r.get("val_size") or 0) for r in ok)
    # n unknown (0): no noise band, the best accuracy alone (a hand-made table).
    se = math.sqrt(best_acc * (1 - best_acc) / n) if n > 0 else 0.0
    # A hair of slack: an accuracy exactly one SE below the best is within noise, whatever its last bit.
    within = [r for r in ok if r["val_accuracy"] >= best_acc - se - 1e-12]
    winner = min(within, key=lambda r: (abs(math.log(r["lr_multiplier"])), -r["val_accuracy"], r["val_loss"]))
    record = {
        "rule": LR_CHOICE_RULE,
        "best_val_accuracy": best_acc,
        "val_size": n,
        "noise_se": round(se, 6),
        "candidates": sorted(r["lr"] for r in within),
        "chosen_lr": winner["lr"],
    }
    return winner, within, record


def train_seeds(
    run: RunFn, cfg: StrategyConfig, recipe: TrainRecipe, num_classes: int, label: str
) -> tuple[dict[int, TrainResult], dict[int, str]]:
    """One run of `cfg` per seed of `recipe.seeds`, to a plateau or the cap.

    Returns:
        (runs by seed, failures): the seeds whose training failed (`training_failure`) with the reason.
    """
    runs: dict[int, TrainResult] = {}
    failures: dict[int, str] = {}
    for seed in recipe.seeds:
        res = run(cfg, recipe, seed, f"{label} seed={seed}")
        runs[seed] = res
        why = training_failure(res.history, num_classes, res.best_val_accuracy)
        if why:
            failures[seed] = why
            log.warning("%s seed %d: training failed: %s", label, seed, why)
    return runs, failures

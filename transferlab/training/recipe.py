"""`TrainRecipe`: how every run of a strategy trains (epoch cap, batch size, plateau, schedule, augmentation,
convergence rule, learning-rate search, seeds, device), and `build_recipe`, the one place it is made from
params `train` and a strategy's config, for train@, tune@, agreement and the diagnosis remedies alike. A second
hand-made copy is how tune@ once trained without the pipeline's schedule (its objective dropped `lr_patience`,
`lr_factor`, `min_delta`, `min_lr_ratio` and `channels_last`).

A module of its own, below `loop` (which reads a recipe) and `protocol` (which runs one), and torch-free: the
tune stage builds recipes before it imports torch. `transferlab.training.protocol` exports both names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from transferlab.params import TrainParams
    from transferlab.strategies import StrategyConfig

AUGMENT_MODES = ("none", "crop", "crop_flip")
# plateau: reduce-on-plateau of the rate and early stopping (the default of every strategy); cosine: warm-up, then
# cosine decay over a fixed budget of `epochs` (a strategy opts in through its config's `schedule`).
SCHEDULES = ("plateau", "cosine")


@dataclass(frozen=True)
class TrainRecipe:
    """How every run of a strategy trains: params `train` resolved for one strategy (see `build_recipe`).

    The defaults are those of a bare `fit` call (tests, pretraining); the pipeline's callers always get every
    field from params through `build_recipe`.
    """

    epochs: int  # plateau: the epoch cap; cosine: the budget the rate decays over (every epoch runs)
    batch_size: int
    patience: int  # epochs without a val loss (by more than min_delta) or val accuracy gain: the plateau
    weight_decay: float
    augment: str = "none"  # training batches of image strategies: none | crop | crop_flip
    lr_patience: int | None = None  # epochs without a val loss gain before the rate is cut (None: patience // 2)
    lr_factor: float = 0.3  # reduce-on-plateau factor
    min_lr_ratio: float = 0.01  # the rate never goes below this fraction of its start (both schedules)
    min_delta: float = 1e-3  # val loss decrease (absolute, nats) that counts as progress
    warmup: bool = True  # a linear warm-up of the rate over the first `warmup_epochs` epochs' steps (from 10%)
    schedule: str = "plateau"  # plateau | cosine (SCHEDULES)
    warmup_epochs: int = 1  # epochs of the warm-up (cosine: at most half the budget)
    # The convergence rule (transferlab.training.rules.CONVERGENCE_RULE): its trend window (None: patience, at
    # least 3), the training accuracy from which a model fits, and the least rate (a fraction of the peak) at
    # which a flat curve of a model that neither fits nor over-fits counts as a plateau.
    convergence_window: int | None = None
    fit_accuracy: float = 0.9
    plateau_min_lr_ratio: float = 0.1
    channels_last: bool = False  # image strategies train in channels-last memory order
    lr_grid: tuple[float, ...] = (1.0,)  # multipliers of the strategy's lr tried on validation; (1.0,): none
    lr_search_epochs: int = 1  # the budget of each rate of the grid
    lr_grid_extend: int = 1  # grid steps tried beyond an edge when the best rate sits on it
    seeds: tuple[int, ...] = (0,)  # training seeds (init, batch order, augmentation): one run each
    num_threads: int = 0  # torch CPU threads set with each seed (0: torch's default)
    device: Any = None  # a torch.device (or its name) every run trains on; None: the CPU

    def __post_init__(self) -> None:
        # Tuples, whatever the caller passed: the recipe is a value (frozen, comparable, hashable).
        object.__setattr__(self, "lr_grid", tuple(float(m) for m in self.lr_grid))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        problems = [
            f"{k} must be >= 1 (got {getattr(self, k)!r})"
            for k in ("epochs", "batch_size", "patience", "lr_search_epochs", "warmup_epochs")
            if getattr(self, k) < 1
        ]
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        if self.convergence_window is not None and self.convergence_window < 3:
            problems.append(f"convergence_window must be >= 3 or None (got {self.convergence_window!r})")
        for k in ("fit_accuracy", "plateau_min_lr_ratio"):
            if not 0 <= getattr(self, k) <= 1:
                problems.append(f"{k} must be within [0, 1] (got {getattr(self, k)!r})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        if self.augment not in AUGMENT_MODES:
            problems.append(f"augment must be one of {AUGMENT_MODES} (got {self.augment!r})")
        if not self.lr_grid or any(m <= 0 for m in self.lr_grid):
            problems.append(f"lr_grid must hold positive multipliers (got {self.lr_grid!r})")
        if not self.seeds:
            problems.append("seeds must name at least one training seed (got none)")
        if problems:
            raise ValueError("TrainRecipe: " + "; ".join(problems))

    @property
    def trend_window(self) -> int:
        """W of the convergence rule: `convergence_window`, or the patience (at least 3, the fewest epochs a
        slope has a standard error from)."""
        return self.convergence_window if self.convergence_window is not None else max(3, self.patience)

    def short_run(self, epochs: int) -> TrainRecipe:
        """This recipe at a fixed budget of `epochs` (the cap and the patience; a cosine schedule decays over
        it): a rate of the learning-rate grid, a teacher, a diagnosis sweep point."""
        return dataclasses.replace(self, epochs=epochs, patience=epochs)

    def record(self) -> dict[str, Any]:
        """The fields that decide one run's training, as a finding's evidence records them."""
        return {
            k: getattr(self, k)
            for k in (
                "epochs",
                "batch_size",
                "patience",
                "weight_decay",
                "augment",
                "lr_patience",
                "lr_factor",
                "min_delta",
                "min_lr_ratio",
                "schedule",
                "warmup_epochs",
                "convergence_window",
                "fit_accuracy",
                "plateau_min_lr_ratio",
                "channels_last",
            )
        }


def build_recipe(
    train: TrainParams,
    strategy_cfg: StrategyConfig,
    *,
    device: torch.device | str | None = None,
    epochs: int | None = None,
    max_epochs: int | None = None,
) -> TrainRecipe:
    """The training recipe of `strategy_cfg` under params `train`: the one builder for train@, tune@,
    agreement and the diagnosis remedies, so that their numbers mean the same thing.

    Args:
        train: params `train`.
        strategy_cfg: the strategy's config; its `epochs`, when set, is the epoch cap instead of `train.epochs`;
            a config that declares `schedule`, `warmup_epochs` or `lr_search_epochs` (scratch's) sets those
            (None or absent: the recipe's plateau schedule, a one-epoch warm-up, `train.lr_search_epochs`).
        device: where the runs train, as the stage resolved `train.device` (`core.device.resolve_device`);
            None: the CPU.
        epochs: a budget that replaces the cap (tune@: `tune.epochs` or a trial's `epochs`; agreement's
            fine-tune recipe: `agreement.finetune_epochs`).
        max_epochs: lowers the cap (`diagnose.remedy_epochs`, for tiny test configs).

    Returns:
        The frozen recipe.

    Raises:
        ValueError: an override below 1.
    """
    for key, value in (("epochs", epochs), ("max_epochs", max_epochs)):
        if value is not None and value < 1:
            raise ValueError(f"build_recipe: {key} must be >= 1 (got {value!r})")
    cap = epochs if epochs is not None else (strategy_cfg.epochs or train.epochs)
    if max_epochs is not None:
        cap = min(cap, max_epochs)
    # Schedule fields a strategy's config may declare (today scratch's: `transferlab.strategies.scratch`).
    schedule = getattr(strategy_cfg, "schedule", None) or "plateau"
    warmup_epochs = getattr(strategy_cfg, "warmup_epochs", None) or 1
    lr_search_epochs = getattr(strategy_cfg, "lr_search_epochs", None) or train.lr_search_epochs
    return TrainRecipe(
        epochs=cap,
        batch_size=train.batch_size,
        patience=train.patience,
        weight_decay=train.weight_decay,
        augment=train.augment,
        lr_patience=train.lr_patience,
        lr_factor=train.lr_factor,
        min_lr_ratio=train.min_lr_ratio,
        min_delta=train.min_delta,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
        convergence_window=train.convergence_window,
        fit_accuracy=train.fit_accuracy,
        plateau_min_lr_ratio=train.plateau_min_lr_ratio,
        channels_last=train.channels_last,
        lr_grid=tuple(train.lr_grid),
        lr_search_epochs=lr_search_epochs,
        lr_grid_extend=train.lr_grid_extend,
        seeds=tuple(train.seeds),
        num_threads=train.num_threads,
        device=device,
    )

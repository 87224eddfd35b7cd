"""What a tune@ trial trains and how a study runs: the objective, the study, and what the stage writes.

* `TrialObjective`: one trial trains the strategy from a fresh copy of the source with train@'s own recipe
  (`build_recipe`: batch size, plateau, schedule, augmentation, memory order, the first training seed) at the
  trial's epoch budget, and scores it by its best validation accuracy. It holds the train and validation
  splits only: with backend ray it is pickled to the workers, and the test split never leaves the stage.
* `ReportingStrategy`: the wrapper that reports every epoch's validation accuracy (pruning).
* `tune_strategy`: the study on Optuna or Ray Tune (`tune.backend`), its summary metrics and the tuned params
  fragment.

torch and the training loop are imported inside the functions that train: the tune stage imports this module
before params are validated.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from transferlab.tuning.space import Report, SearchSpace

if TYPE_CHECKING:
    import torch

    from transferlab.models.sources import SourceModel
    from transferlab.params import TrainParams, TuneParams
    from transferlab.strategies import Strategy
    from transferlab.training.recipe import TrainRecipe

log = logging.getLogger(__name__)


def trial_device(device: torch.device, backend: str) -> torch.device:
    """Where a trial trains: `device`, except that a Ray trial sees only the GPU Ray gave it, as cuda:0
    (CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.device("cuda") if backend == "ray" and device.type == "cuda" else device


@dataclass
class TrialObjective:
    """`objective(config, report)` -> the best validation accuracy of one trial of `strategies.<name>`.

    Every trial is re-seeded (the first training seed, as train@'s learning-rate search) and starts from a
    fresh copy of the source (strategies build on the source network in place), so its result depends on
    its hyperparameters only, not on the trials before it.
    """

    name: str  # the key of `strategies`
    strategy: Strategy
    train: TrainParams  # params `train`: the recipe, as train@ trains
    tune_epochs: int  # the epoch budget of a trial (`tune.epochs`) unless the space tunes `epochs`
    space_names: tuple[str, ...]  # the tuned hyperparameters
    source: SourceModel
    images: dict[str, np.ndarray]  # train and val only
    labels: dict[str, np.ndarray]
    num_classes: int
    features: dict[str, np.ndarray] | None  # the features cache, for strategies with `uses_features`
    device: Any = None  # a torch.device; None: the CPU

    def recipe(self, config: dict[str, Any]) -> TrainRecipe:
        """The trial's recipe: train@'s (`build_recipe`) at the trial's epoch budget."""
        from transferlab.strategies import strategy_config
        from transferlab.training.recipe import build_recipe

        budget = config.get("epochs") if "epochs" in self.space_names else self.tune_epochs
        return build_recipe(self.train, strategy_config(self.name, config), device=self.device, epochs=budget)

    def __call__(self, config: dict[str, Any], report: Report) -> float:
        from transferlab.core.seeding import seed_everything
        from transferlab.strategies import strategy_config
        from transferlab.training.protocol import train_strategy

        trial_cfg = strategy_config(self.name, config)
        recipe = self.recipe(config)
        val = self.features["val"] if self.features is not None else self.images["val"]
        norm = () if self.features is not None else (self.source.mean, self.source.std)
        wrapped = ReportingStrategy(self.strategy, report, val, self.labels["val"], *norm)
        seed = recipe.seeds[0]
        gen = seed_everything(seed, recipe.num_threads)
        result = train_strategy(
            wrapped,
            trial_cfg,
            copy.deepcopy(self.source),
            self.images,
            self.labels,
            self.num_classes,
            recipe,
            seed=seed,
            generator=gen,
            features=self.features,
            label=f"tune@{self.name}",
        )
        return result.best_val_accuracy


@dataclass
class Study:
    """What `tune_strategy` found."""

    result: dict[str, Any]  # the backend's summary: best_value, best_params, trials
    metrics: dict[str, Any]  # metrics/tune/<name>.json
    fragment: str  # the tuned params fragment (YAML with a header saying how to use it)


def tune_strategy(
    objective: TrialObjective,
    entry: dict[str, Any],
    space: SearchSpace,
    tune_params: TuneParams,
    *,
    seed: int,
    ray_results: str,
    on_trial_end: Callable[[dict[str, Any]], None] | None = None,
) -> Study:
    """Search `space` around the strategy's params `entry` with `objective` on `tune.backend`.

    Args:
        objective: one trial (see `TrialObjective`).
        entry: `strategies.<name>` as in params (each trial's values are merged into it).
        space: the validated search space.
        tune_params: params `tune`.
        seed: the sampler's seed (params `seed`).
        ray_results: backend ray: the folder (or a URI every node reaches) for Ray's per-trial results.
        on_trial_end: called with each trial's record in this process (the stage logs it to MLflow).

    Returns:
        Study: the summary, its metrics and the params fragment.

    Raises:
        TuningError: no trial completed.
    """
    from transferlab.training.loop import DivergenceError
    from transferlab.tuning.optuna_backend import tune
    from transferlab.tuning.ray_backend import tune_ray

    tu, name = tune_params, objective.name
    common = dict(
        n_trials=tu.n_trials,
        seed=seed,
        study_name=f"tune@{name}",
        base_config=entry,
        pruner=tu.pruning,
        catch=(DivergenceError,),  # a diverging learning rate is a bad trial, not a failed stage
        on_trial_end=on_trial_end,
        workers=tu.workers,
    )
    if tu.backend == "ray":
        epochs_range = [h for h in space.params if h.name == "epochs"]
        device = objective.device
        result = tune_ray(
            objective,
            space,
            **common,
            storage_path=ray_results,
            # ASHA's max_t: the longest any trial trains.
            epochs=max(epochs_range[0].extremes()) if epochs_range else tu.epochs,
            address=tu.ray_address,
            grace_epochs=tu.asha_grace_epochs,
            reduction_factor=tu.asha_reduction_factor,
            # Ray sets OMP_NUM_THREADS to the CPUs a trial reserves; train.num_threads 0 means 1 here.
            cpus_per_trial=max(1, objective.train.num_threads),
            # A GPU shared by the trials running at once (Ray shows each trial only its own GPUs).
            gpus_per_trial=1 / tu.workers if device is not None and device.type == "cuda" else 0,
        )
    else:
        # A separate SQLite file from MLflow's (tracking.uri): Optuna's RDB storage and MLflow both keep an
        # `alembic_version` table for their own schema migrations, and would break each other in one database.
        if tu.storage.startswith("sqlite:///"):
            Path(tu.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        result = tune(objective, space, storage_url=tu.storage, **common)
    return Study(
        result=result, metrics=study_metrics(result), fragment=tuned_fragment(name, entry, result, tu.n_trials)
    )


def study_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The study's summary as a DVC metric: the best value and parameters, and the trials by state."""
    states = [t["state"] for t in result["trials"]]
    return {
        "best_value": round(result["best_value"], 6),
        "n_trials": len(states),
        "n_complete": states.count("COMPLETE"),
        "n_pruned": states.count("PRUNED"),
        "n_failed": states.count("FAIL"),
        "best_params": result["best_params"],
    }


def tuned_fragment(name: str, entry: dict[str, Any], result: dict[str, Any], n_trials: int) -> str:
    """The tuned params fragment (`{strategies: {<name>: {...}}}`, the current entry with the tuned values
    merged in), with a header saying where it came from and how to use it."""
    best = result["best_params"]
    sets = " ".join(f"--set-param strategies.{name}.{k}={v}" for k, v in best.items())
    header = (
        f"# Tuned by tune@{name}: best validation accuracy {result['best_value']:.4f} over {n_trials} trials.\n"
        f"# Copy into params.yaml, or try it: dvc exp run {sets}\n"
    )
    body = yaml.safe_dump({"strategies": {name: {**entry, **best}}}, sort_keys=False, default_flow_style=False)
    return header + body


class ReportingStrategy:
    """A strategy wrapper that reports the validation accuracy of every finished epoch but the last.

    Every attribute is the wrapped strategy's; only `on_epoch_start` differs: for epoch >= 2 it evaluates
    the model on the validation split, calls `report(epoch - 1, accuracy)` (which may raise
    `optuna.TrialPruned`, ending `fit`) and then runs the wrapped strategy's own hook.

    Args:
        strategy: the real strategy.
        report: `report(epoch, val_accuracy)`.
        val_x: the validation inputs of the trained module: uint8 images (N, H, W, 3) when `mean` and `std`
            are given, else an array fed as it is (the features cache of `uses_features` strategies).
        val_labels: int labels.
        mean, std: the source's preprocessing (images only).
        batch_size: evaluation batch (256, as in `fit`, so the numbers match its history).
    """

    def __init__(
        self,
        strategy: Any,
        report: Report,
        val_x: np.ndarray,
        val_labels: np.ndarray,
        mean: tuple | None = None,
        std: tuple | None = None,
        batch_size: int = 256,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (images) or neither (features)")
        import torch

        self._strategy = strategy
        self._report = report
        self._val_x = val_x
        self._val_y = torch.as_tensor(val_labels, dtype=torch.long)
        self._mean, self._std = mean, std
        self._batch_size = batch_size
        self.reported: list[tuple[int, float]] = []

    def __getattr__(self, item: str) -> Any:
        # Only called for attributes this wrapper lacks: everything but on_epoch_start and its own state.
        if item.startswith("_"):
            raise AttributeError(item)
        return getattr(self._strategy, item)

    def __repr__(self) -> str:
        return f"ReportingStrategy({self._strategy!r})"

    def _inputs(self, idx: np.ndarray) -> torch.Tensor:
        import torch

        if self._mean is not None:
            from transferlab.models.inference import to_input

            return to_input(self._val_x[idx], self._mean, self._std)
        return torch.from_numpy(np.ascontiguousarray(self._val_x[idx], dtype=np.float32))

    def val_accuracy(self, model: torch.nn.Module) -> float:
        """Accuracy of `model` (put in eval mode) on the validation split, as `fit` computes it."""
        from transferlab.models.inference import predict_logits

        logits = predict_logits(model, self._inputs, len(self._val_y), self._batch_size)
        return float((logits.argmax(1) == self._val_y).float().mean())

    def on_epoch_start(self, model: torch.nn.Module, epoch: int, cfg: Any, optimizer: Any) -> None:
        if epoch >= 2:
            acc = round(self.val_accuracy(model), 6)  # rounded like fit's history rows
            self.reported.append((epoch - 1, acc))
            self._report(epoch - 1, acc)
        self._strategy.on_epoch_start(model, epoch, cfg, optimizer)

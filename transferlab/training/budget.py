"""One point of the label-budget sweep (`curve-point@<budget>`): a strategy trained under the pipeline's one
protocol (`train_stage`: rate on validation, every seed to a plateau, the convergence rule) on a budget's
training subset (`data.budgets.budget_subset`), and every seed's model run over the fixed test split.

The models are not kept: a point's output is its test predictions and training record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transferlab.data.splits import Prepared
from transferlab.models.sources import SourceModel
from transferlab.params import SourceSpec
from transferlab.strategies import Strategy, StrategyConfig
from transferlab.training.recipe import TrainRecipe
from transferlab.training.run import StrategyRun, train_stage


@dataclass
class BudgetRun:
    """A strategy trained at one budget, and its test probabilities per seed."""

    run: StrategyRun
    test_proba: dict[int, np.ndarray]  # seed -> (n_test, classes), rows in the prepared test order

    def record(self) -> dict:
        """What the point's metrics keep of the training: rate, convergence, failures, per seed."""
        m = self.run.metrics
        return {
            "lr": m["lr"],
            "converged": m["converged"],
            "training_failed": m["training_failed"],
            "per_seed": {
                s: {k: r[k] for k in ("converged", "training_failed", "epochs_run", "best_val_accuracy")}
                for s, r in m["per_seed"].items()
            },
        }


def train_budget_point(
    name: str,
    strategy: Strategy,
    cfg: StrategyConfig,
    recipe: TrainRecipe,
    source_name: str,
    spec: SourceSpec,
    source: SourceModel,
    data: Prepared,
    features: dict[str, np.ndarray] | None,
) -> BudgetRun:
    """Train `strategies.<name>` on `data` (a budget's train subset, the fixed val) and predict the test split.

    Args: as `train_stage`; `features` holds the subset's and val's features for `uses_features` strategies.

    Returns:
        The run and each seed's test probabilities.

    Raises:
        DivergenceError: see `train_stage`.
    """
    import torch

    from transferlab.models.inference import predict_images

    run = train_stage(name, strategy, cfg, recipe, source_name, spec, source, data, features)
    proba = {}
    for seed, res in run.protocol.runs.items():
        logits = predict_images(res.model, data.images["test"], source.mean, source.std, device=recipe.device)
        proba[seed] = torch.softmax(logits, 1).numpy().astype(np.float64)
    return BudgetRun(run=run, test_proba=proba)

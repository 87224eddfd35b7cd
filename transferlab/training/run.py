"""`train@<strategy>` as one library call: the protocol run on one strategy, and what its outputs record.

`train_stage` trains (`train_protocol`, with the recipe `build_recipe` made) and assembles everything the
stage writes: the meta saved beside each seed's model, the per-epoch history of each seed with the
cumulative training compute (the x axis of accuracy-against-compute), the deterministic training metrics
(convergence evidence, compute, failures) and the wall-clock seconds (perf, not a DVC metric: they vary).
The stage saves the models and writes the files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.core import layout
from transferlab.core.io import write_json, write_text
from transferlab.data.splits import Prepared
from transferlab.models.costs import flops_per_image
from transferlab.models.sources import SourceModel
from transferlab.params import SourceSpec
from transferlab.strategies import Strategy, StrategyConfig
from transferlab.training.protocol import ProtocolResult, TrainRecipe, train_protocol

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class StrategyRun:
    """What `train_stage` produced for one strategy."""

    protocol: ProtocolResult  # the chosen rate, the search table, one trained model per seed (on the CPU)
    meta: dict  # saved beside every seed's model (with its `seed`): what `Strategy.load` and evaluate@ read
    histories: dict[int, pd.DataFrame]  # seed -> per-epoch history, with the cumulative `train_gflops`
    metrics: dict  # metrics/train/<name>.json: deterministic for the same params and seed
    seconds: dict[str, float]  # seed -> training wall-clock seconds (perf/, not a DVC metric)

    def save(self, strategy: Strategy, out: str | Path, history_dir: str | Path, metrics_path: str | Path) -> None:
        """Write the outputs other stages read: one model per seed (`<out>/seed_<s>/`, by `strategy.save`, with
        `meta` and its seed), one history CSV per seed, the metrics JSON; each file whole (temp file, rename).
        """
        for seed, res in self.protocol.runs.items():
            strategy.save(res.model, layout.seed_dir(out, seed), {**self.meta, "seed": seed})
            write_text(
                layout.history_path(history_dir, seed), self.histories[seed].to_csv(index=False, lineterminator="\n")
            )
        write_json(metrics_path, self.metrics)

    @property
    def perf(self) -> dict:
        """The timings record (perf/train/<name>.json, with the stage's device info): wall time varies."""
        return {"train_seconds_by_seed": self.seconds, "train_seconds_total": round(sum(self.seconds.values()), 3)}


def epoch_compute(
    strategy: Strategy, flops_fwd: int, train_flops: int, n_train: int, n_cached: int
) -> Callable[[int], float]:
    """Cumulative training compute in GFLOPs after epoch e, by `rules.TRAINING_COMPUTE_RULE`: `train_flops`
    (forward + backward of one training example, frozen parts forward only) per training image seen; a strategy
    on the features cache also pays the backbone's forward pass (`flops_fwd`) once per cached image."""
    once = flops_fwd * n_cached if strategy.uses_features else 0
    return lambda e: (once + train_flops * n_train * e) / 1e9


def search_compute(lr_search: list[dict], train_flops: int, n_train: int) -> float:
    """GFLOPs of the learning-rate search (each rate's run for its epochs), reported beside training compute."""
    return round(sum(int(r.get("epochs", 0)) for r in lr_search) * train_flops * n_train / 1e9, 3)


def train_stage(
    name: str,
    strategy: Strategy,
    cfg: StrategyConfig,
    recipe: TrainRecipe,
    source_name: str,
    spec: SourceSpec,
    source: SourceModel,
    data: Prepared,
    features: dict[str, np.ndarray] | None,
) -> StrategyRun:
    """Train `strategies.<name>` from `source` under the shared protocol, and assemble its outputs.

    Args:
        name: the key of `strategies` (the stage's name and the label of its runs).
        strategy, cfg: the registered strategy and its validated config.
        recipe: `build_recipe(params.train, cfg, device=...)`.
        source_name, spec: the selected source (`read_selection`) and `source`, loaded from it.
        data: the prepared splits (the test split is not used).
        features: the source's features cache of train and val, for strategies with `uses_features`.

    Returns:
        StrategyRun: models, meta, histories, metrics and timings.

    Raises:
        DivergenceError: see `train_protocol`.
    """
    import pandas as pd

    image_size = int(data.images["train"].shape[1])
    flops_fwd = flops_per_image(source.model, image_size)
    result = train_protocol(
        strategy,
        cfg,
        lambda: copy.deepcopy(source),
        data.images,
        data.labels,
        data.num_classes,
        recipe,
        features=features,
        label=name,
    )
    meta = {
        "strategy": name,
        "kind": cfg.kind,
        "source": source_name,
        "arch": source.arch,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "mean": list(source.mean),
        "std": list(source.std),
        "pretrained": strategy.pretrained,
        "source_spec": spec.model_dump(),
        "lr": result.lr,
    }
    if source.kwargs:
        meta["kwargs"] = source.kwargs
    n_train = len(data.labels["train"])
    n_cached = n_train + len(data.labels["val"])
    # Cumulative training compute after each epoch: the x axis of accuracy-against-compute.
    first = next(iter(result.runs.values()))
    train_flops = int(first.train_flops["total"])
    per_epoch = epoch_compute(strategy, flops_fwd, train_flops, n_train, n_cached)
    histories, per_seed, seconds = {}, {}, {}
    for seed, res in result.runs.items():
        history = pd.DataFrame(res.history)
        history["train_gflops"] = [round(per_epoch(e), 4) for e in history["epoch"]]
        histories[seed] = history
        per_seed[str(seed)] = {
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "best_val_accuracy": round(res.best_val_accuracy, 6),
            "best_val_loss": round(res.best_val_loss, 6),
            "final_train_accuracy": res.history[-1]["train_accuracy"],
            "images_seen": res.images_seen,
            "train_gflops": round(per_epoch(len(res.history)), 3),
            "converged": res.converged,
            "convergence": res.convergence,
            "training_failed": seed in result.failures,
            "failure_reason": result.failures.get(seed),
        }
        seconds[str(seed)] = round(res.train_seconds, 3)
    vals = [r["best_val_accuracy"] for r in per_seed.values()]
    metrics = {
        "source": source_name,
        "seeds": list(recipe.seeds),
        "lr": result.lr,
        "lr_search": result.lr_search,
        "epoch_cap": recipe.epochs,
        "converged": all(r["converged"] for r in per_seed.values()),
        "training_failed": bool(result.failures),
        "trainable_params": first.trainable_params,
        "total_params": first.total_params,
        "trainable_fraction": round(first.trainable_params / first.total_params, 6),
        "flops_per_image": flops_fwd,
        "train_flops_per_image": first.train_flops,
        "lr_choice": {k: v for k, v in result.lr_choice.items() if k != "rule"},  # the rule: in the report
        "lr_search_gflops": search_compute(result.lr_search, train_flops, n_train),
        "train_gflops_mean": round(float(np.mean([r["train_gflops"] for r in per_seed.values()])), 3),
        "best_val_accuracy_mean": round(float(np.mean(vals)), 6),
        "best_val_accuracy_std": round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 6),
        "per_seed": per_seed,
    }
    return StrategyRun(protocol=result, meta=meta, histories=histories, metrics=metrics, seconds=seconds)

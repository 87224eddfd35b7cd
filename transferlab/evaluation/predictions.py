"""Per-sample predictions as the pipeline stores them (`predictions/<name>.csv`): one row per training seed and
test sample, keyed by `sample_id` (core.layout reads them back and aligns models on it); and evaluate@'s
computation (`evaluate_model`: every seed's saved model on the test split, its metrics and predictions;
`deployed_latency_ms`), which `transferlab audit --reevaluate` reruns to check the recorded numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from transferlab.data.splits import Prepared


def predictions_frame(
    sample_ids: np.ndarray, seed: int, y_true: np.ndarray, proba: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One model's per-sample predictions.

    Args:
        sample_ids: (n,) ids of the test samples, in the row order of `y_true` and `proba`.
        seed: the training seed of the model (0 for a model without one, the classical baseline).
        y_true: (n,) true labels.
        proba: (n, n_classes) predicted class probabilities.
        class_names: the names of the columns of `proba`.

    Returns:
        Columns sample_id, seed, y_true, y_pred (the argmax) and p_<class> (rounded to 6 decimals, so the CSV
        stays small and stable in its last bits).
    """
    df = pd.DataFrame({"sample_id": sample_ids, "seed": seed, "y_true": y_true, "y_pred": proba.argmax(1)})
    for i, c in enumerate(class_names):
        df[f"p_{c}"] = np.round(proba[:, i], 6)
    return df


# --- evaluate@: every training seed's saved model on the test split ---------------------------------------


@dataclass(frozen=True)
class ModelEvaluation:
    """What `evaluate_model` measured for one strategy's saved models."""

    metrics: dict  # metrics/eval/<strategy>.json: pooled over seeds, `per_seed`, size on disk, parameters
    confusion: list[list[int]]  # pooled over seeds, C x C, rows = true class
    predictions: pd.DataFrame  # predictions/<strategy>.csv: `predictions_frame` of every seed, in seed order
    confusion_rows: pd.DataFrame  # plots/confusion/<strategy>.csv: actual / predicted class name per row
    model: Any  # the first seed's model as loaded (what `deployed_latency_ms` times)
    meta: dict  # the first seed's model_meta.json


def model_meta(model_dir: str | Path) -> dict:
    """The `model_meta.json` of the first seed's model in `model_dir` (what the train stage saved beside
    the weights: strategy kind, source name and spec, classes, preprocessing).

    Raises:
        FileNotFoundError: no `seed_<s>/` model in `model_dir` (run its train stage first).
        ValueError: the meta lacks a field evaluation needs (a model saved by an older train stage: retrain).
    """
    from transferlab.core import layout
    from transferlab.strategies import Strategy

    first = next(iter(layout.seed_dirs(model_dir).values()))
    meta = Strategy.read_meta(first)
    missing = [k for k in ("kind", "source", "source_spec", "mean", "std") if k not in meta]
    if missing:
        raise ValueError(
            f"{first / 'model_meta.json'} has no {missing}: it was saved by an older train stage; "
            f"rerun it (`dvc repro --force train@{meta.get('strategy', '<strategy>')}`)"
        )
    return meta


def evaluate_model(
    model_dir: str | Path,
    data: Prepared,
    *,
    seed: int,
    pretrained_dir: str | Path,
    device: Any = None,
) -> ModelEvaluation:
    """Test metrics and per-sample predictions of every training seed's saved model in `model_dir`.

    Each `seed_<s>/` model is rebuilt by its strategy (the kind in model_meta.json); a strategy that needs
    its source model (LoRA's base) loads it from the spec the train stage saved there (`source_spec`), so
    the numbers depend on the model folder, not on today's `sources` params. The models predict the test
    split on `device`; the metrics are `classification_metrics` per seed (`per_seed`) and of every seed's
    predictions pooled (its accuracy is then exactly the mean over seeds), with `seeds`,
    `test_accuracy_seed_std`, `artifact_size_mb` (the first seed's weights or LoRA adapter on disk) and
    `params_millions` (`costs.count_parameters` of the first seed's model).

    Args:
        model_dir: the train stage's model folder (`seed_<s>/` inside).
        data: the prepared splits (`data.splits.load_prepared`).
        seed: the pipeline's `seed` (a `random_init` source is initialised with it, as the train stage did).
        pretrained_dir: where `pretrain@<name>` wrote in-pipeline sources (`models/pretrain`).
        device: where the models predict (default: the CPU).

    Returns:
        The ModelEvaluation.

    Raises:
        FileNotFoundError / ValueError: see `model_meta`.
    """
    import torch

    from transferlab.core import layout
    from transferlab.core.io import dir_size_bytes
    from transferlab.evaluation.metrics import classification_metrics
    from transferlab.models.costs import count_parameters
    from transferlab.models.inference import predict_images
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.strategies import get_strategy

    seed_dirs = layout.seed_dirs(model_dir)
    meta = model_meta(model_dir)
    strategy = get_strategy(meta["kind"])
    source_name, spec = meta["source"], SourceSpec.model_validate(meta["source_spec"])
    images, y_true = data.images["test"], data.labels["test"]
    frames, probas, per_seed, first_model = [], [], {}, None
    for train_seed, seed_dir in seed_dirs.items():
        model = strategy.load(seed_dir, lambda: load_source(source_name, spec, seed=seed, pipeline_dir=pretrained_dir))
        if first_model is None:
            first_model = model
        logits = predict_images(model, images, meta["mean"], meta["std"], device=device)
        proba = torch.softmax(logits, 1).numpy().astype(np.float64)
        probas.append(proba)
        m = classification_metrics(y_true, proba, data.class_names)
        per_seed[str(train_seed)] = {k: m[k] for k in ("test_accuracy", "balanced_accuracy", "macro_f1", "nll")}
        frames.append(predictions_frame(data.ids["test"], train_seed, y_true, proba, data.class_names))
    # Every seed's predictions pooled: accuracy is then exactly the mean over seeds.
    pooled_y = np.concatenate([y_true] * len(probas))
    metrics = classification_metrics(pooled_y, np.concatenate(probas), data.class_names)
    confusion = metrics.pop("confusion")
    metrics["test_samples"] = len(y_true)
    accs = [r["test_accuracy"] for r in per_seed.values()]
    metrics["seeds"] = len(per_seed)
    metrics["test_accuracy_seed_std"] = round(float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, 6)
    metrics["per_seed"] = per_seed
    first_dir = next(iter(seed_dirs.values()))
    adapter = first_dir / "adapter"
    size_bytes = dir_size_bytes(adapter) if adapter.is_dir() else dir_size_bytes(first_dir / "model.pt")
    metrics["artifact_size_mb"] = round(size_bytes / 2**20, 3)
    metrics["params_millions"] = round(count_parameters(first_model) / 1e6, 4)
    predictions = pd.concat(frames)
    names = np.asarray(data.class_names)
    pooled_pred = np.concatenate([f["y_pred"].to_numpy() for f in frames])
    confusion_rows = pd.DataFrame({"actual": names[pooled_y], "predicted": names[pooled_pred]})
    return ModelEvaluation(metrics, confusion, predictions, confusion_rows, first_model, meta)


def deployed_latency_ms(evaluation: ModelEvaluation, images: np.ndarray, n_images: int) -> dict[str, float]:
    """CPU milliseconds per image of the model as it would be deployed, at batch 1 and 32.

    The first seed's model, with a LoRA adapter merged into its weights (what would ship; this changes
    `evaluation.model` in place), timed by `cpu_latency_ms`.

    Returns:
        {"latency_ms_per_image_batch1", "latency_ms_per_image_batch32"}, rounded to 3 decimals.
    """
    meta = evaluation.meta
    model = evaluation.model
    deployed = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return cpu_latency_ms(deployed, images, meta["mean"], meta["std"], n_images)


def cpu_latency_ms(model: Any, images: np.ndarray, mean: tuple, std: tuple, n_images: int) -> dict[str, float]:
    """CPU milliseconds per image of `model` at batch 1 and 32: evaluate@'s measurement, also the diagnosis'
    cost of a remedy model.

    `model` is moved to the CPU (in place) and timed by `models.costs.latency_ms` on the first `n_images` of
    `images` (normalised with `mean` / `std`, as at training), after 2 warm-up passes, over `n_images // batch`
    timed passes (at least 1). Wall time: it varies run to run, so it belongs in perf/, not in a metrics file.

    Returns:
        {"latency_ms_per_image_batch1", "latency_ms_per_image_batch32"}, rounded to 3 decimals.
    """
    from transferlab.models.costs import latency_ms
    from transferlab.models.inference import to_input

    example = to_input(images[:n_images], mean, std)
    model.to("cpu")
    return {
        f"latency_ms_per_image_batch{b}": round(
            latency_ms(model, None, b, repeats=max(1, n_images // b), warmup=2, example=example), 3
        )
        for b in (1, 32)
    }

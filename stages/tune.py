"""Stage `tune@<strategy>` (optional): a search over one strategy's hyperparameters, on Optuna or Ray Tune.

Every trial trains the strategy from a fresh copy of the selected source on the train split, for
`tune.epochs` epochs, and scores it by its best validation accuracy: the test split is not even loaded, so
`evaluate@` of the tuned recipe stays honest. With `tune.backend: optuna` and one worker, trials run one
after the other with a seeded sampler and re-seeded training, so the study is reproducible; with
`tune.backend: ray`, `tune.workers` trials run at once in Ray workers (a local Ray, or the cluster at
`tune.ray_address`). Either way each trial becomes a nested MLflow run under the stage's run, logged by
this process once the trials have ended.

Writes the best values as a params fragment (`{strategies: {<name>: {...}}}`, the current entry with the
tuned values merged in) to copy into params.yaml or pass to `dvc exp run --set-param`, and the study's
summary as a DVC metric.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import write_json, write_text
from transferlab.core.seeding import seed_everything
from transferlab.data.splits import load_prepared
from transferlab.models.sources import load_source
from transferlab.strategies import STRATEGIES, get_strategy, strategy_config
from transferlab.tuning.objective import ReportingStrategy
from transferlab.tuning.optuna_backend import tune
from transferlab.tuning.ray_backend import tune_ray
from transferlab.tuning.space import Report, SearchSpace, TuningError, validate_space


def _fragment(name: str, entry: dict[str, Any], result: dict[str, Any], n_trials: int) -> str:
    """The tuned params fragment, with a header saying where it came from and how to use it."""
    best = result["best_params"]
    sets = " ".join(f"--set-param strategies.{name}.{k}={v}" for k, v in best.items())
    header = (
        f"# Tuned by tune@{name}: best validation accuracy {result['best_value']:.4f} over {n_trials} trials.\n"
        f"# Copy into params.yaml, or try it: dvc exp run {sets}\n"
    )
    body = yaml.safe_dump({"strategies": {name: {**entry, **best}}}, sort_keys=False, default_flow_style=False)
    return header + body


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True, help="a key of `strategies` in params")
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True, help="folder holding features/<source>/ caches")
    p.add_argument("--selection", required=True, help="the score stage's data/selection.json")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--out", required=True, help="tuned params fragment (YAML)")
    p.add_argument("--metrics", required=True, help="study summary (JSON)")
    p.add_argument(
        "--ray-results",
        default=".ray_results",
        help="backend ray: folder (or a URI every node reaches) for Ray's per-trial results; scratch, not a DVC out",
    )
    args = p.parse_args()
    params = params_or_exit(args.params)
    name = args.strategy
    if name not in params.strategies:
        raise SystemExit(
            f"--strategy {name}: not a key of `strategies` (valid: {sorted(params.strategies)}; "
            f"registered strategy kinds: {sorted(STRATEGIES)})"
        )
    tp, tu = params.train, params.tune
    entry = dict(params.strategies[name])
    cfg = strategy_config(name, entry)
    strategy = get_strategy(cfg.kind)
    if name not in tu.space:
        raise SystemExit(f"tune.space.{name}: no search space for '{name}' (spaces: {sorted(tu.space)})")
    # Every bound and choice is checked against the strategy's config before the first trial trains.
    try:
        space = SearchSpace.from_dict(tu.space[name], where=f"tune.space.{name}")
        validate_space(name, entry, space)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # torch and the training loop: imported once params and the search space are known to be valid.
    from stages.train import resolve_source
    from transferlab.core.device import resolve_device
    from transferlab.training.loop import DivergenceError
    from transferlab.training.protocol import train_strategy

    source_name, spec = resolve_source(args.selection)
    read = {
        "seed": params.seed,
        "train": tp.model_dump(),
        "tune": {**tu.model_dump(exclude={"space", "strategies"}), "space": tu.space[name]},
        f"strategies.{name}": entry,
        f"sources.{source_name}": spec.model_dump(),
        "resolved": {"source": source_name, "epochs_per_trial": tu.epochs, "backend": tu.backend},
    }

    seed_everything(params.seed, tp.num_threads)
    device = resolve_device(tp.device)
    if tu.backend == "ray" and device.type == "cuda":
        import torch

        # A Ray trial sees only the GPU Ray gave it, as cuda:0 (CUDA_VISIBLE_DEVICES).
        device = torch.device("cuda")
    data = load_prepared(args.prepared)
    # Train and validation only: tuning never sees the test split.
    images = {s: data.images[s] for s in ("train", "val")}
    labels = {s: data.labels[s] for s in ("train", "val")}
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    features = None
    if strategy.uses_features:
        feat_dir = Path(args.features) / source_name
        if not (feat_dir / "train_features.npy").is_file():
            raise SystemExit(f"{feat_dir} has no features: run `dvc repro features@{source_name}` first")
        features = {s: np.load(feat_dir / f"{s}_features.npy") for s in ("train", "val")}
    # Not `data` itself in the closure: with backend ray the objective is pickled to the workers, and
    # `data` holds the test split, which tuning never touches.
    num_classes = data.num_classes
    del data

    def objective(config: dict[str, Any], report: Report) -> float:
        trial_cfg = strategy_config(name, config)
        if features is not None:
            wrapped = ReportingStrategy(strategy, report, features["val"], labels["val"])
        else:
            wrapped = ReportingStrategy(strategy, report, images["val"], labels["val"], source.mean, source.std)
        # Re-seeded and from a fresh copy of the source (strategies build on the source network in place),
        # so a trial's result depends on its hyperparameters only, not on the trials before it.
        gen = seed_everything(params.seed, tp.num_threads)
        result = train_strategy(
            wrapped,
            trial_cfg,
            copy.deepcopy(source),
            images,
            labels,
            num_classes,
            epochs=config.get("epochs") if "epochs" in space.names else tu.epochs,
            batch_size=tp.batch_size,
            patience=tp.patience,
            weight_decay=tp.weight_decay,
            augment=tp.augment,
            seed=params.seed,
            generator=gen,
            features=features,
            label=f"tune@{name}",
            device=device,
        )
        return result.best_val_accuracy

    # A separate SQLite file from MLflow's (tracking.uri): Optuna's RDB storage and MLflow both keep an
    # `alembic_version` table for their own schema migrations, and would break each other in one database.
    storage = tu.storage
    if tu.backend == "optuna" and storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    from transferlab.core.device import device_tags
    from transferlab.provenance.tracking import stage_run

    tags = {"source": source_name, "kind": cfg.kind, **device_tags(device)}
    with stage_run(params.tracking, f"tune@{name}", read, strategy=name, tags=tags) as run:
        import mlflow

        def log_trial(t: dict[str, Any]) -> None:
            # The parent's experiment explicitly: a bare nested start_run would use the default experiment.
            with mlflow.start_run(experiment_id=run.info.experiment_id, nested=True, run_name=f"trial-{t['number']}"):
                mlflow.set_tags({"stage": f"tune@{name}", "strategy": name, "optuna_state": t["state"]})
                mlflow.log_params(t["params"])
                for step, value in sorted(t["intermediate_values"].items()):
                    mlflow.log_metric("epoch_val_accuracy", value, step=step)
                if t["value"] is not None:
                    mlflow.log_metric("val_accuracy", t["value"])

        common = dict(
            n_trials=tu.n_trials,
            seed=params.seed,
            study_name=f"tune@{name}",
            base_config=entry,
            pruner=tu.pruning,
            catch=(DivergenceError,),  # a diverging learning rate is a bad trial, not a failed stage
            on_trial_end=log_trial,
            workers=tu.workers,
        )
        try:
            if tu.backend == "ray":
                epochs_range = [h for h in space.params if h.name == "epochs"]
                result = tune_ray(
                    objective,
                    space,
                    **common,
                    storage_path=args.ray_results,
                    # ASHA's max_t: the longest any trial trains.
                    epochs=max(epochs_range[0].extremes()) if epochs_range else tu.epochs,
                    address=tu.ray_address,
                    grace_epochs=tu.asha_grace_epochs,
                    reduction_factor=tu.asha_reduction_factor,
                    # Ray sets OMP_NUM_THREADS to the CPUs a trial reserves; train.num_threads 0 means 1 here.
                    cpus_per_trial=max(1, tp.num_threads),
                    # A GPU shared by the trials running at once (Ray shows each trial only its own GPUs).
                    gpus_per_trial=1 / tu.workers if device.type == "cuda" else 0,
                )
            else:
                result = tune(objective, space, storage_url=storage, **common)
        except TuningError as exc:
            raise SystemExit(f"tune@{name}: {exc}") from None
        states = [t["state"] for t in result["trials"]]
        metrics = {
            "best_value": round(result["best_value"], 6),
            "n_trials": len(states),
            "n_complete": states.count("COMPLETE"),
            "n_pruned": states.count("PRUNED"),
            "n_failed": states.count("FAIL"),
            "best_params": result["best_params"],
        }
        write_json(args.metrics, metrics)
        write_text(args.out, _fragment(name, entry, result, tu.n_trials))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "best_params"})
        mlflow.log_params({f"best.{k}": v for k, v in result["best_params"].items()})
        mlflow.log_artifact(args.out)


if __name__ == "__main__":
    run_main(main)

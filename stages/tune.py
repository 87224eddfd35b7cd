"""Stage `tune@<strategy>` (optional): a search over one strategy's hyperparameters, on Optuna or Ray Tune.

Every trial trains the strategy from a fresh copy of the selected source on the train split with train@'s
own recipe (`transferlab.training.protocol.build_recipe`) for `tune.epochs` epochs, and scores it by its best
validation accuracy: the test split is not even loaded, so `evaluate@` of the tuned recipe stays honest.
With `tune.backend: optuna` and one worker, trials run one after the other with a seeded sampler and
re-seeded training, so the study is reproducible; with `tune.backend: ray`, `tune.workers` trials run at
once in Ray workers (a local Ray, or the cluster at `tune.ray_address`). Either way each trial becomes a
nested MLflow run under the stage's run, logged by this process once the trials have ended.

Writes the best values as a params fragment (`{strategies: {<name>: {...}}}`, the current entry with the
tuned values merged in) to copy into params.yaml or pass to `dvc exp run --set-param`, and the study's
summary as a DVC metric.
"""

from __future__ import annotations

from typing import Any

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import write_json, write_text
from transferlab.core.seeding import seed_everything
from transferlab.strategies import STRATEGIES, get_strategy, strategy_config
from transferlab.tuning.objective import TrialObjective, trial_device, tune_strategy
from transferlab.tuning.space import SearchSpace, TuningError, validate_space


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
    name, tp, tu = args.strategy, params.train, params.tune
    if name not in params.strategies:
        raise SystemExit(
            f"--strategy {name}: not a key of `strategies` (valid: {sorted(params.strategies)}; "
            f"registered strategy kinds: {sorted(STRATEGIES)})"
        )
    entry = dict(params.strategies[name])
    cfg = strategy_config(name, entry)
    if name not in tu.space:
        raise SystemExit(f"tune.space.{name}: no search space for '{name}' (spaces: {sorted(tu.space)})")
    # Every bound and choice is checked against the strategy's config before the first trial trains.
    try:
        space = SearchSpace.from_dict(tu.space[name], where=f"tune.space.{name}")
        validate_space(name, entry, space)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # torch and the training loop: imported once params and the search space are known to be valid.
    from transferlab.core.device import device_tags, resolve_device
    from transferlab.data.splits import load_prepared
    from transferlab.models.features import load_features_cache
    from transferlab.models.sources import load_source, read_selection
    from transferlab.provenance.tracking import stage_run

    strategy = get_strategy(cfg.kind)
    source_name, spec = read_selection(args.selection)
    tune_read = {**tu.model_dump(exclude={"space", "strategies"}), "space": tu.space[name]}
    read = {"seed": params.seed, "train": tp.model_dump(), "tune": tune_read, f"strategies.{name}": entry}
    read[f"sources.{source_name}"] = spec.model_dump()
    read["resolved"] = {"source": source_name, "epochs_per_trial": tu.epochs, "backend": tu.backend}
    seed_everything(params.seed, tp.num_threads)
    device = trial_device(resolve_device(tp.device), tu.backend)
    data = load_prepared(args.prepared)
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    features = load_features_cache(args.features, source_name, ("train", "val")) if strategy.uses_features else None
    # Train and validation only: tuning never sees the test split (with backend ray the objective is pickled).
    images, labels = ({s: split[s] for s in ("train", "val")} for split in (data.images, data.labels))
    num_classes = data.num_classes
    del data  # the test split stays out of this stage's work
    objective = TrialObjective(
        name, strategy, tp, tu.epochs, tuple(space.names), source, images, labels, num_classes, features, device
    )
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

        try:
            study = tune_strategy(
                objective, entry, space, tu, seed=params.seed, ray_results=args.ray_results, on_trial_end=log_trial
            )
        except TuningError as exc:
            raise SystemExit(f"tune@{name}: {exc}") from None
        write_json(args.metrics, study.metrics)
        write_text(args.out, study.fragment)
        mlflow.log_metrics({k: float(v) for k, v in study.metrics.items() if k != "best_params"})
        mlflow.log_params({f"best.{k}": v for k, v in study.result["best_params"].items()})
        mlflow.log_artifact(args.out)


if __name__ == "__main__":
    run_main(main)

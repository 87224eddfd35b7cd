"""Stage `train@<strategy>`: train one transfer strategy (or the scratch baseline) under the shared protocol.

The protocol (`transferlab.training.protocol.train_protocol`, with the recipe `build_recipe` makes): the
learning rate chosen from `train.lr_grid` on the validation split, then one run per seed of `train.seeds`,
each to a validation plateau (or marked under-trained at the epoch cap). Writes one model per seed
(`<out>/seed_<s>/`; for LoRA the adapter and head), deterministic training metrics
(`metrics/train/<name>.json`: per seed, convergence evidence, training compute, failures), one per-epoch
history per seed for `dvc plots`, wall-clock timings in `perf/` and the provenance record (MLflow run id, git
state) in `runs/`, outside every output a later stage depends on, so that an identical rerun leaves them cached.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True, help="a key of `strategies` in params")
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True, help="folder holding features/<source>/ caches")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--selection", required=True, help="the score stage's data/selection.json")
    p.add_argument("--out", required=True, help="model folder (one seed_<s>/ per training seed)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--history", required=True, help="folder of per-seed per-epoch CSVs for dvc plots")
    p.add_argument("--perf", required=True, help="timings JSON (not a DVC metric: wall time varies)")
    p.add_argument("--run-info", required=True, help="provenance JSON (MLflow run id, git state, input hashes)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    name, tp = args.strategy, params.train
    if name not in params.strategies:
        raise SystemExit(f"--strategy {name}: not a key of `strategies` (valid: {sorted(params.strategies)})")
    from transferlab.core import distributed

    if tp.processes > 1 and not distributed.launched():
        distributed.relaunch(tp.processes, "stages.train", sys.argv[1:])

    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.io import path_sha256, write_json
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.models.features import load_features_cache
    from transferlab.models.sources import load_source, read_selection
    from transferlab.provenance.tracking import run_info, stage_run
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.recipe import build_recipe
    from transferlab.training.run import train_stage

    cfg = strategy_config(name, params.strategies[name])
    strategy = get_strategy(cfg.kind)
    source_name, spec = read_selection(args.selection)
    seed_everything(params.seed, tp.num_threads)
    device = resolve_device(tp.device)  # after seeding: CUBLAS_WORKSPACE_CONFIG is set before CUDA starts
    # Under torchrun (train.processes > 1): join the group; every process trains, rank 0 alone records.
    dist_ctx, device = distributed.init_from_env(device)
    processes = dist_ctx.world_size if dist_ctx else 1
    recipe = build_recipe(tp, cfg, device=device)
    data = load_prepared(args.prepared)
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    features = load_features_cache(args.features, source_name, ("train", "val")) if strategy.uses_features else None
    read = {"seed": params.seed, "train": tp.model_dump(), f"strategies.{name}": cfg.model_dump()}
    read[f"sources.{source_name}"] = spec.model_dump()
    read["resolved"] = {"source": source_name, "epochs": recipe.epochs, "processes": processes}
    tags = {"source": source_name, "kind": cfg.kind, "processes": str(processes), **device_tags(device)}
    recording = stage_run(params.tracking, f"train@{name}", read, strategy=name, tags=tags)
    with recording if dist_ctx is None or dist_ctx.lead else contextlib.nullcontext() as run:
        import mlflow

        result = train_stage(name, strategy, cfg, recipe, source_name, spec, source, data, features)
        if dist_ctx is not None:
            distributed.finish()
            if not dist_ctx.lead:  # the same models as rank 0's: rank 0 writes them and the run
                return
        result.save(strategy, args.out, args.history, args.metrics)
        write_json(args.perf, {**result.perf, **device_info(device)})
        for seed, res in result.protocol.runs.items():
            for row in res.history:
                mlflow.log_metrics({f"seed{seed}.{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        numbers = {k: v for k, v in result.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics({k: float(v) for k, v in numbers.items()})
        mlflow.log_metric("train_seconds", sum(result.seconds.values()))
        inputs = {"prepared": path_sha256(args.prepared), "source_weights": source.weights_sha256 or source.weights}
        if features is not None:
            inputs["features"] = path_sha256(Path(args.features) / source_name)
        extra = {"model_sha256": path_sha256(args.out)}
        write_json(args.run_info, run_info(run, f"train@{name}", read, inputs, extra=extra))
        mlflow.log_artifacts(str(args.out), artifact_path="model")
        mlflow.log_artifacts(str(args.history), artifact_path="history")


if __name__ == "__main__":
    run_main(main)

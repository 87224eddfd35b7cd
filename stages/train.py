"""Stage `train@<strategy>`: train one transfer strategy (or the scratch baseline) under the shared protocol.

The protocol (`transferlab.training.protocol.train_protocol`): the learning rate chosen from `train.lr_grid` on the
validation split, then one run per seed of `train.seeds`, each to a validation plateau (or marked
under-trained at the epoch cap). Writes one model per seed (`<out>/seed_<s>/`; for LoRA the adapter and
head), deterministic training metrics (`metrics/train/<name>.json`: per seed, convergence evidence,
training compute, failures), one per-epoch history per seed for `dvc plots`, wall-clock timings in `perf/`
and the provenance record (MLflow run id, git state) in `runs/`, outside every output a later stage
depends on, so that an identical rerun leaves them cached.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def resolve_source(selection: str):
    """The source every strategy trains from, as the score stage resolved `train.source` (a fixed name,
    or 'auto': the top-ranked candidate within budgets)."""
    from transferlab.core.io import read_json
    from transferlab.params import SourceSpec

    if not Path(selection).is_file():
        raise SystemExit(f"{selection} not found: run `dvc repro score` first")
    sel = read_json(selection)
    return sel["selected"], SourceSpec.model_validate(sel["spec"])


def _epoch_compute(strategy, flops_fwd: int, head_flops: int, n_train: int, n_cached: int):
    """Cumulative training compute in GFLOPs after epoch e: forward + backward ~ 3x the forward FLOPs per
    training image seen.

    Strategies on the features cache pay one forward pass of the backbone over the cached images, then
    3x the head's FLOPs per image seen. Frozen layers need no weight gradients, so for partial fine-tuning
    the 3x is an upper bound; the seconds in `perf/` are the measured cost.
    """
    if strategy.uses_features:
        return lambda e: (flops_fwd * n_cached + 3 * head_flops * n_train * e) / 1e9
    return lambda e: 3 * flops_fwd * n_train * e / 1e9


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
    name = args.strategy
    if name not in params.strategies:
        raise SystemExit(f"--strategy {name}: not a key of `strategies` (valid: {sorted(params.strategies)})")
    from transferlab.core import distributed

    if params.train.processes > 1 and not distributed.launched():
        distributed.relaunch(params.train.processes, "stages.train", sys.argv[1:])

    import numpy as np
    import pandas as pd

    from transferlab.core import layout
    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.io import path_sha256, write_json, write_text
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.models.costs import flops_per_image
    from transferlab.models.sources import load_source
    from transferlab.provenance.tracking import run_info, stage_run
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.protocol import train_protocol

    cfg = strategy_config(name, params.strategies[name])
    strategy = get_strategy(cfg.kind)
    source_name, spec = resolve_source(args.selection)
    tp = params.train
    epochs = cfg.epochs or tp.epochs
    read = {
        "seed": params.seed,
        "train": tp.model_dump(),
        f"strategies.{name}": cfg.model_dump(),
        f"sources.{source_name}": spec.model_dump(),
        "resolved": {"source": source_name, "epochs": epochs},
    }

    seed_everything(params.seed, tp.num_threads)
    device = resolve_device(tp.device)  # after seeding: CUBLAS_WORKSPACE_CONFIG is set before CUDA starts
    # Under torchrun (train.processes > 1): join the group; every process trains, rank 0 alone records.
    dist_ctx, device = distributed.init_from_env(device)
    processes = dist_ctx.world_size if dist_ctx else 1
    read["resolved"]["processes"] = processes
    data = load_prepared(args.prepared)
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    features = None
    feat_dir = Path(args.features) / source_name
    if strategy.uses_features:
        if not (feat_dir / "train_features.npy").is_file():
            raise SystemExit(f"{feat_dir} has no features: run `dvc repro features@{source_name}` first")
        features = {s: np.load(feat_dir / f"{s}_features.npy") for s in ("train", "val")}
    out = Path(args.out)
    tags = {"source": source_name, "kind": cfg.kind, "processes": str(processes), **device_tags(device)}
    recording = stage_run(params.tracking, f"train@{name}", read, strategy=name, tags=tags)
    with recording if dist_ctx is None or dist_ctx.lead else contextlib.nullcontext() as run:
        import mlflow

        image_size = int(data.images["train"].shape[1])
        flops_fwd = flops_per_image(source.model, image_size)
        feature_dim = features["train"].shape[1] if features is not None else 0
        head_flops = 2 * feature_dim * data.num_classes
        result = train_protocol(
            strategy,
            cfg,
            lambda: copy.deepcopy(source),
            data.images,
            data.labels,
            data.num_classes,
            seeds=list(tp.seeds),
            lr_grid=list(tp.lr_grid),
            lr_search_epochs=tp.lr_search_epochs,
            lr_grid_extend=tp.lr_grid_extend,
            epochs=epochs,
            batch_size=tp.batch_size,
            patience=tp.patience,
            weight_decay=tp.weight_decay,
            augment=tp.augment,
            num_threads=tp.num_threads,
            features=features,
            label=name,
            device=device,
            lr_patience=tp.lr_patience,
            min_lr_ratio=tp.min_lr_ratio,
            channels_last=tp.channels_last,
            lr_factor=tp.lr_factor,
            min_delta=tp.min_delta,
        )
        if dist_ctx is not None:
            distributed.finish()
            if not dist_ctx.lead:  # the same models as rank 0's: rank 0 writes them and the run
                return
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
        n_cached = len(data.labels["train"]) + len(data.labels["val"])
        per_seed, seconds = {}, {}
        n_train = len(data.labels["train"])
        for seed, res in result.runs.items():
            strategy.save(res.model, layout.seed_dir(out, seed), {**meta, "seed": seed})
            history = pd.DataFrame(res.history)
            # Cumulative training compute after each epoch: the x axis of accuracy-against-compute.
            per_epoch = _epoch_compute(strategy, flops_fwd, head_flops, n_train, n_cached)
            history["train_gflops"] = [round(per_epoch(e), 4) for e in history["epoch"]]
            write_text(layout.history_path(args.history, seed), history.to_csv(index=False, lineterminator="\n"))
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
        first = next(iter(result.runs.values()))
        vals = [r["best_val_accuracy"] for r in per_seed.values()]
        metrics = {
            "source": source_name,
            "seeds": list(tp.seeds),
            "lr": result.lr,
            "lr_search": result.lr_search,
            "epoch_cap": epochs,
            "converged": all(r["converged"] for r in per_seed.values()),
            "training_failed": bool(result.failures),
            "trainable_params": first.trainable_params,
            "total_params": first.total_params,
            "trainable_fraction": round(first.trainable_params / first.total_params, 6),
            "flops_per_image": flops_fwd,
            "train_gflops_mean": round(float(np.mean([r["train_gflops"] for r in per_seed.values()])), 3),
            "best_val_accuracy_mean": round(float(np.mean(vals)), 6),
            "best_val_accuracy_std": round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 6),
            "per_seed": per_seed,
        }
        write_json(args.metrics, metrics)
        write_json(
            args.perf,
            {
                "train_seconds_by_seed": seconds,
                "train_seconds_total": round(sum(seconds.values()), 3),
                **device_info(device),
            },
        )
        for seed, res in result.runs.items():
            for row in res.history:
                mlflow.log_metrics({f"seed{seed}.{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        mlflow.log_metrics(
            {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
        mlflow.log_metric("train_seconds", sum(seconds.values()))
        inputs = {"prepared": path_sha256(args.prepared), "source_weights": source.weights_sha256 or source.weights}
        if features is not None:
            inputs["features"] = path_sha256(feat_dir)
        info = run_info(run, f"train@{name}", read, inputs, extra={"model_sha256": path_sha256(out)})
        write_json(args.run_info, info)
        mlflow.log_artifacts(str(out), artifact_path="model")
        mlflow.log_artifacts(str(args.history), artifact_path="history")


if __name__ == "__main__":
    run_main(main)

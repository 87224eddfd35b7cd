"""Stage `dense-train@<strategy>` (detection/pipeline.yaml, opt-in): one dense strategy trained for `dense.task`.

The rate is chosen on validation (first seed), then one run per seed of `dense.seeds`; each keeps its best
validation epoch (`transferlab.training.dense`). Writes the checkpoints and `meta.json` (`--models`) and the
training record (`--metrics`: rate search, per-seed history, best epoch, final training loss and score,
under-trained flag). The test split is not read.
"""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True, help="a key of dense.strategies")
    p.add_argument("--prepared", required=True, help="dense-prepare's folder")
    p.add_argument("--models", required=True, help="output folder: seed<k>.pt and meta.json")
    p.add_argument("--metrics", required=True, help="the training record (JSON)")
    p.add_argument("--pretrained-dir", default="models/pretrain", help="pipeline sources' folder")
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.dense
    from transferlab.strategies.dense import DENSE_STRATEGIES, dense_strategy_config

    cfg = dense_strategy_config(args.strategy, dp.strategies[args.strategy], dp.task)
    strategy = DENSE_STRATEGIES[cfg.kind]
    spec = params.sources[dp.source]

    from pathlib import Path

    from transferlab.core.io import save_torch, write_json
    from transferlab.core.seeding import seed_everything
    from transferlab.data.dense import load_dense
    from transferlab.evaluation.dense_metrics import val_score_fn
    from transferlab.models.sources import load_source
    from transferlab.provenance.tracking import stage_run
    from transferlab.training.dense import Batches, build_fn, train_dense_strategy

    seed_everything(params.seed, params.train.num_threads)
    splits, classes = load_dense(args.prepared, ("train", "val"))
    source = load_source(dp.source, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    c = len(classes)
    train = Batches(splits["train"], dp.task, c, source.mean, source.std)
    val = Batches(splits["val"], dp.task, c, source.mean, source.std)
    build = build_fn(source.arch, source, strategy, cfg, dp.task, c, dp.decoder_channels)
    read = {  # exactly what dvc.yaml declares for this stage
        "seed": params.seed,
        f"sources.{dp.source}": spec.model_dump(),
        "train.num_threads": params.train.num_threads,
        **{
            f"dense.{k}": getattr(dp, k)
            for k in ("task", "source", "image_size", "seeds", "batch_size", "epochs", "lr_grid", "lr_search_epochs")
        },
        **{f"dense.{k}": getattr(dp, k) for k in ("weight_decay", "decoder_channels", "max_detections")},
        f"dense.strategies.{args.strategy}": cfg.model_dump(),
    }
    with stage_run(
        params.tracking, f"dense-train@{args.strategy}", read, strategy=args.strategy, tags={"task": dp.task}
    ):
        import mlflow

        record, runs = train_dense_strategy(
            build,
            strategy,
            cfg,
            train,
            val,
            val_score_fn(dp.task, c),
            seeds=list(dp.seeds),
            epochs=dp.epochs,
            lr_grid=list(dp.lr_grid),
            lr_search_epochs=dp.lr_search_epochs,
            batch_size=dp.batch_size,
            weight_decay=dp.weight_decay,
            max_detections=dp.max_detections,
        )
        out = Path(args.models)
        for seed, run in runs.items():
            save_torch(out / f"seed{seed}.pt", run.state_dict)
            mlflow.log_metric(f"seed{seed}.best_val_score", run.best_val_score)
        meta = {
            "task": dp.task,
            "strategy": args.strategy,
            "config": cfg.model_dump(),
            "source": dp.source,
            "arch": source.arch,
            "mean": list(source.mean),
            "std": list(source.std),
            "class_names": classes,
            "width": dp.decoder_channels,
            "seeds": list(dp.seeds),
        }
        write_json(out / "meta.json", meta)
        write_json(args.metrics, {"task": dp.task, "source": dp.source, "val_metric": _val_metric(dp.task), **record})


def _val_metric(task: str) -> str:
    return "map" if task == "detection" else "mean_iou"


if __name__ == "__main__":
    run_main(main)

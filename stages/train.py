"""Stage `train@<strategy>`: train one transfer strategy (or the scratch baseline) on the prepared data.

Writes the model (for LoRA: the adapter and head) with `model_meta.json` and `run_info.json` beside it,
deterministic training metrics (`metrics/train/<name>.json`), the per-epoch history for `dvc plots`, and
wall-clock timings in `perf/` (kept out of the metrics so that a re-run shows an empty metrics diff).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages._common import params_or_exit, parser, run_main
from transferlab.backbones import load_source
from transferlab.data import load_prepared
from transferlab.io import path_sha256, read_json, write_json, write_text
from transferlab.params import SourceSpec
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.tracking import run_info, stage_run
from transferlab.training import train_strategy


def resolve_source(selection: str) -> tuple[str, SourceSpec]:
    """The source every strategy trains from, as the score stage resolved `train.source` (a fixed name,
    or 'auto': the top-ranked candidate within budgets)."""
    if not Path(selection).is_file():
        raise SystemExit(f"{selection} not found: run `dvc repro score` first")
    sel = read_json(selection)
    return sel["selected"], SourceSpec.model_validate(sel["spec"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True, help="a key of `strategies` in params")
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True, help="folder holding features/<source>/ caches")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--selection", required=True, help="the score stage's data/selection.json")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--metrics", required=True)
    p.add_argument("--history", required=True, help="per-epoch CSV for dvc plots")
    p.add_argument("--perf", required=True, help="timings JSON (not a DVC metric: wall time varies)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    name = args.strategy
    if name not in params.strategies:
        raise SystemExit(f"--strategy {name}: not a key of `strategies` (valid: {sorted(params.strategies)})")
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

    gen = seed_everything(params.seed, tp.num_threads)
    data = load_prepared(args.prepared)
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    features = None
    feat_dir = Path(args.features) / source_name
    if strategy.uses_features:
        if not (feat_dir / "train_features.npy").is_file():
            raise SystemExit(f"{feat_dir} has no features: run `dvc repro features@{source_name}` first")
        features = {s: np.load(feat_dir / f"{s}_features.npy") for s in ("train", "val")}
    out = Path(args.out)
    with stage_run(
        params.tracking, f"train@{name}", read, strategy=name, tags={"source": source_name, "kind": cfg.kind}
    ) as run:
        import mlflow

        result = train_strategy(
            strategy,
            cfg,
            source,
            data.images,
            data.labels,
            data.num_classes,
            epochs=epochs,
            batch_size=tp.batch_size,
            patience=tp.patience,
            weight_decay=tp.weight_decay,
            augment=tp.augment,
            seed=params.seed,
            generator=gen,
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
        }
        if source.kwargs:
            meta["kwargs"] = source.kwargs
        strategy.save(result.model, out, meta)
        history = pd.DataFrame(result.history)
        write_text(args.history, history.to_csv(index=False, lineterminator="\n"))
        metrics = {
            "trainable_params": result.trainable_params,
            "total_params": result.total_params,
            "trainable_fraction": round(result.trainable_params / result.total_params, 6),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "best_val_accuracy": round(result.best_val_accuracy, 6),
            "final_train_accuracy": result.history[-1]["train_accuracy"],
            "stopped_early": result.stopped_early,
        }
        write_json(args.metrics, metrics)
        write_json(
            args.perf,
            {
                "train_seconds": round(result.train_seconds, 3),
                "seconds_per_epoch": round(result.train_seconds / len(result.history), 3),
            },
        )
        for row in result.history:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_metric("train_seconds", result.train_seconds)
        inputs = {"prepared": path_sha256(args.prepared), "source_weights": source.weights_sha256 or source.weights}
        if features is not None:
            inputs["features"] = path_sha256(feat_dir)
        write_json(out / "run_info.json", run_info(run, f"train@{name}", read, inputs))
        mlflow.log_artifacts(str(out), artifact_path="model")
        mlflow.log_artifact(args.history)


if __name__ == "__main__":
    run_main(main)

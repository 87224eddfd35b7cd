"""Stage `evaluate@<strategy>`: test-set metrics, per-sample predictions, confusion plot, CPU latency."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages._common import params_or_exit, parser, run_main
from transferlab.backbones import load_source, to_input
from transferlab.data import load_prepared
from transferlab.evaluation import classification_metrics, latency_ms_per_image
from transferlab.io import dir_size_bytes, path_sha256, write_json, write_text
from transferlab.plotting import confusion_png
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.tracking import stage_run
from transferlab.training import predict_images


def predictions_frame(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"y_true": y_true, "y_pred": proba.argmax(1)})
    for i, c in enumerate(class_names):
        df[f"p_{c}"] = np.round(proba[:, i], 6)
    return df


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--model", required=True, help="the train stage's model folder")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True, help="per-sample predictions CSV")
    p.add_argument("--confusion", required=True, help="actual/predicted CSV for dvc's confusion plot")
    p.add_argument("--perf", required=True, help="latency JSON (not a DVC metric: wall time varies)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    name = args.strategy
    cfg = strategy_config(name, params.strategies.get(name))
    strategy = get_strategy(cfg.kind)
    model_dir = Path(args.model)
    meta = strategy.read_meta(model_dir)
    source_name = meta["source"]
    read = {
        "seed": params.seed,
        "evaluate": params.evaluate.model_dump(),
        f"sources.{source_name}": params.sources[source_name].model_dump(),
    }
    seed_everything(params.seed, params.train.num_threads)
    data = load_prepared(args.prepared)
    with stage_run(params.tracking, f"evaluate@{name}", read, strategy=name, tags={"source": source_name}):
        import mlflow

        model = strategy.load(
            model_dir,
            lambda: load_source(
                source_name, params.sources[source_name], seed=params.seed, pipeline_dir=args.pretrained_dir
            ),
        )
        images, y_true = data.images["test"], data.labels["test"]
        logits = predict_images(model, images, meta["mean"], meta["std"])
        proba = torch.softmax(logits, 1).numpy().astype(np.float64)
        metrics = classification_metrics(y_true, proba, data.class_names)
        confusion = metrics.pop("confusion")
        size_bytes = (
            dir_size_bytes(model_dir / "adapter")
            if (model_dir / "adapter").is_dir()
            else dir_size_bytes(model_dir / "model.pt")
        )
        metrics["artifact_size_mb"] = round(size_bytes / 2**20, 3)
        metrics["params_millions"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 4)
        write_json(args.metrics, metrics)
        write_text(
            args.predictions,
            predictions_frame(y_true, proba, data.class_names).to_csv(index_label="index", lineterminator="\n"),
        )
        names = np.asarray(data.class_names)
        write_text(
            args.confusion,
            pd.DataFrame({"actual": names[y_true], "predicted": names[proba.argmax(1)]}).to_csv(
                index=False, lineterminator="\n"
            ),
        )
        example = to_input(images[: params.evaluate.latency_images], meta["mean"], meta["std"])
        # A LoRA adapter is merged into the weights for deployment: time what would be deployed.
        deployed = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        perf = {
            "latency_ms_per_image_batch1": round(
                latency_ms_per_image(deployed, example, params.evaluate.latency_images, 1), 3
            ),
            "latency_ms_per_image_batch32": round(
                latency_ms_per_image(deployed, example, params.evaluate.latency_images, 32), 3
            ),
            "threads": torch.get_num_threads(),
        }
        write_json(args.perf, perf)
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics({**flat, **{k: v for k, v in perf.items()}})
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"confusion_{name}.png"
            confusion_png(np.asarray(confusion), data.class_names, f"{name}: test confusion", png)
            mlflow.log_artifact(str(png))
        mlflow.log_artifact(args.predictions)
        mlflow.set_tag("model_sha256", path_sha256(model_dir))


if __name__ == "__main__":
    run_main(main)

"""Stage `evaluate@<strategy>`: test-set metrics of every training seed's model, per-sample predictions
(one row per seed and test sample, keyed by `sample_id`), the confusion plot and CPU latency.

Predictions run on `train.device` (the GPU when there is one); latency is always timed on the CPU (the
deployment this project reports), and the device used is recorded in `perf/`, not in the metrics.

The test split is touched here and nowhere upstream: every choice (rate, epoch, model) was made on
validation before this stage runs.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def predictions_frame(sample_ids, seed: int, y_true, proba, class_names: list[str]):
    """One model's per-sample predictions: sample_id, seed, y_true, y_pred, p_<class>..."""
    import numpy as np
    import pandas as pd

    df = pd.DataFrame({"sample_id": sample_ids, "seed": seed, "y_true": y_true, "y_pred": proba.argmax(1)})
    for i, c in enumerate(class_names):
        df[f"p_{c}"] = np.round(proba[:, i], 6)
    return df


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--model", required=True, help="the train stage's model folder (seed_<s>/ inside)")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True, help="per-sample predictions CSV")
    p.add_argument("--confusion", required=True, help="actual/predicted CSV for dvc's confusion plot")
    p.add_argument("--perf", required=True, help="latency JSON (not a DVC metric: wall time varies)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    name = args.strategy

    import tempfile

    import numpy as np
    import pandas as pd
    import torch

    from transferlab.core import layout
    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.io import dir_size_bytes, path_sha256, write_json, write_text
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.metrics import classification_metrics, latency_ms_per_image
    from transferlab.models.inference import predict_images, to_input
    from transferlab.models.sources import load_source
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import confusion_png
    from transferlab.strategies import get_strategy, strategy_config

    cfg = strategy_config(name, params.strategies.get(name))
    strategy = get_strategy(cfg.kind)
    seed_dirs = layout.seed_dirs(args.model)
    meta = strategy.read_meta(next(iter(seed_dirs.values())))
    source_name = meta["source"]
    read = {
        "seed": params.seed,
        "evaluate": params.evaluate.model_dump(),
        f"sources.{source_name}": params.sources[source_name].model_dump(),
        "train.device": params.train.device,
    }
    seed_everything(params.seed, params.train.num_threads)
    device = resolve_device(params.train.device)
    data = load_prepared(args.prepared)
    images, y_true = data.images["test"], data.labels["test"]
    tags = {"source": source_name, **device_tags(device)}
    with stage_run(params.tracking, f"evaluate@{name}", read, strategy=name, tags=tags):
        import mlflow

        frames, probas, per_seed, first_model = [], [], {}, None
        for seed, model_dir in seed_dirs.items():
            model = strategy.load(
                model_dir,
                lambda: load_source(
                    source_name, params.sources[source_name], seed=params.seed, pipeline_dir=args.pretrained_dir
                ),
            )
            first_model = first_model or model
            logits = predict_images(model, images, meta["mean"], meta["std"], device=device)
            proba = torch.softmax(logits, 1).numpy()
            proba = proba.astype(np.float64)
            probas.append(proba)
            m = classification_metrics(y_true, proba, data.class_names)
            per_seed[str(seed)] = {k: m[k] for k in ("test_accuracy", "balanced_accuracy", "macro_f1", "nll")}
            frames.append(predictions_frame(data.ids["test"], seed, y_true, proba, data.class_names))
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
        size_bytes = (
            dir_size_bytes(first_dir / "adapter")
            if (first_dir / "adapter").is_dir()
            else dir_size_bytes(first_dir / "model.pt")
        )
        metrics["artifact_size_mb"] = round(size_bytes / 2**20, 3)
        metrics["params_millions"] = round(sum(p.numel() for p in first_model.parameters()) / 1e6, 4)
        write_json(args.metrics, metrics)
        write_text(args.predictions, pd.concat(frames).to_csv(index=False, lineterminator="\n"))
        names = np.asarray(data.class_names)
        pooled_pred = np.concatenate([f["y_pred"].to_numpy() for f in frames])
        write_text(
            args.confusion,
            pd.DataFrame({"actual": names[pooled_y], "predicted": names[pooled_pred]}).to_csv(
                index=False, lineterminator="\n"
            ),
        )
        example = to_input(images[: params.evaluate.latency_images], meta["mean"], meta["std"])
        # A LoRA adapter is merged into the weights for deployment: time what would be deployed.
        deployed = first_model.merge_and_unload() if hasattr(first_model, "merge_and_unload") else first_model
        perf = {
            "latency_ms_per_image_batch1": round(
                latency_ms_per_image(deployed, example, params.evaluate.latency_images, 1), 3
            ),
            "latency_ms_per_image_batch32": round(
                latency_ms_per_image(deployed, example, params.evaluate.latency_images, 32), 3
            ),
            "threads": torch.get_num_threads(),
        }
        write_json(args.perf, {**perf, "latency_device": "cpu", "predict": device_info(device)})
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics({**flat, **perf})
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"confusion_{name}.png"
            confusion_png(np.asarray(confusion), data.class_names, f"{name}: test confusion (all seeds)", png)
            mlflow.log_artifact(str(png))
        mlflow.log_artifact(args.predictions)
        mlflow.set_tag("model_sha256", path_sha256(args.model))


if __name__ == "__main__":
    run_main(main)

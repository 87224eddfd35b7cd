"""Stage `evaluate@<strategy>`: test-set metrics of every training seed's model, per-sample predictions
(one row per seed and test sample, keyed by `sample_id`), the confusion plot and CPU latency
(`transferlab.evaluation.predictions.evaluate_model`, the computation `transferlab audit --reevaluate`
reruns).

Predictions run on `train.device` (the GPU when there is one); latency is always timed on the CPU (the
deployment this project reports), and the device used is recorded in `perf/`, not in the metrics. The
source a model was built from is read from its folder (model_meta.json), not from `sources`: this stage
declares no `sources` params.

The test split is touched here and nowhere upstream: every choice (rate, epoch, model) was made on
validation before this stage runs.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


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
    import torch

    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.io import path_sha256, write_json, write_text
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.predictions import deployed_latency_ms, evaluate_model, model_meta
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import confusion_png

    meta = model_meta(args.model)
    read = {
        "seed": params.seed,
        "evaluate": params.evaluate.model_dump(),
        "train.device": params.train.device,
        "train.num_threads": params.train.num_threads,
        "resolved": {"source": meta["source"], "source_spec": meta["source_spec"]},
    }
    seed_everything(params.seed, params.train.num_threads)
    device = resolve_device(params.train.device)
    data = load_prepared(args.prepared)
    tags = {"source": meta["source"], **device_tags(device)}
    with stage_run(params.tracking, f"evaluate@{name}", read, strategy=name, tags=tags):
        import mlflow

        ev = evaluate_model(args.model, data, seed=params.seed, pretrained_dir=args.pretrained_dir, device=device)
        write_json(args.metrics, ev.metrics)
        write_text(args.predictions, ev.predictions.to_csv(index=False, lineterminator="\n"))
        write_text(args.confusion, ev.confusion_rows.to_csv(index=False, lineterminator="\n"))
        perf = {
            **deployed_latency_ms(ev, data.images["test"], params.evaluate.latency_images),
            "threads": torch.get_num_threads(),
        }
        write_json(args.perf, {**perf, "latency_device": "cpu", "predict": device_info(device)})
        flat = {k: v for k, v in ev.metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics({**flat, **perf})
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"confusion_{name}.png"
            confusion_png(np.asarray(ev.confusion), data.class_names, f"{name}: test confusion (all seeds)", png)
            mlflow.log_artifact(str(png))
        mlflow.log_artifact(args.predictions)
        mlflow.set_tag("model_sha256", path_sha256(args.model))


if __name__ == "__main__":
    run_main(main)

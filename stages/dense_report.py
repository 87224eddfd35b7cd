"""Stage `dense-report` (detection/pipeline.yaml, opt-in): every dense strategy against the baseline (scratch).

Gains of test mAP@[.5:.95] (detection) or mean IoU (segmentation) with intervals over test images and seeds, the
recommendation (chosen on validation), the negative-transfer check (`evaluation.dense_metrics.dense_summary`);
writes `--summary` (JSON), `--report` (Markdown) and `--figure` (PNG: predictions vs ground truth).
"""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--train-metrics", required=True, help="folder of dense-train@ records (<strategy>.json)")
    p.add_argument("--eval-metrics", required=True, help="folder of dense-evaluate@ metrics (<strategy>.json)")
    p.add_argument("--predictions", required=True, help="folder of dense-evaluate@ predictions (<strategy>/)")
    p.add_argument("--summary", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--figure", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.dense
    names = sorted(dp.strategies)

    import os
    from pathlib import Path

    import numpy as np

    from transferlab.core.io import read_json, write_json, write_text
    from transferlab.data.dense import load_dense
    from transferlab.evaluation import dense_metrics as dm
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.dense_md import dense_markdown, predictions_png

    splits, classes = load_dense(args.prepared, ("test",))
    test = splits["test"]
    train = {s: read_json(Path(args.train_metrics) / f"{s}.json") for s in names}
    evals = {s: read_json(Path(args.eval_metrics) / f"{s}.json") for s in names}
    records, shown = {}, {}
    k = min(dp.figure_images, len(test))
    for s in names:
        folder = Path(args.predictions) / s
        if dp.task == "detection":
            per_seed = read_json(folder / "boxes.json")["per_seed"]
            preds = {
                seed: [
                    {
                        "boxes": np.asarray(r["boxes"]).reshape(-1, 4),
                        "scores": np.asarray(r["scores"]),
                        "labels": np.asarray(r["labels"], np.int64),
                    }
                    for r in rows
                ]
                for seed, rows in per_seed.items()
            }
            records[s] = [dm.match_detections(preds[seed], test.objects, len(classes)) for seed in evals[s]["per_seed"]]
            shown[s] = preds[next(iter(preds))][:k]
        else:
            records[s] = list(np.load(folder / "confusion.npy"))
            shown[s] = list(np.load(folder / "figure_masks.npy")[0][:k])
    read = {
        "seed": params.seed,
        **{f"dense.{k}": getattr(dp, k) for k in ("task", "baseline", "n_bootstrap", "confidence", "figure_images")},
        "dense.strategies": dict(dp.strategies),
    }
    with stage_run(params.tracking, "dense-report", read, tags={"task": dp.task}):
        import mlflow

        summary = dm.dense_summary(
            dp.task,
            classes,
            train,
            evals,
            records,
            baseline=dp.baseline,
            n_bootstrap=dp.n_bootstrap,
            confidence=dp.confidence,
            seed=params.seed,
        )
        truth = test.objects[:k] if dp.task == "detection" else list(test.masks[:k])
        predictions_png(test.images[:k], truth, shown, dp.task, classes, args.figure)
        figure = os.path.relpath(args.figure, Path(args.report).parent)
        write_text(args.report, dense_markdown(summary, figure, dp.baseline))
        write_json(args.summary, summary)
        metric = summary["metric"]
        mlflow.log_metrics({f"{s}.test_{metric}": r[f"test_{metric}"] for s, r in summary["strategies"].items()})


if __name__ == "__main__":
    run_main(main)

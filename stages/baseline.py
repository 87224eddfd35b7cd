"""Stage `baseline`: logistic regression on raw pixels, evaluated like every strategy."""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main
from stages.evaluate import predictions_frame
from transferlab.baselines import raw_pixel_logreg
from transferlab.data import load_prepared
from transferlab.evaluation import classification_metrics
from transferlab.io import write_json, write_text
from transferlab.tracking import stage_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    read = {"seed": params.seed, "baseline": params.baseline.model_dump()}
    data = load_prepared(args.prepared)
    with stage_run(params.tracking, "baseline", read, strategy="raw_pixel_logreg"):
        import mlflow

        proba = raw_pixel_logreg(
            data.images["train"],
            data.labels["train"],
            data.images["test"],
            C=params.baseline.C,
            max_iter=params.baseline.max_iter,
            seed=params.seed,
        )
        metrics = classification_metrics(data.labels["test"], proba, data.class_names)
        metrics.pop("confusion")
        write_json(args.metrics, metrics)
        write_text(
            args.predictions,
            predictions_frame(data.labels["test"], proba, data.class_names).to_csv(
                index_label="index", lineterminator="\n"
            ),
        )
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})


if __name__ == "__main__":
    run_main(main)

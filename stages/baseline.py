"""Stage `baseline`: the classical bar, evaluated like every strategy: logistic regression on raw pixels
(images) or on TF-IDF (texts), C chosen on validation. `baseline.model` names it (and its output files)."""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)

    from stages.evaluate import predictions_frame
    from transferlab.core.io import write_json, write_text
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.baselines import raw_pixel_logreg, tfidf_logreg
    from transferlab.evaluation.metrics import classification_metrics
    from transferlab.provenance.tracking import stage_run

    read = {"seed": params.seed, "baseline": params.baseline.model_dump()}
    data = load_prepared(args.prepared)
    name = params.baseline.model
    with stage_run(params.tracking, "baseline", read, strategy=name):
        import mlflow

        fit = tfidf_logreg if name == "tfidf_logreg" else raw_pixel_logreg
        _, proba, search = fit(
            data.texts if name == "tfidf_logreg" else data.images,
            data.labels,
            C_grid=list(params.baseline.C_grid),
            max_iter=params.baseline.max_iter,
            seed=params.seed,
        )
        metrics = classification_metrics(data.labels["test"], proba, data.class_names)
        metrics.pop("confusion")
        # The same fields as a strategy's train metrics, so that the recommendation (on validation) and
        # the comparison treat it as one more row.
        metrics.update(
            {
                "best_val_accuracy_mean": search["val_accuracy"],
                "val_samples": len(data.labels["val"]),
                "C": search["C"],
                "C_search": search["grid"],
            }
        )
        write_json(args.metrics, metrics)
        frame = predictions_frame(data.ids["test"], 0, data.labels["test"], proba, data.class_names)
        write_text(args.predictions, frame.to_csv(index=False, lineterminator="\n"))
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})


if __name__ == "__main__":
    run_main(main)

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

    from transferlab.core.io import write_json, write_text
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.baselines import evaluate_baseline
    from transferlab.provenance.tracking import stage_run

    bp = params.baseline
    read = {"seed": params.seed, "baseline": bp.model_dump()}
    data = load_prepared(args.prepared)
    with stage_run(params.tracking, "baseline", read, strategy=bp.model):
        import mlflow

        metrics, frame = evaluate_baseline(
            bp.model, data, C_grid=list(bp.C_grid), max_iter=bp.max_iter, seed=params.seed
        )
        write_json(args.metrics, metrics)
        write_text(args.predictions, frame.to_csv(index=False, lineterminator="\n"))
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})


if __name__ == "__main__":
    run_main(main)

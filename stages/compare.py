"""Stage `compare`: every strategy and the classical baseline (raw pixels or TF-IDF) against scratch and against
the best model without transfer (scratch or the classical baseline, whichever validates better), with intervals
over test samples and training seeds, verdicts only for converged runs, the equal-compute comparison against
scratch and the recommendation (chosen on validation): `transferlab.evaluation.comparison.compare_run`.

Writes `metrics/summary.json` (what `dvc metrics diff` shows a reviewer), `plots/gain.csv`,
`plots/compute.csv` (validation accuracy against training compute, per strategy and seed) and
`plots/compute.png`.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--eval-metrics", required=True, help="folder of metrics/eval/<name>.json")
    p.add_argument("--train-metrics", required=True, help="folder of metrics/train/<name>.json")
    p.add_argument("--history", required=True, help="folder of plots/history/<name>/seed_<s>.csv")
    p.add_argument("--predictions", required=True, help="folder of predictions/<name>.csv")
    p.add_argument("--summary", required=True)
    p.add_argument("--plot", required=True, help="gain CSV for dvc plots")
    p.add_argument("--compute-plot", required=True, help="accuracy-against-compute CSV")
    p.add_argument("--compute-figure", required=True, help="accuracy-against-compute PNG")
    args = p.parse_args()
    params = params_or_exit(args.params)

    import tempfile

    import pandas as pd

    from transferlab.core.io import write_json, write_text
    from transferlab.evaluation.comparison import BEST_NON_TRANSFER, GAIN_VS_BEST, compare_run, read_run_results
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import compute_png, gain_png, headline_rows

    read = {
        "seed": params.seed,
        "compare": params.compare.model_dump(),
        "strategies": sorted(params.strategies),
    }
    try:
        results = read_run_results(
            sorted(params.strategies),
            params.baseline.model,
            predictions_dir=args.predictions,
            eval_metrics_dir=args.eval_metrics,
            train_metrics_dir=args.train_metrics,
            history_dir=args.history,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    cp = params.compare
    with stage_run(params.tracking, "compare", read):
        import mlflow

        result = compare_run(results, train=params.train, compare=cp, baseline=params.baseline, seed=params.seed)
        write_json(args.summary, result.summary)
        write_text(args.plot, pd.DataFrame(result.gain_rows).to_csv(index=False, lineterminator="\n"))
        write_text(args.compute_plot, pd.DataFrame(result.compute_curves).to_csv(index=False, lineterminator="\n"))
        compute_png(result.compute_curves, Path(args.compute_figure))
        key = f"gain_vs_{cp.baseline}"
        for n, r in result.summary["strategies"].items():
            mlflow.log_metric(f"{n}.test_accuracy", r["test_accuracy"])
            if key in r:
                mlflow.log_metric(f"{n}.gain_accuracy", r[key]["accuracy"]["gain"])
            if GAIN_VS_BEST in r:
                mlflow.log_metric(f"{n}.{GAIN_VS_BEST}_accuracy", r[GAIN_VS_BEST]["accuracy"]["gain"])
        best = result.summary[BEST_NON_TRANSFER]
        reference = best["name"]
        with tempfile.TemporaryDirectory() as tmp:
            pct = round(cp.confidence * 100)
            title = f"test accuracy gain over {reference} (best without transfer; {pct}% CI over seeds and samples)"
            rows = headline_rows(result.gain_rows, set(best["candidates"]))
            mlflow.log_artifact(str(gain_png(rows, title, Path(tmp) / "gain.png", reference=reference)))
        mlflow.log_artifact(args.summary)
        mlflow.log_artifact(args.compute_figure)


if __name__ == "__main__":
    run_main(main)

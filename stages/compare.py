"""Stage `compare`: every strategy and the classical baseline (raw pixels or TF-IDF) against scratch, with
intervals over test samples
and training seeds, verdicts only for converged runs, the equal-compute comparison and the recommendation
(chosen on validation).

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

    from transferlab.core import layout
    from transferlab.core.io import read_json, write_json, write_text
    from transferlab.evaluation.comparison import compare_to_baseline
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import compute_png, gain_png

    read = {
        "seed": params.seed,
        "compare": params.compare.model_dump(),
        "strategies": sorted(params.strategies),
    }
    CLASSICAL = params.baseline.model  # noqa: N806 - the classical row: raw pixels or TF-IDF
    names = sorted(params.strategies) + [CLASSICAL]
    missing = [n for n in names if not (Path(args.predictions) / f"{n}.csv").is_file()]
    if missing:
        raise SystemExit(f"no predictions for {missing} in {args.predictions}: run `dvc repro` (evaluate stages)")
    try:
        frames = {n: layout.read_predictions(Path(args.predictions) / f"{n}.csv") for n in names}
        _, y_true, preds = layout.aligned_predictions(frames)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    metrics = {n: read_json(Path(args.eval_metrics) / f"{n}.json") for n in names}
    train = {n: read_json(Path(args.train_metrics) / f"{n}.json") for n in sorted(params.strategies)}
    train[CLASSICAL] = None
    # name -> seed -> history rows, read once for the equal-compute comparison and the compute plot.
    by_seed = {
        n: {seed: h.to_dict("records") for seed, h in layout.read_histories(Path(args.history) / n).items()}
        for n in sorted(params.strategies)
    }
    histories = {n: list(runs.values()) for n, runs in by_seed.items()}
    cp = params.compare
    with stage_run(params.tracking, "compare", read):
        import mlflow

        summary = compare_to_baseline(
            y_true,
            preds,
            metrics,
            train,
            histories,
            cp.baseline,
            classical=CLASSICAL,
            n_val=int(metrics[CLASSICAL].get("val_samples") or 0) or None,
            n_bootstrap=cp.n_bootstrap,
            confidence=cp.confidence,
            seed=params.seed,
        )
        summary["protocol"] = protocol_text(params)
        write_json(args.summary, summary)
        key = f"gain_vs_{cp.baseline}"
        rows = [
            {"name": n, **{k: r[key]["accuracy"][k] for k in ("gain", "ci_low", "ci_high")}, "verdict": r["verdict"]}
            for n, r in summary["strategies"].items()
            if key in r
        ]
        write_text(args.plot, pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
        curves = [
            {
                "name": n,
                "seed": seed,
                "epoch": r["epoch"],
                "train_gflops": r["train_gflops"],
                "val_accuracy": r["val_accuracy"],
            }
            for n, runs in by_seed.items()
            for seed, rows_ in runs.items()
            for r in rows_
        ]
        write_text(args.compute_plot, pd.DataFrame(curves).to_csv(index=False, lineterminator="\n"))
        compute_png(curves, Path(args.compute_figure))
        for n, r in summary["strategies"].items():
            mlflow.log_metric(f"{n}.test_accuracy", r["test_accuracy"])
            if key in r:
                mlflow.log_metric(f"{n}.gain_accuracy", r[key]["accuracy"]["gain"])
        pct = round(cp.confidence * 100)
        with tempfile.TemporaryDirectory() as tmp:
            title = f"test accuracy gain over {cp.baseline} ({pct}% CI over seeds and samples)"
            mlflow.log_artifact(str(gain_png(rows, title, Path(tmp) / "gain.png")))
        mlflow.log_artifact(args.summary)
        mlflow.log_artifact(args.compute_figure)


def protocol_text(params) -> str:
    """The protocol behind every number of the summary, in one paragraph (the report prints it)."""
    from transferlab.evaluation.comparison import describe

    tp, cp = params.train, params.compare
    return (
        f"Every model: learning rate chosen on the validation split from {list(tp.lr_grid)} x its configured "
        f"rate ({tp.lr_search_epochs} epochs per rate, first seed, one more step beyond an edge of the grid when the "
        f"best rate sits on it, up to {tp.lr_grid_extend}; the same grid and rule for every strategy, "
        f"scratch included); then trained once per seed {list(tp.seeds)} with warm-up and reduce-on-plateau "
        f"until neither validation loss nor accuracy improved for {tp.patience} epochs (cap {tp.epochs}; a run "
        "that hits the cap is under-trained and gets no verdict); the best validation epoch kept. The classical "
        f"baseline ({describe(params.baseline.model)})'s C is chosen on validation from "
        f"{list(params.baseline.C_grid)}. The recommendation is the "
        "best model on validation, the baseline included. The test split is used only to report. Intervals: "
        f"{round(cp.confidence * 100)}% percentile bootstrap ({cp.n_bootstrap} replicates) over test samples "
        "(paired) and training seeds (resampled per model)."
    )


if __name__ == "__main__":
    run_main(main)

"""Stage `curve` (curve/pipeline.yaml, opt-in): the learning curves of the label-budget sweep and what they answer.

Reads every `curve-point@<budget>` (and, for the default budget, the root pipeline's predictions/ and
metrics/train/), fits a saturating power law per strategy with a goodness-of-fit check, and answers with
intervals (`transferlab.evaluation.curve.analyse_curve`): the gain vs scratch and vs the classical baseline at
every budget, the effective data transferred, the crossovers, the labels needed for the target accuracy. Writes
metrics/curve.json, the dvc plots CSV, the figure and reports/curve.md.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--points", required=True, help="folder of the curve-point@ JSONs (<budget>.json)")
    p.add_argument("--predictions", required=True, help="folder of the curve-point@ predictions (<budget>/)")
    p.add_argument("--root-predictions", required=True, help="the root pipeline's predictions/ (default budget)")
    p.add_argument("--root-train", required=True, help="the root pipeline's metrics/train/ (default budget)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="CSV for dvc plots")
    p.add_argument("--figure", required=True, help="PNG")
    p.add_argument("--report", required=True, help="markdown section")
    args = p.parse_args()
    params = params_or_exit(args.params)
    cp = params.curve
    names = cp.resolved_strategies(params.strategies)
    classical = params.baseline.model

    import pandas as pd

    from transferlab.core import layout
    from transferlab.core.io import read_json, write_json, write_text
    from transferlab.evaluation.curve import CurveInputs, analyse_curve
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.curve_md import curve_csv_rows, curve_markdown, curve_png
    from transferlab.strategies import strategy_config

    scratch = next((n for n in names if strategy_config(n, params.strategies[n]).kind == "scratch"), None)
    budgets = list(cp.labels_per_class)
    predictions: dict[str, dict] = {m: {} for m in [*names, classical]}
    seeds: dict[str, dict] = {m: {} for m in predictions}
    notes: dict[str, dict] = {m: {} for m in predictions}
    y_true = None
    for b in budgets:
        point = read_json(Path(args.points) / f"{b}.json")
        reused = point.get("reused") is not None
        for m in predictions:
            folder = Path(args.root_predictions) if reused else Path(args.predictions) / str(b)
            df = layout.read_predictions(folder / f"{m}.csv")
            by_seed = layout.predictions_by_seed(df)
            first = next(iter(by_seed.values()))
            if y_true is None:
                y_true, ids = first["y_true"].to_numpy(), first["sample_id"].to_numpy()
            elif not (first["sample_id"].to_numpy() == ids).all():
                raise ValueError(f"{folder / f'{m}.csv'}: other test samples than the first point's (stale outputs?)")
            predictions[m][b] = pd.concat([g["y_pred"] for g in by_seed.values()], axis=1).to_numpy().T
            seeds[m][b] = list(by_seed)
            if m == classical:
                notes[m][b] = {"reused_root_pipeline": reused}
            elif reused:
                t = read_json(Path(args.root_train) / f"{m}.json")
                notes[m][b] = {"lr": t["lr"], "converged": t["converged"], "training_failed": t["training_failed"]}
                notes[m][b]["reused_root_pipeline"] = True
            else:
                rec = point["strategies"][m]
                notes[m][b] = {
                    "lr": rec["lr"],
                    "converged": rec["converged"],
                    "training_failed": rec["training_failed"],
                }
            if not reused and point.get("capped"):
                notes[m][b]["capped_classes"] = point["capped"]
    read = {
        "seed": params.seed,
        "curve": cp.model_dump(),
        "baseline.model": classical,
        "compare.confidence": params.compare.confidence,
        **{f"strategies.{n}": params.strategies[n] for n in names},
    }
    with stage_run(params.tracking, "curve", read):
        import mlflow

        result = analyse_curve(
            CurveInputs(y_true=y_true, predictions=predictions, seeds=seeds, notes=notes),
            budgets=budgets,
            strategies=names,
            scratch=scratch,
            classical=classical,
            extrapolation_factor=cp.extrapolation_factor,
            n_bootstrap=cp.n_bootstrap,
            min_points=cp.min_points_for_fit,
            target_accuracy=cp.target_accuracy,
            target_margin=cp.target_margin,
            confidence=params.compare.confidence,
            seed=params.seed,
        )
        write_json(args.metrics, result)
        write_text(args.plot, pd.DataFrame(curve_csv_rows(result)).to_csv(index=False, lineterminator="\n"))
        curve_png(result, args.figure)
        write_text(args.report, curve_markdown(result))
        mlflow.log_artifact(args.figure)
        mlflow.log_artifact(args.report)


if __name__ == "__main__":
    run_main(main)

"""Stage `compare`: every strategy and the raw-pixel baseline against scratch, with paired bootstrap CIs.

Writes `metrics/summary.json` (what `dvc metrics diff` shows a reviewer), `plots/gain.csv` and a PNG.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from stages._common import params_or_exit, parser, run_main
from transferlab.comparison import compare_to_baseline
from transferlab.io import read_json, write_json, write_text
from transferlab.plotting import gain_png
from transferlab.tracking import stage_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--eval-metrics", required=True, help="folder of metrics/eval/<name>.json")
    p.add_argument("--predictions", required=True, help="folder of predictions/<name>.csv")
    p.add_argument("--summary", required=True)
    p.add_argument("--plot", required=True, help="gain CSV for dvc plots")
    args = p.parse_args()
    params = params_or_exit(args.params)
    read = {"seed": params.seed, "compare": params.compare.model_dump(), "strategies": sorted(params.strategies)}
    names = sorted(params.strategies) + ["raw_pixel_logreg"]
    missing = [n for n in names if not (Path(args.predictions) / f"{n}.csv").is_file()]
    if missing:
        raise SystemExit(f"no predictions for {missing} in {args.predictions}: run `dvc repro` (evaluate stages)")
    frames = {n: pd.read_csv(Path(args.predictions) / f"{n}.csv") for n in names}
    y_true = frames[names[0]]["y_true"].to_numpy()
    for n, df in frames.items():
        if not np.array_equal(df["y_true"].to_numpy(), y_true):
            raise SystemExit(f"predictions/{n}.csv was made on other test data: re-run its evaluate stage")
    preds = {n: df["y_pred"].to_numpy() for n, df in frames.items()}
    metrics = {n: read_json(Path(args.eval_metrics) / f"{n}.json") for n in names}
    cp = params.compare
    with stage_run(params.tracking, "compare", read):
        import mlflow

        summary = compare_to_baseline(
            y_true, preds, metrics, cp.baseline, n_bootstrap=cp.n_bootstrap, confidence=cp.confidence, seed=params.seed
        )
        write_json(args.summary, summary)
        key = f"gain_vs_{cp.baseline}"
        rows = [{"name": n, **r[key]["accuracy"]} for n, r in summary["strategies"].items() if key in r]
        write_text(
            args.plot,
            pd.DataFrame(rows)[["name", "gain", "ci_low", "ci_high"]].to_csv(index=False, lineterminator="\n"),
        )
        for n, r in summary["strategies"].items():
            mlflow.log_metric(f"{n}.test_accuracy", r["test_accuracy"])
            if key in r:
                mlflow.log_metric(f"{n}.gain_accuracy", r[key]["accuracy"]["gain"])
        with tempfile.TemporaryDirectory() as tmp:
            png = gain_png(rows, f"gain over {cp.baseline}", Path(tmp) / "gain.png")
            mlflow.log_artifact(str(png))
        mlflow.log_artifact(args.summary)


if __name__ == "__main__":
    run_main(main)

"""Stage `report`: reports/report.md and reports/report.html, the page a person reads."""

from __future__ import annotations

import json
from pathlib import Path

from stages._common import log, params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--summary", required=True)
    p.add_argument("--score", required=True)
    p.add_argument("--agreement", required=True)
    p.add_argument("--diagnosis", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--gain", required=True, help="plots/gain.csv")
    p.add_argument("--figures", nargs="*", default=[], help="PNGs to include")
    p.add_argument("--perf", required=True, help="folder of perf/train/<strategy>.json")
    p.add_argument("--history", required=True, help="folder of plots/history/<strategy>/seed_<s>.csv")
    p.add_argument("--confusion", required=True, help="folder of plots/confusion/<strategy>.csv")
    p.add_argument("--markdown", required=True)
    p.add_argument("--html", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)

    import tempfile

    import numpy as np
    import pandas as pd

    from transferlab.core import layout
    from transferlab.core.io import read_json, write_text
    from transferlab.provenance.tracking import git_info, register_champion, stage_run
    from transferlab.reporting.plots import confusion_png, curves_png, gain_png
    from transferlab.reporting.report import build_sections, to_html, to_markdown

    timings = {
        f.stem: json.loads(f.read_text()).get("train_seconds_total", 0.0)
        for f in sorted(Path(args.perf).glob("*.json"))
    }
    summary = read_json(args.summary)
    data = read_json(args.data)
    sections = build_sections(
        summary,
        read_json(args.score),
        read_json(args.agreement),
        read_json(args.diagnosis),
        data,
        timings,
    )
    with stage_run(params.tracking, "report", {}):
        import mlflow

        write_text(args.markdown, to_markdown(sections))
        with tempfile.TemporaryDirectory() as tmp:
            rows = pd.read_csv(args.gain).to_dict("records")
            pct = round(100 * summary["confidence"])
            title = f"Test accuracy gain over {summary['baseline']} ({pct}% CI over test samples and seeds)"
            gain = gain_png(rows, title, Path(tmp) / "gain_over_scratch.png")
            figures = [gain, *map(Path, args.figures)]
            curves = {
                n: {s: h.to_dict("records") for s, h in layout.read_histories(d).items()}
                for n, d in ((d.name, d) for d in sorted(Path(args.history).iterdir()) if d.is_dir())
            }
            if curves:
                figures.append(curves_png(curves, Path(tmp) / "learning_curves.png"))
            choice = (summary.get("recommendation") or {}).get("choice")
            names = list(data["per_class"])
            index = {c: i for i, c in enumerate(names)}
            for role, model in (("recommended", choice), ("scratch", summary["baseline"])):
                conf_csv = Path(args.confusion) / f"{model}.csv"
                if not model or not conf_csv.is_file() or (role == "scratch" and model == choice):
                    continue
                conf = pd.read_csv(conf_csv)
                matrix = np.zeros((len(names), len(names)), dtype=int)
                np.add.at(matrix, (conf["actual"].map(index), conf["predicted"].map(index)), 1)
                png = Path(tmp) / f"confusion_{role}.png"
                figures.append(confusion_png(matrix, names, f"{model}: test confusion (all seeds)", png))
            write_text(args.html, to_html(sections, figures))
        mlflow.log_artifact(args.markdown)
        mlflow.log_artifact(args.html)
    # The Model Registry's `champion` alias follows the recommendation (a side effect, like the MLflow runs).
    choice = (summary.get("recommendation") or {}).get("choice")
    if choice in params.strategies:
        row = summary["strategies"][choice]
        tags = {
            "commit": git_info().get("git_commit", ""),
            "test_accuracy": str(row["test_accuracy"]),
            "val_accuracy": str(row["val_accuracy"]),
            "macro_f1": str(row["macro_f1"]),
        }
        reg = register_champion(params.tracking, choice, tags)
        if reg:
            log.info("model registry: %s version %s is now '%s'", reg["name"], reg["version"], "champion")
    elif choice:
        log.info(
            "model registry: the recommendation (%s) is not a trained model; the champion alias is unchanged", choice
        )


if __name__ == "__main__":
    run_main(main)

"""Stage `report`: reports/report.md and reports/report.html, the page a person reads, answer first: the
recommendation, the headline figure (gain over the best model without transfer) and the table
(`transferlab.reporting.report`, figures from `transferlab.reporting.figures`); the Model Registry's `champion`
alias follows the recommendation."""

from __future__ import annotations

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

    import pandas as pd

    from transferlab.core.io import read_json, write_text
    from transferlab.provenance.tracking import git_info, register_champion, stage_run
    from transferlab.reporting.figures import report_figures
    from transferlab.reporting.report import build_sections, read_train_seconds, to_html, to_markdown

    summary, data = read_json(args.summary), read_json(args.data)
    sections = build_sections(
        summary,
        read_json(args.score),
        read_json(args.agreement),
        read_json(args.diagnosis),
        data,
        read_train_seconds(args.perf),
    )
    with stage_run(params.tracking, "report", {}):
        import mlflow

        write_text(args.markdown, to_markdown(sections))
        with tempfile.TemporaryDirectory() as tmp:
            gain_rows = pd.read_csv(args.gain).to_dict("records")
            headline, figures = report_figures(
                summary,
                list(data["per_class"]),
                gain_rows,
                figures=args.figures,
                history_dir=args.history,
                confusion_dir=args.confusion,
                out_dir=Path(tmp),
            )
            write_text(args.html, to_html(sections, figures, headline=headline))
        mlflow.log_artifact(args.markdown)
        mlflow.log_artifact(args.html)
    # The Model Registry's `champion` alias follows the recommendation (a side effect, like the MLflow runs);
    # the classical baseline is no trained model to register.
    rec = summary.get("recommendation") or {}
    choice = rec.get("choice")
    if choice and not rec.get("classical_baseline_wins"):
        row = summary["strategies"][choice]
        tags = {"commit": git_info().get("git_commit", "")}
        tags |= {k: str(row[k]) for k in ("test_accuracy", "val_accuracy", "macro_f1")}
        reg = register_champion(params.tracking, choice, tags)
        if reg:
            log.info("model registry: %s version %s is now '%s'", reg["name"], reg["version"], "champion")
    elif choice:
        log.info(
            "model registry: the recommendation (%s) is not a trained model; the champion alias is unchanged", choice
        )


if __name__ == "__main__":
    run_main(main)

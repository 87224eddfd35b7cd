"""Stage `report`: reports/report.md and reports/report.html, the page a person reads."""

from __future__ import annotations

import json
from pathlib import Path

from stages._common import params_or_exit, parser, run_main


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
    p.add_argument("--markdown", required=True)
    p.add_argument("--html", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)

    import tempfile

    import pandas as pd

    from transferlab.io import read_json, write_text
    from transferlab.plotting import gain_png
    from transferlab.report import build_sections, to_html, to_markdown
    from transferlab.tracking import stage_run

    timings = {
        f.stem: json.loads(f.read_text()).get("train_seconds_total", 0.0)
        for f in sorted(Path(args.perf).glob("*.json"))
    }
    summary = read_json(args.summary)
    sections = build_sections(
        summary,
        read_json(args.score),
        read_json(args.agreement),
        read_json(args.diagnosis),
        read_json(args.data),
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
            write_text(args.html, to_html(sections, [gain, *map(Path, args.figures)]))
        mlflow.log_artifact(args.markdown)
        mlflow.log_artifact(args.html)


if __name__ == "__main__":
    run_main(main)

"""Stage `diagnose`: what went wrong in the transfer, measured on every training seed, each finding graded with
an interval (ok / undetermined / flagged) and a remedy; the remedies of flagged findings re-measure the flagged
quantity under the pipeline's protocol and are re-graded (comparisons of existing models are evidence).
Negative transfer is read from compare's summary, so the report and the diagnosis agree; random-init sources
are controls, listed apart.

A thin loop over the check registry (`transferlab.diagnosis.checks`): failed training, negative transfer,
catastrophic forgetting (by proxy, and exact on the in-pipeline source), domain shift, resolution,
learning-rate sensitivity, over-fitting. Writes `metrics/diagnosis.json` and `reports/diagnosis.md`, and
the checks' wall-clock measurements (a remedy model's CPU latency) to `--perf`.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--models", required=True, help="folder of models/<strategy>/seed_<s>/")
    p.add_argument("--predictions", required=True, help="folder of predictions/<name>.csv and agreement.csv")
    p.add_argument("--history", required=True, help="folder of plots/history/<strategy>/seed_<s>.csv")
    p.add_argument("--train-metrics", default=None, help="folder of metrics/train/<strategy>.json")
    p.add_argument("--summary", default=None, help="compare's metrics/summary.json (the negative-transfer grades)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--perf", default=None, help="wall-clock measurements of the checks (a remedy model's latency)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.diagnose
    if dp.source_images is not None and not Path(dp.source_images).is_dir():
        raise SystemExit(f"diagnose.source_images: '{dp.source_images}' is not a folder (a folder of images, or null)")

    # Heavy imports only once the params are known to be good.
    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.io import write_json, write_text
    from transferlab.diagnosis.checks import run_checks
    from transferlab.diagnosis.findings import summarize
    from transferlab.diagnosis.inputs import load_context
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.diagnosis_md import to_markdown

    read = {
        "seed": params.seed,
        "diagnose": dp.model_dump(),
        "train": params.train.model_dump(),
        "strategies": params.strategies,
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
        "pretrain": params.pretrain,
        "compare": {
            "baseline": params.compare.baseline,
            "confidence": params.compare.confidence,
            "n_bootstrap": params.compare.n_bootstrap,
        },
        "data": {"dataset": params.data.dataset, "path": params.data.path},
        "evaluate": {"latency_images": params.evaluate.latency_images},
    }
    ctx = load_context(
        params,
        prepared=args.prepared,
        selection=args.selection,
        features_dir=args.features,
        pretrained_dir=args.pretrained_dir,
        models_dir=args.models,
        predictions_dir=args.predictions,
        history_dir=args.history,
        train_metrics_dir=args.train_metrics,
        summary=args.summary,
    )
    ctx.device = resolve_device(params.train.device)  # remedy training and forward passes run there
    with stage_run(params.tracking, "diagnose", read, tags=device_tags(ctx.device)):
        import mlflow

        findings, run_log = run_checks(ctx)
        summary = {**summarize(findings, ctx.controls), **run_log}
        write_json(args.metrics, {"summary": summary, "findings": findings, "controls": ctx.controls})
        write_text(args.report, to_markdown(findings, summary, ctx.controls))
        if args.perf:
            write_json(args.perf, {**ctx.timings, **device_info(ctx.device)})
        mlflow.log_metrics(
            {f"{k}.{s}": v[s] for k, v in summary["by_type"].items() for s in ("flagged", "undetermined")}
        )
        mlflow.log_artifact(args.report)


if __name__ == "__main__":
    run_main(main)

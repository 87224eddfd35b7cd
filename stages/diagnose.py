"""Stage `diagnose`: what went wrong in the transfer, measured, each finding with a severity and a remedy;
the remedies of flagged findings are run and verified before/after with confidence intervals.

A thin loop over the check registry (`transferlab.diagnosis.checks`): failed training, negative transfer,
catastrophic forgetting (by proxy, and exact on the in-pipeline source), domain shift, resolution,
learning-rate sensitivity, over-fitting. Writes `metrics/diagnosis.json` and `reports/diagnosis.md`.
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
    p.add_argument("--metrics", required=True)
    p.add_argument("--report", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.diagnose
    if dp.source_images is not None and not Path(dp.source_images).is_dir():
        raise SystemExit(f"diagnose.source_images: '{dp.source_images}' is not a folder (a folder of images, or null)")

    # Heavy imports only once the params are known to be good.
    from transferlab.core.device import device_tags, resolve_device
    from transferlab.core.io import write_json, write_text
    from transferlab.diagnosis import findings as dx
    from transferlab.diagnosis.checks import run_checks
    from transferlab.provenance.tracking import stage_run

    read = {
        "seed": params.seed,
        "diagnose": dp.model_dump(),
        "train": params.train.model_dump(),
        "strategies": params.strategies,
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
        "pretrain": params.pretrain,
        "compare": {"baseline": params.compare.baseline, "confidence": params.compare.confidence},
    }
    ctx = build_context(args, params)
    ctx.device = resolve_device(params.train.device)  # remedy training and forward passes run there
    with stage_run(params.tracking, "diagnose", read, tags=device_tags(ctx.device)):
        import mlflow

        findings, run_log = run_checks(ctx)
        summary = {**dx.summarize(findings), **run_log}
        write_json(args.metrics, {"summary": summary, "findings": findings})
        write_text(args.report, dx.to_markdown(findings, summary))
        mlflow.log_metrics({f"{k}.flagged": v["flagged"] for k, v in summary["by_type"].items()})
        mlflow.log_artifact(args.report)


def build_context(args, params):
    """Load the inputs the checks share: data, selection, test predictions aligned on sample ids."""
    import numpy as np
    import pandas as pd

    from transferlab.core import layout
    from transferlab.core.io import read_json
    from transferlab.data.splits import load_prepared
    from transferlab.diagnosis.checks import DiagnosisContext
    from transferlab.diagnosis.checks.domain_shift import load_image_folder
    from transferlab.params import SourceSpec

    data = load_prepared(args.prepared)
    sel = read_json(args.selection)
    pred_dir = Path(args.predictions)
    names = sorted(params.strategies) + [params.baseline.model]
    frames = {n: layout.read_predictions(pred_dir / f"{n}.csv") for n in names if (pred_dir / f"{n}.csv").is_file()}
    ids, y, by_seed = layout.aligned_predictions(frames)
    preds = {n: v[0] for n, v in by_seed.items()}  # the first training seed: the model the checks load
    candidates = {}
    agree_path = pred_dir / "agreement.csv"
    if agree_path.is_file():
        agree = pd.read_csv(agree_path)
        if "sample_id" in agree.columns:
            agree_ids = agree["sample_id"].to_numpy()
        else:  # written in the prepared test split's row order
            agree_ids = data.ids["test"][agree["index"].to_numpy()] if "index" in agree.columns else data.ids["test"]
        pos = {int(s): i for i, s in enumerate(agree_ids)}
        rows = np.array([pos[int(s)] for s in ids])
        candidates = {c: agree[c].to_numpy()[rows] for c in agree.columns if c.startswith("linear_probe:")}
    dp = params.diagnose
    ctx = DiagnosisContext(
        params=params,
        data=data,
        selected=sel["selected"],
        selected_spec=SourceSpec.model_validate(sel["spec"]),
        features_dir=Path(args.features),
        pretrained_dir=Path(args.pretrained_dir),
        models_dir=Path(args.models),
        history_dir=Path(args.history),
        train_metrics_dir=Path(args.train_metrics) if args.train_metrics else None,
        sample_ids=ids,
        y=y,
        preds=preds,
        candidates=candidates,
    )
    if dp.source_images is not None:
        ctx.source_images = load_image_folder(
            dp.source_images, data.images["train"].shape[1], dp.probe_images, params.seed
        )
    return ctx


if __name__ == "__main__":
    run_main(main)

"""Stage `deploy` (deploy/pipeline.yaml, opt-in): the deployment study of every trained model.

For each strategy of `deploy.strategies` (the root pipeline's models, every seed) and DANN (deploy-train): the shift
from held-out in-distribution images to the deployment images on the model's features (MMD, proxy A-distance,
BatchNorm statistics; a control that must not be flagged), the deployment accuracy predicted without labels (ATC,
average confidence, DoC), the same with AdaBN on deployment statistics, and DANN against finetune_full
(`transferlab.diagnosis.deployment`). Deployment labels, when deploy-prepare found any, are read after every
prediction is made and choose nothing: the recommendation is made on the label-free estimate. Writes
`metrics/deployment.json` and `reports/deployment.md`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def dann_domain_accuracy(histories: dict, per_seed: dict) -> dict:
    """The DANN domain classifier's training accuracy (labelled train images against unlabelled deployment
    images) at each seed's kept (best validation) epoch and at its last epoch: near 0.5 = the features fooled
    it while it trained. A training-time figure; the held-out alignment is the proxy A-distance of `shift`."""
    out = {}
    for seed, hist in sorted(histories.items()):
        if "domain_accuracy" not in hist or hist.empty:
            continue
        best = per_seed.get(str(seed), {}).get("best_epoch")
        row = hist[hist["epoch"] == best] if best is not None and "epoch" in hist else hist.iloc[[]]
        out[str(seed)] = {
            "best_epoch": None if row.empty else round(float(row["domain_accuracy"].iloc[0]), 4),
            "last_epoch": round(float(hist["domain_accuracy"].iloc[-1]), 4),
            "first_epoch": round(float(hist["domain_accuracy"].iloc[0]), 4),
        }
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--deployment", required=True, help="deploy-prepare's image folder")
    p.add_argument("--deployment-labels", required=True, help="deploy-prepare's label folder (may hold none)")
    p.add_argument("--models", required=True, help="folder of the root models (models/<strategy>/seed_<s>/)")
    p.add_argument("--dann", default=None, help="deploy-train's model folder (omit when deploy.dann is null)")
    p.add_argument("--train-metrics", required=True, help="metrics/train (convergence of each strategy)")
    p.add_argument("--dann-metrics", default=None, help="deploy-train's metrics JSON")
    p.add_argument("--dann-history", default=None, help="deploy-train's history folder (domain accuracy per epoch)")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--metrics", required=True)
    p.add_argument("--report", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.deploy
    names = dp.resolved_strategies(params.strategies)

    from transferlab.core import layout
    from transferlab.core.device import resolve_device
    from transferlab.core.io import read_json, write_json, write_text
    from transferlab.core.seeding import seed_everything
    from transferlab.data.deployment import load_deployment
    from transferlab.data.splits import load_prepared
    from transferlab.diagnosis import deployment as D
    from transferlab.evaluation.predictions import model_meta
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.deployment_md import deployment_markdown
    from transferlab.strategies import get_strategy

    seed_everything(params.seed, params.train.num_threads)
    device = resolve_device(params.train.device)
    data = load_prepared(args.prepared)
    dep = load_deployment(args.deployment)  # images first; the labels below, after every prediction
    halves = D.reference_halves(len(data.labels["test"]), params.seed)
    models = {n: Path(args.models) / n for n in names}
    train_records = {n: read_json(Path(args.train_metrics) / f"{n}.json") for n in names}
    if args.dann and dp.dann is not None:
        models["dann"] = Path(args.dann)
        train_records["dann"] = read_json(args.dann_metrics) if args.dann_metrics else {}
    read = {
        "seed": params.seed,
        "deploy": dp.model_dump(),
        "deploy.strategies": names,
        "compare.confidence": params.compare.confidence,
    }
    with stage_run(params.tracking, "deploy", read) as _run:
        import mlflow

        measures: dict[str, list] = {}
        for name, model_dir in models.items():
            meta = model_meta(model_dir)
            strategy = get_strategy(meta["kind"])
            spec = SourceSpec.model_validate(meta["source_spec"])
            measures[name] = []
            for train_seed, seed_dir in layout.seed_dirs(model_dir).items():
                source = partial(load_source, meta["source"], spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
                model = strategy.load(seed_dir, source)
                m = D.measure_model(
                    model,
                    tuple(meta["mean"]),
                    tuple(meta["std"]),
                    seed=params.seed,
                    val_images=data.images["val"],
                    val_labels=data.labels["val"],
                    test_images=data.images["test"],
                    deploy_images=dep.images,
                    halves=halves,
                    max_samples=dp.max_samples,
                    n_permutations=dp.mmd_permutations,
                    n_bootstrap=dp.n_bootstrap,
                    adabn=dp.adabn,
                    device=device,
                )
                m.seed = train_seed
                measures[name].append(m)
        # Every prediction is made: the labels (if any) may now be read, to check.
        labels = load_deployment(args.deployment, args.deployment_labels).labels
        conf = params.compare.confidence
        strategies = {
            name: D.summarize_strategy(
                name,
                ms,
                test_labels=data.labels["test"],
                deploy_labels=labels,
                groups=dep.groups,
                pad_threshold=dp.pad_threshold,
                alpha=dp.alpha,
                n_bootstrap=dp.n_bootstrap,
                seed=params.seed,
                confidence=conf,
                converged=train_records[name].get("converged"),
            )
            for name, ms in measures.items()
        }
        result = {
            "deployment": {k: v for k, v in dep.meta.items() if k != "class_names"},
            "labelled": labels is not None,
            "shift_rule": D.SHIFT_RULE,
            "recommend_rule": D.RECOMMEND_RULE,
            "strategies": strategies,
        }
        if "dann" in measures and "finetune_full" in measures:
            result["dann_vs_finetune_full"] = D.dann_versus(
                measures["dann"],
                measures["finetune_full"],
                labels,
                data.labels["test"],
                dp.n_bootstrap,
                params.seed,
                conf,
            )
            if args.dann_history:
                result["dann_domain_accuracy"] = dann_domain_accuracy(
                    layout.read_histories(args.dann_history), train_records["dann"].get("per_seed", {})
                )
        if labels is not None:
            cases = [
                (s["measured"]["predictor_errors"][v])
                for s in strategies.values()
                for v in s["measured"]["predictor_errors"]
            ]
            result["predictors"] = {
                "mae_mean": {
                    k: round(sum(c["mae"][k] for c in cases) / len(cases), 4)
                    for k in ("atc", "average_confidence", "doc")
                },
                "rule": "a predictor is useful only when its mean absolute error is below average confidence's",
            }
            result["predictors"]["atc_useful"] = (
                result["predictors"]["mae_mean"]["atc"] < result["predictors"]["mae_mean"]["average_confidence"]
            )
        result["recommendation"] = D.recommend(strategies)
        write_json(args.metrics, result)
        write_text(args.report, deployment_markdown(result, data.class_names))
        for name, s in strategies.items():
            mlflow.log_metric(f"{name}.atc", s["label_free"]["plain"]["atc"]["value"])
            if "measured" in s:
                mlflow.log_metric(f"{name}.deploy_accuracy", s["measured"]["deploy_accuracy"]["value"])
        mlflow.log_artifact(args.report)


if __name__ == "__main__":
    run_main(main)

"""Stage `deploy-train` (deploy/pipeline.yaml, opt-in): DANN (`strategies/dann.py`, Ganin et al. 2016) trained on
the labelled training split plus the UNLABELLED deployment images, under the pipeline's one protocol.

The rate is chosen on the labelled validation split and each seed's checkpoint by validation (`train_stage`, as for
every strategy): nothing is chosen on deployment data, whose labels this stage cannot read (deploy-prepare writes
them to another folder, which is not a dependency here). The source is the root pipeline's selection, so DANN is
the `finetune_full` recipe plus a domain classifier behind gradient reversal, and the deploy stage compares the two.
"""

from __future__ import annotations

import dataclasses

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--deployment", required=True, help="deploy-prepare's image folder (no labels)")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--selection", required=True, help="the score stage's data/selection.json")
    p.add_argument("--out", required=True, help="model folder (one seed_<s>/ per training seed)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--perf", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    tp = params.train
    if params.deploy.dann is None:  # no DANN asked for: empty outputs, and the deploy stage says "not run"
        from pathlib import Path

        from transferlab.core.io import write_json

        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.history).mkdir(parents=True, exist_ok=True)
        write_json(args.metrics, {"skipped": "deploy.dann is null"})
        write_json(args.perf, {"skipped": "deploy.dann is null"})
        return

    from transferlab.core.device import device_info, device_tags, resolve_device
    from transferlab.core.seeding import seed_everything
    from transferlab.data.deployment import load_deployment
    from transferlab.data.splits import load_prepared
    from transferlab.models.sources import load_source, read_selection
    from transferlab.provenance.tracking import stage_run
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.recipe import build_recipe
    from transferlab.training.run import train_stage

    cfg = strategy_config("dann", {"kind": "dann", **params.deploy.dann})
    strategy = get_strategy("dann")
    source_name, spec = read_selection(args.selection)
    seed_everything(params.seed, tp.num_threads)
    device = resolve_device(tp.device)
    recipe = build_recipe(tp, cfg, device=device)
    data = load_prepared(args.prepared)
    dep = load_deployment(args.deployment)  # images only: the labels live in another folder
    with_unlabelled = dataclasses.replace(data, images={**data.images, "unlabelled": dep.images})
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    read = {"seed": params.seed, "train": tp.model_dump(), "deploy.dann": cfg.model_dump()}
    read["resolved"] = {"source": source_name, "epochs": recipe.epochs, "unlabelled_images": len(dep.images)}
    tags = {"source": source_name, "kind": "dann", **device_tags(device)}
    with stage_run(params.tracking, "deploy-train", read, strategy="dann", tags=tags):
        import mlflow

        result = train_stage("dann", strategy, cfg, recipe, source_name, spec, source, with_unlabelled, None)
        result.save(strategy, args.out, args.history, args.metrics)
        from transferlab.core.io import write_json

        write_json(args.perf, {**result.perf, **device_info(device)})
        mlflow.log_metric("train_seconds", sum(result.seconds.values()))
        mlflow.log_metrics(
            {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )


if __name__ == "__main__":
    run_main(main)

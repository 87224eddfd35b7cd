"""Stage `curve-point@<budget>` (curve/pipeline.yaml, opt-in): every strategy of `curve.strategies` and the classical
baseline trained on `budget` labels per class, tested on the fixed test split.

The training subset is nested in every larger budget's, stratified and seeded (`transferlab.data.budgets`); the
validation and test splits are the prepared ones at every budget. Each strategy trains under the pipeline's one
protocol (`transferlab.training.budget.train_budget_point`: rate on validation, each seed to a plateau, the
convergence rule); the baseline's C is chosen on validation. Writes the per-seed test predictions
(`<predictions>/<name>.csv`, keyed by sample_id and seed like predictions/<strategy>.csv) and the point's record
(`--metrics`: per strategy the per-seed test accuracy, rate, convergence, failures; the labels used per class).

At the default budget (`data.train_per_class`, with the root pipeline's seeds) nothing is trained: the root
pipeline's train@/evaluate@/baseline outputs are that point, and the `curve` stage reads them; this stage only
records so (`reused`).
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--budget", type=int, required=True, help="labels per class (an entry of curve.labels_per_class)")
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True, help="folder holding features/<source>/ caches")
    p.add_argument("--selection", required=True, help="the score stage's data/selection.json")
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--metrics", required=True, help="the point's JSON")
    p.add_argument("--predictions", required=True, help="folder of <name>.csv test predictions")
    args = p.parse_args()
    params = params_or_exit(args.params)
    budget, tp, cp = args.budget, params.train, params.curve
    names = cp.resolved_strategies(params.strategies)
    seeds = list(cp.seeds) if cp.seeds is not None else list(tp.seeds)
    out = Path(args.predictions)

    from transferlab.core.io import write_json, write_text

    if budget == params.data.train_per_class and seeds == list(tp.seeds):
        # The root pipeline trained exactly this point (the whole prepared train split, the same protocol and
        # seeds): the curve stage reads predictions/<name>.csv and metrics/train/<name>.json.
        write_text(out / "reused.txt", "the root pipeline's predictions/ and metrics/train/ are this point\n")
        write_json(args.metrics, {"budget": budget, "reused": "root pipeline", "strategies": names, "seeds": seeds})
        return

    import numpy as np
    import pandas as pd

    from transferlab.core.device import device_tags, resolve_device
    from transferlab.core.seeding import seed_everything
    from transferlab.data.budgets import budget_subset, extra_pool, subset_prepared
    from transferlab.data.loaders import load_dataset
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.baselines import evaluate_baseline
    from transferlab.evaluation.predictions import predictions_frame
    from transferlab.models.features import load_features_cache
    from transferlab.models.inference import extract
    from transferlab.models.sources import load_source, read_selection
    from transferlab.provenance.tracking import stage_run
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.budget import train_budget_point
    from transferlab.training.recipe import build_recipe

    data = load_prepared(args.prepared)
    counts = np.bincount(data.labels["train"], minlength=data.num_classes)
    pool = None
    if budget > counts.min():  # more than some class's prepared images: the raw data set's unused ones join
        raw = load_dataset(params.data)
        pool = extra_pool(raw, data, params.data.image_size, params.seed, budget - int(counts.min()))
    subset = budget_subset(data, budget, params.seed, pool)
    sub = subset_prepared(data, subset)
    source_name, spec = read_selection(args.selection)
    seed_everything(params.seed, tp.num_threads)
    device = resolve_device(tp.device)
    source = load_source(source_name, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    train_params = tp.model_copy(update={"seeds": seeds})
    read = {
        "seed": params.seed,
        "data": params.data.model_dump(),
        "curve.strategies": names,
        "curve.seeds": seeds,
        "train": tp.model_dump(),
        "baseline": params.baseline.model_dump(),
        **{f"strategies.{n}": params.strategies[n] for n in names},
        "resolved": {"source": source_name, "budget": budget},
    }
    record: dict = {
        "budget": budget,
        "source": source_name,
        "seeds": seeds,
        "train_samples": int(len(subset.labels)),
        "labels_per_class_used": {data.class_names[c]: k for c, k in subset.per_class.items()},
        "capped": {data.class_names[c]: k for c, k in subset.capped.items()},
        "strategies": {},
    }
    y_test, ids = data.labels["test"], data.ids["test"]
    with stage_run(params.tracking, f"curve-point@{budget}", read, tags={"source": source_name, **device_tags(device)}):
        import mlflow

        features = None
        for name in names:
            cfg = strategy_config(name, params.strategies[name])
            strategy = get_strategy(cfg.kind)
            if strategy.uses_features and features is None:
                cache = load_features_cache(args.features, source_name, ("train", "val"))
                train_feats = cache["train"][subset.train_rows]
                n_extra = len(subset.labels) - len(subset.train_rows)
                if n_extra:
                    extra, _ = extract(
                        source.model,
                        subset.images[-n_extra:],
                        source.mean,
                        source.std,
                        with_logits=False,
                        device=device,
                    )
                    train_feats = np.concatenate([train_feats, extra])
                features = {"train": train_feats, "val": cache["val"]}
            recipe = build_recipe(train_params, cfg, device=device)
            point = train_budget_point(
                name,
                strategy,
                cfg,
                recipe,
                source_name,
                spec,
                source,
                sub,
                features if strategy.uses_features else None,
            )
            frames = [predictions_frame(ids, s, y_test, pr, data.class_names) for s, pr in point.test_proba.items()]
            write_text(out / f"{name}.csv", pd.concat(frames).to_csv(index=False, lineterminator="\n"))
            accs = {str(s): round(float((pr.argmax(1) == y_test).mean()), 6) for s, pr in point.test_proba.items()}
            record["strategies"][name] = {"test_accuracy_per_seed": accs, **point.record()}
            mlflow.log_metrics({f"{name}.seed{s}.test_accuracy": a for s, a in accs.items()})
        bp = params.baseline
        metrics, frame = evaluate_baseline(
            bp.model, sub, C_grid=list(bp.C_grid), max_iter=bp.max_iter, seed=params.seed
        )
        write_text(out / f"{bp.model}.csv", frame.to_csv(index=False, lineterminator="\n"))
        record["strategies"][bp.model] = {
            "test_accuracy_per_seed": {"0": round(float(metrics["test_accuracy"]), 6)},
            "C": metrics["C"],
        }
        write_json(args.metrics, record)


if __name__ == "__main__":
    run_main(main)

"""Stage `agreement`: train every candidate to convergence and check, on this data, how well each
transferability estimate predicted the achieved test accuracy (weighted Kendall tau, Spearman), beside
data-free rankings (published ImageNet top-1, parameter count) that every estimator must beat.

Ground truth is the `train@linear_probe` recipe and protocol (`transferlab.scoring.agreement.agreement_recipes`:
`strategies.linear_probe` and the `train` section through `build_recipe`, as train@ trains it: rate on
validation, one run per seed of `train.seeds` to a plateau), so there is one linear-probe number per candidate
and seed, not three. The optional fine-tune recipe (`agreement.finetune_epochs` > 0, its epoch cap) goes
through the same protocol; when it is off (the default), `finetune_checked` is false and the summary says
that the recommended recipe's ranking (fine-tuning) was not checked. A candidate whose run hit the cap is listed
under `not_converged`. Controls (`random_init` sources) are named under `controls`, and the candidate pairs the
accuracies resolve are counted among the real candidates and among the pairs involving a control separately.
"""

from __future__ import annotations

import numpy as np

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import read_json, write_json, write_text


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--score", required=True, help="metrics/score.json")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="estimate-vs-accuracy CSV")
    p.add_argument("--predictions", required=True, help="per-sample test predictions of every recipe x candidate")
    p.add_argument("--figure", required=True, help="estimate-vs-accuracy PNG")
    args = p.parse_args()
    params = params_or_exit(args.params)
    from transferlab.core.device import device_tags, resolve_device
    from transferlab.data.splits import load_prepared
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import agreement_png
    from transferlab.scoring.agreement import agreement_recipes, closing_the_loop

    device = resolve_device(params.train.device)
    recipes = agreement_recipes(params, device)
    probe_cfg, probe_recipe = recipes["linear_probe"]
    read = {
        "seed": params.seed,
        "agreement": params.agreement.model_dump(),
        "train": params.train.model_dump(),
        "strategies.linear_probe": probe_cfg.model_dump(),
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
        "resolved": {"probe_epochs": probe_recipe.epochs},
    }
    score = read_json(args.score)
    data = load_prepared(args.prepared)
    with stage_run(params.tracking, "agreement", read, tags=device_tags(device)):
        import mlflow

        result = closing_the_loop(params, data, score, recipes, args.features, args.pretrained_dir)
        write_text(args.predictions, result.predictions.to_csv(index_label="index", lineterminator="\n"))
        write_json(args.metrics, result.metrics)
        write_text(args.plot, result.plot.to_csv(index=False, lineterminator="\n"))
        agreement_png(result.plot, args.figure)
        mlflow.set_tag("agreement.finetune_checked", str(result.metrics["finetune_checked"]).lower())
        for recipe, r in result.metrics["recipes"].items():
            mlflow.log_text(r["summary"], f"{recipe}_summary.txt")
            for est, v in r["estimators"].items():
                if "weighted_tau" in v and np.isfinite(v["weighted_tau"]):
                    mlflow.log_metric(f"{recipe}.{est}.weighted_tau", v["weighted_tau"])
        mlflow.log_artifact(args.figure)


if __name__ == "__main__":
    run_main(main)

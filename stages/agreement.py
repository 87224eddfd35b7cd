"""Stage `agreement`: train every candidate to convergence and check, on this data, how well each
transferability estimate predicted the achieved test accuracy (weighted Kendall tau, Spearman), beside
data-free rankings (published ImageNet top-1, parameter count) that every estimator must beat.

Ground truth is the `train@linear_probe` recipe and protocol (`transferlab.training.protocol.train_protocol` with
`strategies.linear_probe` and the `train` section: rate on validation, one run per seed of `train.seeds` to a
plateau, `train.patience`, the same epoch cap resolution as `stages/train.py`), so there is one linear-probe
number per candidate and seed, not three. The optional fine-tune recipe (`agreement.finetune_epochs` > 0, its
epoch cap) goes through the same protocol. A candidate whose run hit the cap is listed under `not_converged`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import read_json, write_json, write_text
from transferlab.scoring.agreement import data_free_rankings, recipe_agreement
from transferlab.scoring.selection import load_cache


def probe_config(params):
    """The `linear_probe` strategy entry train@linear_probe uses (defaults when it is not listed) and its
    epoch cap, resolved as `stages/train.py` does (`cfg.epochs or train.epochs`)."""
    from transferlab.strategies import strategy_config

    raw = params.strategies.get("linear_probe") or {}
    if raw.get("kind", "linear_probe") != "linear_probe":
        raw = {}
    cfg = strategy_config("linear_probe", raw)
    return cfg, cfg.epochs or params.train.epochs


def protocol_kwargs(tp, seeds: list[int]) -> dict:
    """The `train` section as `train_protocol` keyword arguments, exactly as `stages/train.py` passes them."""
    kw = {
        "seeds": seeds,
        "lr_grid": list(getattr(tp, "lr_grid", [1.0])),
        "lr_search_epochs": getattr(tp, "lr_search_epochs", 1),
        "lr_grid_extend": getattr(tp, "lr_grid_extend", 0),
        "batch_size": tp.batch_size,
        "patience": tp.patience,
        "weight_decay": tp.weight_decay,
        "augment": tp.augment,
        "num_threads": tp.num_threads,
    }
    for key in ("lr_patience", "lr_factor", "min_delta", "min_lr_ratio", "channels_last"):
        if hasattr(tp, key):
            kw[key] = getattr(tp, key)
    return kw


def train_candidates(params, data, names: list[str], features_root: str, pretrained_dir: str, *, device=None) -> dict:
    """recipe -> candidate -> [{'seed', 'pred' (test predictions), 'converged', 'epochs_run'}] per seed.

    Training and test predictions run on `device` (a torch.device; default: the CPU)."""
    import torch

    from transferlab.models.inference import predict_images
    from transferlab.models.sources import load_source
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.protocol import train_protocol

    tp, ap = params.train, params.agreement
    seeds = list(getattr(tp, "seeds", None) or [params.seed])
    recipes = {"linear_probe": probe_config(params)}
    if ap.finetune_epochs > 0:
        recipes["short_finetune"] = (strategy_config("agreement.finetune", ap.finetune), ap.finetune_epochs)
    out: dict = {r: {} for r in recipes}
    for name in names:
        feats = {s: load_cache(Path(features_root) / name, s)[0] for s in ("train", "val", "test")}
        # The source's identity is fixed (features@ used params.seed); training seeds vary the runs only.
        source = load_source(name, params.sources[name], seed=params.seed, pipeline_dir=pretrained_dir)
        for recipe, (cfg, epochs) in recipes.items():
            strategy = get_strategy(cfg.kind)
            result = train_protocol(
                strategy,
                cfg,
                lambda source=source: copy.deepcopy(source),
                data.images,
                data.labels,
                data.num_classes,
                epochs=epochs,
                features=feats if strategy.uses_features else None,
                label=f"agreement:{recipe}:{name}",
                device=device,
                **protocol_kwargs(tp, seeds),
            )
            runs = []
            for seed, res in sorted(result.runs.items()):
                if strategy.uses_features:  # the head on the cached test features of the same frozen backbone
                    with torch.no_grad():
                        logits = res.model.get_classifier()(
                            torch.from_numpy(np.ascontiguousarray(feats["test"], np.float32))
                        )
                else:
                    logits = predict_images(res.model, data.images["test"], source.mean, source.std, device=device)
                runs.append(
                    {
                        "seed": seed,
                        "pred": logits.argmax(1).numpy(),
                        "converged": bool(getattr(res, "converged", True)) and seed not in result.failures,
                        "epochs_run": len(res.history),
                    }
                )
            out[recipe][name] = runs
    return out


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
    ap = params.agreement
    probe_cfg, probe_epochs = probe_config(params)
    read = {
        "seed": params.seed,
        "agreement": ap.model_dump(),
        "train": params.train.model_dump(),
        "strategies.linear_probe": probe_cfg.model_dump(),
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
        "resolved": {"probe_epochs": probe_epochs},
    }
    import pandas as pd

    from transferlab.core.device import device_tags, resolve_device
    from transferlab.data.splits import load_prepared
    from transferlab.provenance.tracking import stage_run
    from transferlab.reporting.plots import agreement_png

    device = resolve_device(params.train.device)
    score = read_json(args.score)
    data = load_prepared(args.prepared)
    names = sorted(params.sources)
    with stage_run(params.tracking, "agreement", read, tags=device_tags(device)):
        import mlflow

        runs = train_candidates(params, data, names, args.features, args.pretrained_dir, device=device)
        y_test = data.labels["test"]
        table = pd.DataFrame({"y_true": y_test})
        for recipe, by_name in runs.items():
            for n, seed_runs in by_name.items():
                for i, r in enumerate(seed_runs):  # the first seed keeps the plain column name (diagnose reads it)
                    table[f"{recipe}:{n}" if i == 0 else f"{recipe}@seed{r['seed']}:{n}"] = r["pred"]
        write_text(args.predictions, table.to_csv(index_label="index", lineterminator="\n"))
        data_free = data_free_rankings(names, score["candidates"], ap.imagenet_top1)
        estimates = {e: {n: score["candidates"][n].get(e) for n in names} for e in params.score.estimators}
        out: dict = {"candidates": names, "data_free_rankings": data_free, "recipes": {}}
        rows = []
        for recipe, by_name in runs.items():
            correct = {n: np.stack([r["pred"] == y_test for r in rs]) for n, rs in by_name.items()}
            not_converged = [n for n, rs in by_name.items() if not all(r["converged"] for r in rs)]
            result = recipe_agreement(
                estimates,
                correct,
                data_free,
                recipe=recipe,
                not_converged=not_converged,
                n_bootstrap=ap.n_bootstrap,
                seed=params.seed,
                min_candidates=ap.min_candidates,
            )
            result["epochs_run"] = {n: [r["epochs_run"] for r in rs] for n, rs in sorted(by_name.items())}
            out["recipes"][recipe] = result
            for est, values in [*estimates.items(), *((f"{k} (data-free)", v) for k, v in data_free.items())]:
                for n in names:
                    rows.append(
                        {
                            "recipe": recipe,
                            "estimator": est,
                            "candidate": n,
                            "estimate": values[n],
                            "test_accuracy": result["test_accuracy"][n],
                        }
                    )
        write_json(args.metrics, out)
        frame = pd.DataFrame(rows)
        write_text(args.plot, frame.to_csv(index=False, lineterminator="\n"))
        agreement_png(frame, args.figure)
        for recipe, r in out["recipes"].items():
            mlflow.log_text(r["summary"], f"{recipe}_summary.txt")
            for est, v in r["estimators"].items():
                if "weighted_tau" in v and np.isfinite(v["weighted_tau"]):
                    mlflow.log_metric(f"{recipe}.{est}.weighted_tau", v["weighted_tau"])
        mlflow.log_artifact(args.figure)


if __name__ == "__main__":
    run_main(main)

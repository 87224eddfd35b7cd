"""Stage `agreement`: train every candidate with cheap fixed recipes and check, on this data, how well
each transferability estimate predicted the achieved test accuracy (weighted Kendall tau, Spearman)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages._common import params_or_exit, parser, run_main
from transferlab.agreement import plain_summary, rank_agreement
from transferlab.backbones import load_source
from transferlab.data import load_prepared
from transferlab.io import read_json, write_json, write_text
from transferlab.plotting import agreement_png
from transferlab.scoring import load_cache
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.strategies.base import Strategy, StrategyConfig
from transferlab.tracking import stage_run
from transferlab.training import fit, predict_images, tensor_batches, train_strategy


def probe_predictions(feat_dir: Path, labels: dict, num_classes: int, cfg, seed: int, gen) -> np.ndarray:
    """Linear probe on the cached features; per-test-sample predicted labels."""
    feats = {s: load_cache(feat_dir, s)[0] for s in ("train", "val", "test")}
    torch.manual_seed(seed)
    head = nn.Linear(feats["train"].shape[1], num_classes)
    fit(
        head,
        Strategy(),
        StrategyConfig(kind="linear_probe", lr=cfg.probe_lr),
        tensor_batches(feats["train"]),
        labels["train"],
        tensor_batches(feats["val"]),
        labels["val"],
        epochs=cfg.probe_epochs,
        batch_size=64,
        patience=cfg.probe_epochs,
        weight_decay=1e-4,
        generator=gen,
        label="probe",
    )
    with torch.no_grad():
        pred = head(torch.from_numpy(feats["test"])).argmax(1).numpy()
    return pred


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
    ft_cfg = strategy_config("agreement.finetune", ap.finetune)
    read = {
        "seed": params.seed,
        "agreement": ap.model_dump(),
        "train": params.train.model_dump(),
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
    }
    score = read_json(args.score)
    data = load_prepared(args.prepared)
    names = sorted(params.sources)
    with stage_run(params.tracking, "agreement", read):
        import mlflow

        preds: dict[str, dict[str, np.ndarray]] = {"linear_probe": {}, "short_finetune": {}}
        for name in names:
            gen = seed_everything(params.seed, params.train.num_threads)
            preds["linear_probe"][name] = probe_predictions(
                Path(args.features) / name, data.labels, data.num_classes, ap, params.seed, gen
            )
            if ap.finetune_epochs == 0:
                continue
            gen = seed_everything(params.seed, params.train.num_threads)
            source = load_source(name, params.sources[name], seed=params.seed, pipeline_dir=args.pretrained_dir)
            result = train_strategy(
                get_strategy(ft_cfg.kind),
                ft_cfg,
                source,
                data.images,
                data.labels,
                data.num_classes,
                epochs=ap.finetune_epochs,
                batch_size=params.train.batch_size,
                patience=ap.finetune_epochs,
                weight_decay=params.train.weight_decay,
                augment=params.train.augment,
                seed=params.seed,
                generator=gen,
                label=f"agreement:{name}",
            )
            logits = predict_images(result.model, data.images["test"], source.mean, source.std)
            preds["short_finetune"][name] = logits.argmax(1).numpy()
        out: dict = {"candidates": names, "recipes": {}}
        rows = []
        y_test = data.labels["test"]
        table = pd.DataFrame({"y_true": y_test})
        for recipe, by_name in preds.items():
            for n, pr in by_name.items():
                table[f"{recipe}:{n}"] = pr
        write_text(args.predictions, table.to_csv(index_label="index", lineterminator="\n"))
        for recipe, by_name in preds.items():
            if not by_name:
                continue
            corr = {n: pr == y_test for n, pr in by_name.items()}
            accuracy = {n: round(float(c.mean()), 6) for n, c in corr.items()}
            per_est = {}
            for est in params.score.estimators:
                values = {n: score["candidates"][n].get(est) for n in names}
                try:
                    per_est[est] = rank_agreement(values, corr, n_bootstrap=ap.n_bootstrap, seed=params.seed)
                except ValueError as exc:
                    per_est[est] = {"verdict": "undetermined", "reason": str(exc)}
                for n in names:
                    rows.append(
                        {
                            "recipe": recipe,
                            "estimator": est,
                            "candidate": n,
                            "estimate": values[n],
                            "test_accuracy": accuracy[n],
                        }
                    )
            usable = {k: v for k, v in per_est.items() if "weighted_tau" in v}
            out["recipes"][recipe] = {
                "test_accuracy": accuracy,
                "estimators": per_est,
                "summary": plain_summary(usable, recipe),
            }
        write_json(args.metrics, out)
        frame = pd.DataFrame(rows)
        write_text(args.plot, frame.to_csv(index=False, lineterminator="\n"))
        agreement_png(frame, args.figure)
        for recipe, r in out["recipes"].items():
            mlflow.log_text(r["summary"], f"{recipe}_summary.txt")
            for est, v in r["estimators"].items():
                if "weighted_tau" in v and np.isfinite(v["weighted_tau"]):
                    mlflow.log_metric(f"{recipe}.{est}.weighted_tau", v["weighted_tau"])
        with tempfile.TemporaryDirectory():
            mlflow.log_artifact(args.figure)


if __name__ == "__main__":
    run_main(main)

"""Stage `diagnose`: negative transfer, catastrophic forgetting, domain shift, learning-rate sensitivity and
over-fitting, each measured, with a severity and a remedy; the remedies for flagged findings are run
and reported before/after with confidence intervals.

Writes `metrics/diagnosis.json` and `reports/diagnosis.md`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages._common import params_or_exit, parser, run_main
from transferlab import diagnosis as dx
from transferlab.backbones import extract, load_source
from transferlab.data import load_prepared
from transferlab.io import read_json, write_json, write_text
from transferlab.params import SourceSpec
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.tracking import stage_run
from transferlab.training import predict_images, train_strategy

TUNED_PREFERENCE = ("finetune_full", "discriminative_lr", "l2sp", "gradual_unfreeze", "finetune_top")


def imagenet_proxy_images(n: int, size: int, seed: int) -> np.ndarray:
    """Random crops of scikit-learn's two sample photos: a stand-in for the ImageNet domain offline."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 4, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


def preds_of(model, images: np.ndarray, mean, std) -> np.ndarray:
    return predict_images(model, images, mean, std).argmax(1).numpy()


def main() -> None:  # noqa: C901 - one finding type after another, in the order of the report
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--pretrained-dir", default="models/pretrain")
    p.add_argument("--models", required=True, help="folder of models/<strategy>/")
    p.add_argument("--predictions", required=True, help="folder of predictions/<name>.csv and agreement.csv")
    p.add_argument("--history", required=True, help="folder of plots/history/<strategy>.csv")
    p.add_argument("--metrics", required=True)
    p.add_argument("--report", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp, seed, nb = params.diagnose, params.seed, params.diagnose.n_bootstrap
    read = {
        "seed": seed,
        "diagnose": dp.model_dump(),
        "train": params.train.model_dump(),
        "strategies": params.strategies,
        "pretrain": params.pretrain,
    }
    data = load_prepared(args.prepared)
    y = data.labels["test"]
    sel = read_json(args.selection)
    sel_name, sel_spec = sel["selected"], SourceSpec.model_validate(sel["spec"])
    pred_dir = Path(args.predictions)
    strat_preds = {n: pd.read_csv(pred_dir / f"{n}.csv")["y_pred"].to_numpy() for n in sorted(params.strategies)}
    raw_preds = pd.read_csv(pred_dir / "raw_pixel_logreg.csv")["y_pred"].to_numpy()
    agree = pd.read_csv(pred_dir / "agreement.csv")
    findings: list[dict] = []

    with stage_run(params.tracking, "diagnose", read):
        import mlflow

        # 1. Negative transfer: every strategy, and every candidate source under the agreement recipes.
        refs = {"scratch": strat_preds[params.compare.baseline], "raw_pixel_logreg": raw_preds}
        # Sources are compared under the linear probe: the same cheap head for each, so the features decide.
        # (The 1-epoch fine-tune recipe only ranks sources; it is not meant to beat anything.)
        candidates = {c: agree[c].to_numpy() for c in agree.columns if c.startswith("linear_probe:")}
        models = {n: v for n, v in strat_preds.items() if n != params.compare.baseline} | candidates
        for f in dx.negative_transfer(y, models, refs, n_bootstrap=nb, seed=seed):
            if f["flagged"]:
                name = f["subject"]
                if ":" in name:  # a candidate source: the remedy is the selected (closer / better-ranked) one
                    recipe = name.split(":")[0]
                    alt = f"{recipe}:{sel_name}"
                else:
                    alt = "linear_probe" if name != "linear_probe" and "linear_probe" in strat_preds else None
                if alt and alt != name:
                    after = candidates.get(alt, strat_preds.get(alt))
                    f["remedy_result"] = dx.remedy_outcome(y, models[name], after, nb, seed, alt)
            findings.append(f)

        # 2. Over-fitting: train/val gap per strategy; remedy: freeze more (the linear probe).
        histories = {n: pd.read_csv(Path(args.history) / f"{n}.csv").to_dict("records") for n in params.strategies}
        for f in dx.overfitting(histories, dp.overfit_gap_threshold):
            if f["flagged"] and f["subject"] != "linear_probe" and "linear_probe" in strat_preds:
                f["remedy_result"] = dx.remedy_outcome(
                    y,
                    strat_preds[f["subject"]],
                    strat_preds["linear_probe"],
                    nb,
                    seed,
                    "linear_probe (freeze the whole backbone)",
                )
            findings.append(f)

        # 3. Forgetting by proxy and domain shift, for the selected (ImageNet) source.
        probe = data.images["test"][: dp.probe_images]
        source = load_source(sel_name, sel_spec, seed=seed, pipeline_dir=args.pretrained_dir)
        src_model = copy.deepcopy(source.model)
        tuned_name = next((n for n in TUNED_PREFERENCE if n in params.strategies), None)
        if source.has_classifier and tuned_name:
            tuned_cfg = strategy_config(tuned_name, params.strategies[tuned_name])
            tuned = get_strategy(tuned_cfg.kind).load(Path(args.models) / tuned_name, lambda: source)
            f = dx.forgetting_by_proxy(
                src_model, tuned, probe, source.mean, source.std, agreement_threshold=dp.proxy_agreement_threshold
            )
            f["subject"] = f"{sel_name} -> {tuned_name}"
            head = src_model.get_classifier()
            original = dx.source_head_predictions(src_model, head, probe, source.mean, source.std)
            if f["flagged"] and "finetune_top" in params.strategies and tuned_name != "finetune_top":
                top_cfg = strategy_config("finetune_top", params.strategies["finetune_top"])
                top = get_strategy(top_cfg.kind).load(Path(args.models) / "finetune_top", lambda: source)
                f["remedy_result"] = dx.remedy_outcome(
                    original,
                    dx.source_head_predictions(tuned, head, probe, source.mean, source.std),
                    dx.source_head_predictions(top, head, probe, source.mean, source.std),
                    nb,
                    seed,
                    "finetune_top (early blocks frozen)",
                    metric="source top-1 agreement on probe images",
                )
            findings.append(f)
        target_feats = np.load(Path(args.features) / sel_name / "test_features.npy")[: dp.probe_images]
        proxy = imagenet_proxy_images(dp.probe_images, probe.shape[1], seed)
        proxy_feats, _ = extract(src_model, proxy, source.mean, source.std, with_logits=False)
        f = dx.domain_shift(
            src_model,
            data.images["train"][: dp.probe_images],
            proxy_feats,
            target_feats,
            source.mean,
            source.std,
            source_domain=f"{sel_name} (ImageNet proxy: sample-photo crops)",
            n_permutations=dp.mmd_permutations,
            seed=seed,
            pad_threshold=dp.pad_threshold,
        )
        if f["flagged"] and "linear_probe" in strat_preds:
            cfg = strategy_config("adabn", {"epochs": dp.remedy_epochs})
            gen = seed_everything(seed, params.train.num_threads)
            result = train_strategy(
                get_strategy("adabn"),
                cfg,
                load_source(sel_name, sel_spec, seed=seed, pipeline_dir=args.pretrained_dir),
                data.images,
                data.labels,
                data.num_classes,
                epochs=dp.remedy_epochs,
                batch_size=params.train.batch_size,
                patience=params.train.patience,
                weight_decay=params.train.weight_decay,
                augment="none",
                seed=seed,
                generator=gen,
                label="adabn",
            )
            f["remedy_result"] = dx.remedy_outcome(
                y,
                strat_preds["linear_probe"],
                preds_of(result.model, data.images["test"], source.mean, source.std),
                nb,
                seed,
                "adabn vs linear_probe (same frozen backbone, BN statistics re-estimated on the target)",
            )
        findings.append(f)

        # 4. The in-pipeline source: exact forgetting, domain shift to its own domain, and the lr sweep.
        fs = dp.forgetting_source
        if fs:
            if fs not in params.sources or params.sources[fs].kind != "pipeline":
                raise SystemExit(f"diagnose.forgetting_source: '{fs}' is not a `pipeline` source in `sources`")
            pdir = Path(args.pretrained_dir) / fs
            s_images, s_labels = np.load(pdir / "source_test_images.npy"), np.load(pdir / "source_test_labels.npy")
            base = load_source(fs, params.sources[fs], seed=seed, pipeline_dir=args.pretrained_dir)
            head = copy.deepcopy(base.model.get_classifier())
            before = dx.source_head_predictions(base.model, head, s_images, base.mean, base.std)
            acc_before = float((before == s_labels).mean())
            default_lr = float(params.strategies.get("finetune_full", {}).get("lr", 1e-3))
            rates = sorted(set(dp.lr_sweep) | {default_lr})
            sweep, runs = [], {}
            for lr in rates:
                for kind in ("finetune_full", "l2sp") if lr == default_lr else ("finetune_full",):
                    extra = {"alpha": dp.l2sp_alpha} if kind == "l2sp" else {}
                    cfg = strategy_config(kind, {"lr": lr, "backbone_lr_mult": 1.0, **extra})
                    gen = seed_everything(seed, params.train.num_threads)
                    src = load_source(fs, params.sources[fs], seed=seed, pipeline_dir=args.pretrained_dir)
                    res = train_strategy(
                        get_strategy(kind),
                        cfg,
                        src,
                        data.images,
                        data.labels,
                        data.num_classes,
                        epochs=dp.sweep_epochs,
                        batch_size=params.train.batch_size,
                        patience=dp.sweep_epochs,
                        weight_decay=params.train.weight_decay,
                        augment=params.train.augment,
                        seed=seed,
                        generator=gen,
                        label=f"{kind}@{lr:g}",
                    )
                    runs[(kind, lr)] = (
                        preds_of(res.model, data.images["test"], base.mean, base.std),
                        dx.source_head_predictions(res.model, head, s_images, base.mean, base.std),
                    )
                t_pred, s_pred = runs[("finetune_full", lr)]
                s_acc = float((s_pred == s_labels).mean())
                sweep.append(
                    {
                        "lr": lr,
                        "target_accuracy": round(float((t_pred == y).mean()), 6),
                        "source_accuracy_after": round(s_acc, 6),
                        "source_accuracy_drop": round(acc_before - s_acc, 6),
                    }
                )
            row = next(r for r in sweep if r["lr"] == default_lr)
            f = dx.finding(
                "catastrophic_forgetting",
                f"{fs} -> finetune_full (exact: source task kept)",
                row["source_accuracy_drop"] > dp.forgetting_drop_threshold,
                "warning",
                {
                    "source_accuracy_before": round(acc_before, 6),
                    "source_accuracy_after": row["source_accuracy_after"],
                    "source_accuracy_drop": row["source_accuracy_drop"],
                    "lr": default_lr,
                    "epochs": dp.sweep_epochs,
                    "source_test_samples": len(s_labels),
                    "threshold": dp.forgetting_drop_threshold,
                },
                "L2-SP (pull towards the source weights), a lower learning rate, or freezing early blocks.",
            )
            if f["flagged"]:
                f["remedy_result"] = dx.remedy_outcome(
                    s_labels,
                    runs[("finetune_full", default_lr)][1],
                    runs[("l2sp", default_lr)][1],
                    nb,
                    seed,
                    f"l2sp (alpha={dp.l2sp_alpha}) at lr {default_lr:g}",
                    metric="source-task accuracy",
                )
                t = dx.remedy_outcome(
                    y, runs[("finetune_full", default_lr)][0], runs[("l2sp", default_lr)][0], nb, seed, "l2sp"
                )
                f["remedy_result"]["note"] = f"target accuracy {t['before']:.3f} -> {t['after']:.3f} ({t['verdict']})"
            findings.append(f)
            findings.append(
                dx.lr_sensitivity(
                    sweep, spread_threshold=dp.lr_spread_threshold, forgetting_threshold=dp.forgetting_drop_threshold
                )
            )
            fs_target = np.load(Path(args.features) / fs / "test_features.npy")[: dp.probe_images]
            # The source task may be stored at another size (pre-training resolution): compare at the target's.
            size = data.images["test"].shape[1]
            s_resized = np.stack(
                [
                    np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in s_images[: dp.probe_images]
                ]
            )
            fs_source, _ = extract(base.model, s_resized, base.mean, base.std, with_logits=False)
            f = dx.domain_shift(
                base.model,
                data.images["train"][: dp.probe_images],
                fs_source,
                fs_target,
                base.mean,
                base.std,
                source_domain=f"{fs} (its own source data)",
                n_permutations=dp.mmd_permutations,
                seed=seed,
                pad_threshold=dp.pad_threshold,
            )
            if f["flagged"] and f"linear_probe:{fs}" in candidates and f"linear_probe:{sel_name}" in candidates:
                f["remedy_result"] = dx.remedy_outcome(
                    y,
                    candidates[f"linear_probe:{fs}"],
                    candidates[f"linear_probe:{sel_name}"],
                    nb,
                    seed,
                    f"a closer source: linear_probe on {sel_name}",
                )
            findings.append(f)

        summary = dx.summarize(findings)
        write_json(args.metrics, {"summary": summary, "findings": findings})
        write_text(args.report, dx.to_markdown(findings, summary))
        mlflow.log_metrics({f"{k}.flagged": v["flagged"] for k, v in summary["by_type"].items()})
        mlflow.log_artifact(args.report)


if __name__ == "__main__":
    run_main(main)

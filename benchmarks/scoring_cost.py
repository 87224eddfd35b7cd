"""Benchmark: what scoring every candidate costs, against fine-tuning every candidate.

Scoring = one forward pass over the labelled training split + every transferability estimator (what
`score` needs). The features cache of `features@<source>` also covers val and test, for the linear probe
and evaluation; its cost is printed separately (`cache_s`). Fine-tuning = `finetune_full` for `train.epochs` epochs on
the train split; one epoch is timed per candidate and multiplied by the epoch count (early stopping
could end sooner; the multiplication is stated in the output). Wall time on this machine, printed, not
asserted.

usage: python benchmarks/scoring_cost.py [--params params.yaml] [--prepared data/prepared] [--sources a,b]
(needs `dvc repro prepare pretrain` first)
"""

from __future__ import annotations

import argparse
import time

import torch

from transferlab.backbones import extract, load_source
from transferlab.data import SPLITS, load_prepared
from transferlab.params import load_params
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training import image_batches
from transferlab.transferability import score_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--sources", default=None, help="comma-separated subset of `sources` (default: all)")
    args = p.parse_args()
    params = load_params(args.params)
    data = load_prepared(args.prepared)
    names = args.sources.split(",") if args.sources else sorted(params.sources)
    epochs = params.train.epochs
    print(
        f"threads={torch.get_num_threads()} train={len(data.labels['train'])} images "
        f"size={data.images['train'].shape[1]} epochs={epochs}"
    )
    print(
        f"{'candidate':20s} {'forward_s':>9s} {'estimators_s':>12s} {'cache_s':>8s} {'epoch_s':>8s} "
        f"{'finetune_s':>10s} {'ratio':>7s}"
    )
    total_score = total_ft = 0.0
    for name in names:
        source = load_source(name, params.sources[name], seed=params.seed)
        feats, times = {}, {}
        for split in SPLITS:
            t = time.perf_counter()
            feats[split], logits = extract(
                source.model, data.images[split], source.mean, source.std, with_logits=source.has_classifier
            )
            times[split] = time.perf_counter() - t
            if split == "train":
                train_logits = logits
        t_feat = times["train"]
        t_cache = sum(times.values())
        t = time.perf_counter()
        score_all(
            feats["train"], data.labels["train"], train_logits, seed=params.seed, names=list(params.score.estimators)
        )
        t_est = time.perf_counter() - t
        # One epoch of full fine-tuning, exactly as train@finetune_full runs it.
        cfg = strategy_config("finetune_full", params.strategies.get("finetune_full", {}))
        strategy = get_strategy("finetune_full")
        gen = seed_everything(params.seed)
        model = strategy.build(source, data.num_classes, cfg, params.seed)
        opt = torch.optim.AdamW(strategy.param_groups(model, cfg))
        batches = image_batches(data.images["train"], source, params.train.augment, gen)
        y = torch.as_tensor(data.labels["train"])
        order = torch.randperm(len(y), generator=gen).numpy()
        strategy.set_train_mode(model)
        t = time.perf_counter()
        for i in range(0, len(y), params.train.batch_size):
            idx = order[i : i + params.train.batch_size]
            loss = torch.nn.functional.cross_entropy(model(batches(idx, True)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        t_epoch = time.perf_counter() - t
        t_ft = t_epoch * epochs
        total_score += t_feat + t_est
        total_ft += t_ft
        print(
            f"{name:20s} {t_feat:9.1f} {t_est:12.1f} {t_cache:8.1f} {t_epoch:8.1f} {t_ft:10.1f} "
            f"{(t_feat + t_est) / t_ft:7.1%}"
        )
    print(
        f"{'all candidates':20s} scoring {total_score:.1f} s vs fine-tuning {total_ft:.1f} s "
        f"(= {epochs} x one measured epoch each): ratio {total_score / total_ft:.1%}"
    )


if __name__ == "__main__":
    main()

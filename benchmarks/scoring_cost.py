"""Benchmark: what scoring every candidate costs, against fine-tuning every candidate.

Scoring = one forward pass over the labelled training split + every transferability estimator (what
`score` needs). The features cache of `features@<source>` also covers val and test, for the linear probe
and evaluation; its cost is printed separately (`cache_s`). Fine-tuning = `finetune_full` for `train.epochs` epochs on
the train split; one epoch is timed per candidate and multiplied by the epoch count (early stopping
could end sooner; the multiplication is stated in the output). Wall time on this machine, printed, not
asserted.

usage: python benchmarks/scoring_cost.py [--params params.yaml] [--prepared data/prepared] [--sources a,b]
(needs `dvc repro prepare pretrain` first, or `--synthetic`: random images of the prepared splits' sizes,
and `pipeline` sources replaced by their architecture with random weights: the same compute)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def synthetic_data(params: Any) -> SimpleNamespace:
    """Random uint8 images with the split sizes and image size that `prepare` would produce."""
    import numpy as np

    rng = np.random.default_rng(params.seed)
    d, n_classes = params.data, 10
    per_class = {"train": d.train_per_class, "val": d.val_per_class, "test": d.test_per_class}
    images, labels = {}, {}
    for split, n in per_class.items():
        images[split] = rng.integers(0, 256, (n * n_classes, d.image_size, d.image_size, 3), dtype=np.uint8)
        labels[split] = np.repeat(np.arange(n_classes), n)
    return SimpleNamespace(images=images, labels=labels, num_classes=n_classes)


def measure(params: Any, data: Any, names: list[str], pipeline_dir: str = "models/pretrain") -> dict[str, Any]:
    """Time scoring and one fine-tuning epoch per candidate.

    Returns:
        {"rows": [{candidate, forward_s, estimators_s, cache_s, epoch_s, finetune_s, ratio}], "scoring_s",
        "finetune_s", "ratio", "epochs"}.
    """
    import torch

    from transferlab.backbones import extract, load_source
    from transferlab.data import SPLITS
    from transferlab.params import SourceSpec
    from transferlab.seeding import seed_everything
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training import image_batches
    from transferlab.transferability import score_all

    epochs = params.train.epochs
    rows, total_score, total_ft = [], 0.0, 0.0
    for name in names:
        spec = params.sources[name]
        if spec.kind == "pipeline" and not (Path(pipeline_dir) / name / "model.pt").is_file():
            spec = SourceSpec(kind="random_init", arch=params.pretrain[name].get("arch", "resnet10t"))
        source = load_source(name, spec, seed=params.seed, pipeline_dir=pipeline_dir)
        feats, times, train_logits = {}, {}, None
        for split in SPLITS:
            t = time.perf_counter()
            feats[split], logits = extract(
                source.model, data.images[split], source.mean, source.std, with_logits=source.has_classifier
            )
            times[split] = time.perf_counter() - t
            if split == "train":
                train_logits = logits
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
        t_feat, t_ft = times["train"], t_epoch * epochs
        total_score += t_feat + t_est
        total_ft += t_ft
        rows.append(
            {
                "candidate": name,
                "forward_s": t_feat,
                "estimators_s": t_est,
                "cache_s": sum(times.values()),
                "epoch_s": t_epoch,
                "finetune_s": t_ft,
                "ratio": (t_feat + t_est) / t_ft,
            }
        )
    return {
        "rows": rows,
        "scoring_s": total_score,
        "finetune_s": total_ft,
        "ratio": total_score / total_ft,
        "epochs": epochs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--synthetic", action="store_true", help="random images instead of data/prepared")
    p.add_argument("--sources", default=None, help="comma-separated subset of `sources` (default: all)")
    args = p.parse_args()

    import torch

    from transferlab.data import load_prepared
    from transferlab.params import load_params

    params = load_params(args.params)
    data = synthetic_data(params) if args.synthetic else load_prepared(args.prepared)
    names = args.sources.split(",") if args.sources else sorted(params.sources)
    print(
        f"threads={torch.get_num_threads()} train={len(data.labels['train'])} images "
        f"size={data.images['train'].shape[1]} epochs={params.train.epochs}"
    )
    result = measure(params, data, names)
    print(
        f"{'candidate':20s} {'forward_s':>9s} {'estimators_s':>12s} {'cache_s':>8s} {'epoch_s':>8s} "
        f"{'finetune_s':>10s} {'ratio':>7s}"
    )
    for r in result["rows"]:
        print(
            f"{r['candidate']:20s} {r['forward_s']:9.1f} {r['estimators_s']:12.1f} {r['cache_s']:8.1f} "
            f"{r['epoch_s']:8.1f} {r['finetune_s']:10.1f} {r['ratio']:7.1%}"
        )
    print(
        f"{'all candidates':20s} scoring {result['scoring_s']:.1f} s vs fine-tuning {result['finetune_s']:.1f} s "
        f"(= {result['epochs']} x one measured epoch each): ratio {result['ratio']:.1%}"
    )


if __name__ == "__main__":
    main()

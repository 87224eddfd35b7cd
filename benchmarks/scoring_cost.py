"""Benchmark: what scoring every candidate costs, against fine-tuning every candidate.

Scoring = one forward pass over the labelled training split + every transferability estimator (what
`score` needs). The features cache of `features@<source>` also covers val and test, for the linear probe
and evaluation; with `--cache` its cost is printed separately (`cache_s`). Fine-tuning = `finetune_full` as
the training protocol runs it: seconds per epoch (measured per candidate, on `--finetune-images` training
images when given, scaled to the split) x the epochs the protocol runs (the rate search + each seed to its
plateau), read from `metrics/train/finetune_full.json` when a pipeline run of the current protocol left
one, else a stated lower bound from params (`protocol_epochs`). Wall time on this machine, printed, not
asserted.

usage: python benchmarks/scoring_cost.py [--params params.yaml] [--prepared data/prepared] [--sources a,b]
       [--finetune-images 128] [--cache] [--metrics metrics/train] [--perf perf/train]
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


def protocol_epochs(
    params: Any, metrics_dir: str | Path = "metrics/train", strategy: str = "finetune_full"
) -> tuple[int, str]:
    """Epochs of `strategy` the training protocol runs per candidate: the rate search plus one run per seed.

    From `metrics/train/<strategy>.json` when a pipeline run left one (`lr_search`: each rate trained for
    `train.lr_search_epochs`; `per_seed.*.epochs_run`: each seed to its plateau). Otherwise a stated lower
    bound from params: len(lr_grid) x lr_search_epochs + len(seeds) x (patience + 1), the fewest epochs a
    plateau stop allows (so the ratio printed is then an upper bound).

    Returns:
        (epochs, where the number came from).
    """
    import json

    tp = params.train
    path = Path(metrics_dir) / f"{strategy}.json"
    if path.is_file():
        m = json.loads(path.read_text())
        if isinstance(m.get("per_seed"), dict) and isinstance(m.get("lr_search"), list):
            search = len(m["lr_search"]) * tp.lr_search_epochs
            seeds = sum(int(r["epochs_run"]) for r in m["per_seed"].values())
            return search + seeds, f"{path}: {search} search + {seeds} seed epochs"
    search = len(tp.lr_grid) * tp.lr_search_epochs if len(tp.lr_grid) > 1 else 0
    seeds = len(tp.seeds) * (tp.patience + 1)
    return search + seeds, (
        f"no {path} from the current protocol: lower bound {search} search + {len(tp.seeds)} seeds x "
        f"(patience {tp.patience} + 1)"
    )


def pipeline_epoch_seconds(
    metrics_dir: str | Path, perf_dir: str | Path, strategy: str = "finetune_full"
) -> dict | None:
    """The pipeline's own measured seconds per epoch of `strategy` (seed runs only), as a cross-check:
    perf/train/<strategy>.json's seconds over metrics/train/<strategy>.json's epochs; None when absent."""
    import json

    m_path, p_path = Path(metrics_dir) / f"{strategy}.json", Path(perf_dir) / f"{strategy}.json"
    if not (m_path.is_file() and p_path.is_file()):
        return None
    m, perf = json.loads(m_path.read_text()), json.loads(p_path.read_text())
    if not isinstance(m.get("per_seed"), dict) or "train_seconds_total" not in perf:
        return None
    epochs = sum(int(r["epochs_run"]) for r in m["per_seed"].values())
    return {"source": m.get("source"), "epoch_s": perf["train_seconds_total"] / max(epochs, 1), "epochs": epochs}


def _train_step(model: Any, opt: Any, batches: Any, y: Any, idx: Any) -> None:
    """One optimizer step on the (augmented) batch `idx`, as `training.loop.fit` takes it."""
    import torch

    loss = torch.nn.functional.cross_entropy(model(batches(idx, True)), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()


def measure(
    params: Any,
    data: Any,
    names: list[str],
    pipeline_dir: str = "models/pretrain",
    *,
    splits: tuple[str, ...] | None = None,
    finetune_images: int | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Time scoring and fine-tuning per candidate.

    Args:
        params, data: the project's params and the prepared (or synthetic) splits.
        names: candidate sources (`pipeline` sources without a trained model: their architecture, random
            weights, the same compute).
        splits: splits to run the forward pass over (default: all three, as `features@` does; scoring itself
            needs only 'train', which must be included).
        finetune_images: time the fine-tuning epoch on this many training images (a seeded random subset,
            after one untimed warm-up step) and scale to the split: per-epoch cost is linear in the images.
            None: the whole split.
        epochs: fine-tuning epochs per candidate (default: `params.train.epochs`, the cap).

    Returns:
        {"rows": [{candidate, forward_s, estimators_s, cache_s (None unless every split ran), epoch_s,
        finetune_s, ratio}], "scoring_s", "finetune_s", "ratio", "epochs"}.
    """
    import torch

    from transferlab.core.seeding import seed_everything
    from transferlab.data.loaders import SPLITS
    from transferlab.models.inference import extract
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.scoring.estimators import score_all
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.loop import image_batches

    splits = tuple(splits or SPLITS)
    epochs = params.train.epochs if epochs is None else epochs
    bs = params.train.batch_size
    rows, total_score, total_ft = [], 0.0, 0.0
    for name in names:
        spec = params.sources[name]
        if spec.kind == "pipeline" and not (Path(pipeline_dir) / name / "model.pt").is_file():
            spec = SourceSpec(kind="random_init", arch=params.pretrain[name].get("arch", "resnet10t"))
        source = load_source(name, spec, seed=params.seed, pipeline_dir=pipeline_dir)
        times, train_feats, train_logits = {}, None, None
        for split in splits:
            t = time.perf_counter()
            feats, logits = extract(
                source.model, data.images[split], source.mean, source.std, with_logits=source.has_classifier
            )
            times[split] = time.perf_counter() - t
            if split == "train":
                train_feats, train_logits = feats, logits
        t = time.perf_counter()
        score_all(
            train_feats, data.labels["train"], train_logits, seed=params.seed, names=list(params.score.estimators)
        )
        t_est = time.perf_counter() - t
        # Fine-tuning steps exactly as train@finetune_full runs them (optimizer, augmentation, batch size).
        cfg = strategy_config("finetune_full", params.strategies.get("finetune_full", {}))
        strategy = get_strategy("finetune_full")
        gen = seed_everything(params.seed)
        model = strategy.build(source, data.num_classes, cfg, params.seed)
        opt = torch.optim.AdamW(strategy.param_groups(model, cfg))
        batches = image_batches(data.images["train"], source, params.train.augment, gen)
        y = torch.as_tensor(data.labels["train"])
        n_train = len(y)
        order = torch.randperm(n_train, generator=gen).numpy()  # seeded: the timed subset is a random sample
        strategy.set_train_mode(model)

        n_timed = n_train if finetune_images is None else min(finetune_images, n_train)
        if finetune_images is not None:
            # Warm-up: the first step allocates; a full epoch amortises that, a small sample does not.
            _train_step(model, opt, batches, y, order[:bs])
        t = time.perf_counter()
        for i in range(0, n_timed, bs):
            _train_step(model, opt, batches, y, order[i : min(i + bs, n_timed)])
        t_epoch = (time.perf_counter() - t) * n_train / n_timed
        t_feat, t_ft = times["train"], t_epoch * epochs
        total_score += t_feat + t_est
        total_ft += t_ft
        rows.append(
            {
                "candidate": name,
                "forward_s": t_feat,
                "estimators_s": t_est,
                "cache_s": sum(times.values()) if set(SPLITS) <= set(times) else None,
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
    p.add_argument("--finetune-images", type=int, default=None, help="time fine-tuning on this many (default: all)")
    p.add_argument("--cache", action="store_true", help="also time the forward pass over val and test (cache_s)")
    p.add_argument("--metrics", default="metrics/train", help="where train@finetune_full's metrics are")
    p.add_argument("--perf", default="perf/train", help="where train@finetune_full's timings are")
    args = p.parse_args()

    import torch

    from transferlab.config import load_params
    from transferlab.data.splits import load_prepared

    params = load_params(args.params)
    data = synthetic_data(params) if args.synthetic else load_prepared(args.prepared)
    names = args.sources.split(",") if args.sources else sorted(params.sources)
    epochs, where = protocol_epochs(params, args.metrics)
    print(
        f"threads={torch.get_num_threads()} train={len(data.labels['train'])} images "
        f"size={data.images['train'].shape[1]} fine-tuning epochs={epochs} ({where})"
    )
    result = measure(
        params,
        data,
        names,
        splits=None if args.cache else ("train",),
        finetune_images=args.finetune_images,
        epochs=epochs,
    )
    print(
        f"{'candidate':20s} {'forward_s':>9s} {'estimators_s':>12s} {'cache_s':>8s} {'epoch_s':>8s} "
        f"{'finetune_s':>10s} {'ratio':>7s}"
    )
    for r in result["rows"]:
        cache = f"{r['cache_s']:8.1f}" if r["cache_s"] is not None else f"{'-':>8s}"
        print(
            f"{r['candidate']:20s} {r['forward_s']:9.1f} {r['estimators_s']:12.1f} {cache} "
            f"{r['epoch_s']:8.1f} {r['finetune_s']:10.1f} {r['ratio']:7.1%}"
        )
    print(
        f"{'all candidates':20s} scoring {result['scoring_s']:.1f} s vs fine-tuning {result['finetune_s']:.1f} s "
        f"(= {result['epochs']} x one measured epoch each): ratio {result['ratio']:.1%}"
    )
    check = pipeline_epoch_seconds(args.metrics, args.perf)
    if check:
        print(
            f"pipeline's own measurement: {check['epoch_s']:.1f} s per epoch of {check['source']} "
            f"({check['epochs']} epochs)"
        )


if __name__ == "__main__":
    main()

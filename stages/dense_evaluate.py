"""Stage `dense-evaluate@<strategy>` (detection/pipeline.yaml, opt-in): each seed's model on the test split.

Detection: COCO mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP (pycocotools' COCOeval); the test
boxes per image and seed go to `--predictions`/boxes.json. Segmentation: mean IoU and per-class IoU; the per-image
confusion matrices (and the predicted masks of the report's figure images) go to `--predictions`/confusion.npy
and figure_masks.npy. The per-image records are what the report's bootstrap over test images resamples.
"""

from __future__ import annotations

import logging

from stages._common import params_or_exit, parser, run_main

log = logging.getLogger("transferlab.dense_evaluate")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--strategy", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--models", required=True, help="dense-train@'s folder")
    p.add_argument("--predictions", required=True, help="folder of per-image test predictions")
    p.add_argument("--metrics", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp = params.dense

    from pathlib import Path

    import numpy as np
    import torch

    from transferlab.core.io import read_json, write_json, write_npy
    from transferlab.core.seeding import seed_everything
    from transferlab.data.dense import load_dense
    from transferlab.evaluation import dense_metrics as dm
    from transferlab.strategies.dense import DENSE_STRATEGIES, dense_strategy_config
    from transferlab.training.dense import Batches, load_dense_model, predict

    seed_everything(params.seed, params.train.num_threads)
    folder = Path(args.models)
    meta = read_json(folder / "meta.json")
    cfg = dense_strategy_config(args.strategy, meta["config"], meta["task"])
    strategy = DENSE_STRATEGIES[cfg.kind]
    splits, classes = load_dense(args.prepared, ("test",))
    test = splits["test"]
    c = len(classes)
    data = Batches(test, meta["task"], c, tuple(meta["mean"]), tuple(meta["std"]))
    per_seed, boxes, confusions, masks = {}, {}, [], []
    for seed in meta["seeds"]:
        state = torch.load(folder / f"seed{seed}.pt", map_location="cpu", weights_only=True)
        model = load_dense_model(meta, state, strategy, cfg)
        preds, loss = predict(model, data, dp.batch_size, dp.max_detections)
        if meta["task"] == "detection":
            r = dm.coco_map(preds, test.objects, classes)
            exact = dm.map_from_matches(dm.match_detections(preds, test.objects, c))
            # The bootstrap's own computation (per-image matching) must give pycocotools' number; recorded, and
            # a difference beyond float32 rounding is logged (tests/test_dense.py checks the two agree).
            diff = abs(exact["map"] - r["map"])
            if diff > 1e-4:
                log.warning(
                    "%s seed %s: mAP %.6f (per-image matching) vs %.6f (pycocotools)",
                    args.strategy,
                    seed,
                    exact["map"],
                    r["map"],
                )
            per_seed[str(seed)] = {
                **{k: round(v, 6) for k, v in r.items() if k != "ap_per_class"},
                "ap_per_class": {k: None if v is None else round(v, 6) for k, v in r["ap_per_class"].items()},
                "test_loss": round(loss, 6),
                "map_per_image_matching_abs_diff": round(diff, 8),
            }
            boxes[str(seed)] = [
                {
                    "image_id": i,
                    "boxes": q["boxes"].tolist(),
                    "scores": q["scores"].tolist(),
                    "labels": q["labels"].tolist(),
                }
                for i, q in zip(test.image_ids, preds, strict=True)
            ]
        else:
            cm = dm.confusion_per_image(np.stack(preds), test.masks, c + 1)
            r = dm.iou_from_confusion(cm.sum(0))
            names = ["background", *classes]
            per_seed[str(seed)] = {
                "mean_iou": round(r["mean_iou"], 6),
                "iou_per_class": {
                    n: None if v is None else round(v, 6) for n, v in zip(names, r["iou_per_label"], strict=True)
                },
                "test_loss": round(loss, 6),
            }
            confusions.append(cm)
            masks.append(np.stack(preds[: dp.figure_images]))
    if meta["task"] == "detection":
        write_json(Path(args.predictions) / "boxes.json", {"class_names": classes, "per_seed": boxes})
        keys = ("map", "map_50", "map_75")
    else:
        out = Path(args.predictions)
        write_npy(out / "confusion.npy", np.stack(confusions))
        write_npy(out / "figure_masks.npy", np.stack(masks))
        keys = ("mean_iou",)
    mean = {f"{k}_mean": round(float(np.mean([v[k] for v in per_seed.values()])), 6) for k in keys}
    write_json(
        args.metrics,
        {"task": meta["task"], "strategy": args.strategy, "test_images": len(test), **mean, "per_seed": per_seed},
    )


if __name__ == "__main__":
    run_main(main)

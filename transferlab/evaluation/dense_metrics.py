"""Metrics of the dense tasks, per image so that intervals can resample test images.

Detection: COCO mAP@[.5:.95], mAP@.5 and per-class AP, reported from pycocotools' COCOeval (the reference
implementation; `coco_map`), with torchmetrics' `MeanAveragePrecision` as a second opinion in the tests. For the
bootstrap, `match_detections` does COCO's per-image step once (each image's detections matched greedily by score
to its ground truth at each IoU threshold, exactly pycocotools' `evaluateImg` for area "all", at most 100
detections per image and class), and `map_from_matches` does its accumulation step (precision envelope, 101
recall points) for any multiset of images. Because COCO matching never looks across images, a resample of test
images is the resample of these per-image records: mAP is recomputed exactly per replicate, with no
approximation by per-image AP. `map_from_matches` on all images equals pycocotools' number (tests/test_dense.py
checks it against pycocotools and torchmetrics; `dense-evaluate@` records the difference).

Segmentation: per-image confusion matrices over background + classes; IoU per class = TP / (TP + FP + FN) of
their sum, mean IoU over the classes present in truth or prediction (a class absent from both is not averaged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from transferlab.evaluation.stats import seed_component, widened_interval

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 10 thresholds
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100


def _xywh_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(D, G) IoU of boxes in [x, y, w, h]."""
    if len(d) == 0 or len(g) == 0:
        return np.zeros((len(d), len(g)))
    dx1, dy1 = d[:, 0] + d[:, 2], d[:, 1] + d[:, 3]
    gx1, gy1 = g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    iw = np.clip(np.minimum(dx1[:, None], gx1[None]) - np.maximum(d[:, None, 0], g[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(dy1[:, None], gy1[None]) - np.maximum(d[:, None, 1], g[None, :, 1]), 0, None)
    inter = iw * ih
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None] - inter
    return inter / union


@dataclass
class Matches:
    """COCO's per-image matching of one model's detections, for every class.

    Per class c: `scores[c]` (M,), `image[c]` (M,) the image of each detection, `tp[c]` (T, M) bool at each IoU
    threshold, sorted by descending score (stable); `gt_count` (N, C) ground-truth objects per image and class.
    """

    scores: list[np.ndarray]
    image: list[np.ndarray]
    tp: list[np.ndarray]
    gt_count: np.ndarray


def match_detections(
    preds: list[dict[str, np.ndarray]], targets: list[list[dict[str, Any]]], num_classes: int
) -> Matches:
    """COCO's `evaluateImg` (area all, maxDets 100, no crowd) for every image and class.

    Args:
        preds: per image {"boxes": (K, 4) xywh, "scores": (K,), "labels": (K,)}.
        targets: per image its objects {"category", "bbox": [x, y, w, h]}.
        num_classes: C.
    """
    n = len(targets)
    gt_count = np.zeros((n, num_classes), np.int64)
    rec: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
    for i, (p, objs) in enumerate(zip(preds, targets, strict=True)):
        gboxes = np.asarray([o["bbox"] for o in objs], np.float64).reshape(-1, 4)
        gcats = np.asarray([o["category"] for o in objs], np.int64)
        for c in range(num_classes):
            g = gboxes[gcats == c]
            gt_count[i, c] = len(g)
            sel = np.flatnonzero(np.asarray(p["labels"]) == c)
            if len(sel) == 0:
                continue
            order = np.argsort(-np.asarray(p["scores"])[sel], kind="mergesort")[:MAX_DETS]
            d = np.asarray(p["boxes"], np.float64)[sel][order]
            s = np.asarray(p["scores"], np.float64)[sel][order]
            ious = _xywh_iou(d, g)
            tp = np.zeros((len(IOU_THRESHOLDS), len(d)), bool)
            for t, thr in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(g), bool)
                for j in range(len(d)):
                    best, m = min(thr, 1 - 1e-10), -1
                    for k in range(len(g)):
                        if taken[k] or ious[j, k] < best:
                            continue
                        best, m = ious[j, k], k
                    if m >= 0:
                        taken[m] = True
                        tp[t, j] = True
            rec[c].append((s, np.full(len(s), i), tp))
    scores, image, tps = [], [], []
    for c in range(num_classes):
        if rec[c]:
            s = np.concatenate([r[0] for r in rec[c]])
            im = np.concatenate([r[1] for r in rec[c]])
            tp = np.concatenate([r[2] for r in rec[c]], axis=1)
        else:
            s, im, tp = np.zeros(0), np.zeros(0, np.int64), np.zeros((len(IOU_THRESHOLDS), 0), bool)
        order = np.argsort(-s, kind="mergesort")
        scores.append(s[order])
        image.append(im[order])
        tps.append(tp[:, order])
    return Matches(scores, image, tps, gt_count)


def _ap(tp: np.ndarray, weight: np.ndarray, n_gt: float) -> np.ndarray:
    """AP at each IoU threshold (T,) of detections sorted by score, each counted `weight` times."""
    tp_sum = np.cumsum(tp * weight, axis=1, dtype=np.float64)
    fp_sum = np.cumsum(~tp * weight, axis=1, dtype=np.float64)
    out = np.zeros(len(tp))
    keep = weight > 0  # a detection of an image not drawn is not a point of the curve
    for t in range(len(tp)):
        tps, fps = tp_sum[t][keep], fp_sum[t][keep]
        if len(tps) == 0:
            continue
        rc = tps / n_gt
        pr = tps / (tps + fps + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # the precision envelope
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0)
        out[t] = q.mean()
    return out


def map_from_matches(m: Matches, counts: np.ndarray | None = None) -> dict[str, Any]:
    """COCO mAP of the images counted `counts` times each (default: every image once).

    Returns:
        {"map": mAP@[.5:.95], "map_50", "map_75", "ap_per_class": [AP@[.5:.95] or None for a class without
        ground truth]}; the means are over classes with ground truth (COCO's -1 entries left out).
    """
    n = len(m.gt_count)
    counts = np.ones(n) if counts is None else np.asarray(counts, np.float64)
    per_class = []
    for c in range(len(m.scores)):
        n_gt = float((m.gt_count[:, c] * counts).sum())
        if n_gt == 0:
            per_class.append(None)
            continue
        per_class.append(_ap(m.tp[c], counts[m.image[c]], n_gt))
    valid = [a for a in per_class if a is not None]
    if not valid:
        return {"map": float("nan"), "map_50": float("nan"), "map_75": float("nan"), "ap_per_class": per_class}
    stack = np.stack(valid)
    return {
        "map": float(stack.mean()),
        "map_50": float(stack[:, 0].mean()),
        "map_75": float(stack[:, 5].mean()),
        "ap_per_class": [None if a is None else float(a.mean()) for a in per_class],
    }


def coco_map(
    preds: list[dict[str, np.ndarray]], targets: list[list[dict[str, Any]]], class_names: list[str]
) -> dict[str, Any]:
    """mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP from pycocotools' COCOeval (the reference implementation).

    Not through torchmetrics' `MeanAveragePrecision`: measured on this pipeline's detections (1,280 boxes, many
    partly outside the image), its pycocotools backend gave 0.11343 where pycocotools itself and
    `map_from_matches` gave 0.11358 (one class's AP differed; not traced further).
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt: dict[str, Any] = {
        "images": [{"id": i} for i in range(len(targets))],
        "categories": [{"id": c} for c in range(len(class_names))],
        "annotations": [],
    }
    for i, objs in enumerate(targets):
        for o in objs:
            x, y, w, h = (float(v) for v in o["bbox"])
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": int(o["category"]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    dets = [
        {"image_id": i, "category_id": int(lab), "bbox": [float(v) for v in box], "score": float(score)}
        for i, p in enumerate(preds)
        for box, lab, score in zip(np.asarray(p["boxes"]).reshape(-1, 4), p["labels"], p["scores"], strict=True)
    ]
    has_gt = [any(o["category"] == c for objs in targets for o in objs) for c in range(len(class_names))]
    if not dets:
        zero = {n: (0.0 if g else None) for n, g in zip(class_names, has_gt, strict=True)}
        value = 0.0 if any(has_gt) else float("nan")
        return {"map": value, "map_50": value, "map_75": value, "ap_per_class": zero}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.params.catIds = list(range(len(class_names)))
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area "all", maxDets 100

    def mean(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else float("nan")

    per = {n: (None if not (prec[:, :, k] > -1).any() else mean(prec[:, :, k])) for k, n in enumerate(class_names)}
    return {"map": mean(prec), "map_50": mean(prec[0]), "map_75": mean(prec[5]), "ap_per_class": per}


def torchmetrics_map(
    preds: list[dict[str, np.ndarray]], targets: list[list[dict[str, Any]]], class_names: list[str]
) -> dict[str, Any]:
    """The same numbers from torchmetrics' `MeanAveragePrecision` (pycocotools backend): a second opinion for
    the tests, on boxes inside the image."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xywh", iou_type="bbox", class_metrics=True, backend="pycocotools")
    metric.update(
        [
            {
                "boxes": torch.as_tensor(np.asarray(p["boxes"], np.float64)).reshape(-1, 4),
                "scores": torch.as_tensor(np.asarray(p["scores"], np.float64)),
                "labels": torch.as_tensor(np.asarray(p["labels"], np.int64)),
            }
            for p in preds
        ],
        [
            {
                "boxes": torch.as_tensor(np.asarray([o["bbox"] for o in t], np.float64)).reshape(-1, 4),
                "labels": torch.as_tensor(np.asarray([o["category"] for o in t], np.int64)),
            }
            for t in targets
        ],
    )
    r = metric.compute()
    per = {int(c): float(v) for c, v in zip(r["classes"].reshape(-1), r["map_per_class"].reshape(-1), strict=True)}
    return {
        "map": float(r["map"]),
        "map_50": float(r["map_50"]),
        "map_75": float(r["map_75"]),
        "ap_per_class": {name: (per.get(c) if per.get(c, -1) >= 0 else None) for c, name in enumerate(class_names)},
    }


def confusion_per_image(pred: np.ndarray, true: np.ndarray, num_labels: int) -> np.ndarray:
    """(N, L, L) confusion matrices, [true, predicted], of (N, H, W) label masks (L = background + classes)."""
    n = len(true)
    flat = (true.reshape(n, -1).astype(np.int64) * num_labels + pred.reshape(n, -1)).astype(np.int64)
    out = np.stack([np.bincount(f, minlength=num_labels * num_labels) for f in flat])
    return out.reshape(n, num_labels, num_labels)


def iou_from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """Per-label IoU (None where a label is in neither truth nor prediction) and their mean, of a summed (L, L)
    confusion matrix."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    per = [None if u == 0 else float(t / u) for t, u in zip(tp, union, strict=True)]
    vals = [v for v in per if v is not None]
    return {"mean_iou": float(np.mean(vals)) if vals else float("nan"), "iou_per_label": per}


def bootstrap_gain(
    per_seed_a: list[Any],
    per_seed_b: list[Any],
    metric: Any,
    n_images: int,
    *,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Gain of A over B (seed-averaged metric), with an interval over test images and training seeds.

    The same construction as `evaluation.stats.paired_bootstrap_gain` (method "seed_t"): test images resampled
    with replacement, the same draw for both models and every seed kept in every replicate (each model's
    replicate = the mean over its seeds of the metric recomputed on the drawn images); then the Student-t seed
    term (`stats.seed_component`, `stats.widened_interval`). Here the metric is not a mean over images, so it is
    recomputed per replicate by `metric(record, counts)`: `counts` (n_images,) how often each image was drawn.

    Args:
        per_seed_a, per_seed_b: one per-image record per seed (`Matches`, or (N, L, L) confusions).
        metric: record, counts -> float.
        n_images, n_bootstrap, confidence, seed: as named.
    """
    ones = np.ones(n_images)
    va = np.array([metric(r, ones) for r in per_seed_a])
    vb = np.array([metric(r, ones) for r in per_seed_b])
    gain = float(va.mean() - vb.mean())
    rng = np.random.default_rng(seed)
    reps = np.empty(n_bootstrap)
    for r in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64)
        reps[r] = np.mean([metric(x, counts) for x in per_seed_a]) - np.mean([metric(x, counts) for x in per_seed_b])
    se, df = seed_component(va, vb)
    low, high, prob = widened_interval(reps, se, df, confidence)
    return {
        "gain": gain,
        "ci_low": float(low),
        "ci_high": float(high),
        "prob_gain_le_0": prob,
        "per_seed_a": [float(v) for v in va],
        "per_seed_b": [float(v) for v in vb],
        "seed_se": se,
        "seed_df": df,
        "bootstrap_se": float(np.std(reps, ddof=1)),
        "covers_seed_variance": bool(len(va) > 1 and len(vb) > 1),
    }


def map_metric(m: Matches, counts: np.ndarray) -> float:
    """mAP@[.5:.95] of a resample (`bootstrap_gain`'s metric for detection)."""
    return map_from_matches(m, counts)["map"]


def miou_metric(cm: np.ndarray, counts: np.ndarray) -> float:
    """Mean IoU of a resample (`bootstrap_gain`'s metric for segmentation)."""
    return iou_from_confusion(np.tensordot(counts, cm, axes=1))["mean_iou"]


def val_score_fn(task: str, num_classes: int) -> Any:
    """The validation score of `training.dense` (checkpoint and rate choice): mAP@[.5:.95] (detection, the
    exact COCO computation of `map_from_matches`) or mean IoU (segmentation)."""

    def detection(preds: list, split: Any) -> float:
        value = map_from_matches(match_detections(preds, split.objects, num_classes))["map"]
        return 0.0 if np.isnan(value) else value

    def segmentation(preds: list, split: Any) -> float:
        cm = confusion_per_image(np.stack(preds), split.masks, num_classes + 1).sum(0)
        return iou_from_confusion(cm)["mean_iou"]

    return detection if task == "detection" else segmentation


NOT_APPLICABLE_CHECKS = {
    "raw_pixel_logreg baseline": "a classifier of whole images; a dense task has no classical pixel baseline here",
    "score / agreement (LogME, LEEP, NCE, H-score, SFDA, kNN)": "transferability estimators of image labels",
    "bn_domain_shift, resolution, forgetting, lr sweep (diagnose)": "measured on the classification models only",
    "equal-compute comparison": "FLOPs per training image are not counted for dense models",
    "calibration / accuracy / macro-F1": "classification metrics; mAP and IoU replace them",
}


def dense_summary(
    task: str,
    class_names: list[str],
    train: dict[str, dict],
    test: dict[str, dict],
    records: dict[str, list[Any]],
    *,
    baseline: str,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """The comparison of the dense strategies.

    Args:
        task: detection | segmentation.
        class_names: the classes.
        train: strategy -> its training record (validation scores: the only input of the recommendation).
        test: strategy -> its test metrics.
        records: strategy -> per-seed per-image records (`Matches` or (N, L, L) confusions), seeds in the same
            order as `test[s]["per_seed"]`.
        baseline: the strategy compared against (scratch).
        n_bootstrap, confidence, seed: of `bootstrap_gain`.

    Returns:
        {"metric", "strategies": {s: test mean, val score, under-trained}, "gain_vs_<baseline>": {s: interval,
        verdict}, "recommendation": chosen on validation, "negative_transfer": [...], "not_applicable": {...}}.
    """
    metric_name = "map" if task == "detection" else "mean_iou"
    metric = map_metric if task == "detection" else miou_metric
    n_images = (
        int(next(iter(records.values()))[0].gt_count.shape[0])
        if task == "detection"
        else int(next(iter(records.values()))[0].shape[0])
    )
    rows = {}
    for s in sorted(test):
        rows[s] = {
            f"test_{metric_name}": test[s][f"{metric_name}_mean"],
            f"test_{metric_name}_per_seed": {k: v[metric_name] for k, v in test[s]["per_seed"].items()},
            f"val_{metric_name}": train[s]["val_score_mean"],
            "lr": train[s]["lr"],
            "epochs": train[s]["epochs"],
            "under_trained": train[s]["under_trained"],
            "final_train_score": {k: v["final_train_score"] for k, v in train[s]["per_seed"].items()},
            "final_train_loss": {k: v["final_train_loss"] for k, v in train[s]["per_seed"].items()},
        }
        if task == "detection":
            rows[s]["test_map_50"] = test[s]["map_50_mean"]
    gains, negative = {}, []
    for s in sorted(test):
        if s == baseline or baseline not in records:
            continue
        g = bootstrap_gain(
            records[s], records[baseline], metric, n_images, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed
        )
        fair = not (train[s]["under_trained"] or train[baseline]["under_trained"])
        if not fair:
            verdict = "no verdict: under-trained run(s)"
        elif g["ci_low"] > 0:
            verdict = "transfer helps"
        elif g["ci_high"] < 0:
            verdict = "negative transfer"
            negative.append(s)
        else:
            verdict = "no clear difference"
        gains[s] = {**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in g.items()}, "verdict": verdict}
    best = max(sorted(train), key=lambda s: train[s]["val_score_mean"])
    return {
        "task": task,
        "metric": metric_name,
        "class_names": class_names,
        "test_images": n_images,
        "strategies": rows,
        f"gain_vs_{baseline}": gains,
        "interval": (
            f"{confidence:.0%} interval over test images (bootstrap, {n_bootstrap} resamples, {metric_name} recomputed "
            "per resample) and training seeds (Student-t seed term, evaluation.stats.seed_component)"
        ),
        "recommendation": {
            "strategy": best,
            "chosen_on": f"validation {metric_name} (mean over seeds)",
            f"val_{metric_name}": train[best]["val_score_mean"],
        },
        "negative_transfer": negative,
        "negative_transfer_rule": f"the gain vs {baseline}'s interval lies wholly below 0",
        "not_applicable": NOT_APPLICABLE_CHECKS,
    }

"""The dense tasks (detection, segmentation): metrics on hand-made cases, the scene generator's exact ground
truth, the COCO loader's checks, params validation of dense strategies, and a tiny `dvc repro` of the opt-in
detection/pipeline.yaml."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from transferlab.config import parse_params
from transferlab.evaluation import dense_metrics as dm
from transferlab.params import DenseDataParams, ParamsError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def _det(boxes, labels, scores=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": np.asarray(labels, np.int64),
        "scores": np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, len(boxes)), float),
    }


def _both(preds, targets):
    """mAP by the per-image matching (the bootstrap's), by pycocotools' COCOeval (reported) and by torchmetrics;
    they must agree."""
    ours = dm.map_from_matches(dm.match_detections(preds, targets, len(CLASSES)))
    ref = dm.coco_map(preds, targets, CLASSES)
    tm = dm.torchmetrics_map(preds, targets, CLASSES)
    for k in ("map", "map_50", "map_75"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
        assert tm[k] == pytest.approx(ref[k], abs=1e-6), k
    assert [ref["ap_per_class"][c] for c in CLASSES] == pytest.approx(ours["ap_per_class"], abs=1e-9)
    return ref, ours


# --- detection: mAP ----------------------------------------------------------------------------------------


def test_perfect_predictions_score_map_one():
    targets = [
        [{"category": 0, "bbox": [2, 3, 10, 12]}, {"category": 1, "bbox": [30, 30, 20, 8]}],
        [{"category": 2, "bbox": [5, 5, 25, 25]}],
    ]
    preds = [_det([o["bbox"] for o in t], [o["category"] for o in t]) for t in targets]
    ref, _ = _both(preds, targets)
    assert ref["map"] == pytest.approx(1.0) and ref["map_50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in ref["ap_per_class"].values())


def test_a_box_at_iou_two_thirds_hits_at_half_and_misses_at_075():
    # Shifted 2 px right: intersection 8 x 10 = 80, union 120, IoU 2/3. A hit at thresholds .50 .55 .60 .65
    # (4 of COCO's 10), a miss from .70 on: mAP@[.5:.95] = 4 / 10 = 0.4 by hand.
    targets = [[{"category": 0, "bbox": [10, 10, 10, 10]}]]
    preds = [_det([[12, 10, 10, 10]], [0], [0.9])]
    ref, _ = _both(preds, targets)
    assert ref["map_50"] == pytest.approx(1.0)
    assert ref["map_75"] == pytest.approx(0.0)
    assert ref["map"] == pytest.approx(0.4)


def test_a_missing_class_scores_zero_and_a_class_without_truth_is_not_averaged():
    targets = [[{"category": 0, "bbox": [0, 0, 10, 10]}, {"category": 1, "bbox": [20, 20, 10, 10]}]]
    preds = [_det([[0, 0, 10, 10]], [0])]  # class 1 never predicted; class 2 in neither
    ref, ours = _both(preds, targets)
    assert ref["ap_per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.0), "c": None}
    assert ref["map"] == pytest.approx(0.5)  # mean over the two classes with ground truth
    assert ours["ap_per_class"][2] is None


def test_random_detections_match_pycocotools_and_resampling_all_images_once_changes_nothing():
    rng = np.random.default_rng(0)
    targets, preds = [], []
    for _ in range(25):
        objs = [
            {
                "category": int(rng.integers(3)),
                "bbox": [*rng.uniform(0, 40, 2).tolist(), *rng.uniform(5, 20, 2).tolist()],
            }
            for _ in range(rng.integers(0, 4))
        ]
        targets.append(objs)
        boxes = [np.asarray(o["bbox"]) + rng.normal(0, 1.5, 4) * [1, 1, 0.3, 0.3] for o in objs]
        boxes += [np.r_[rng.uniform(0, 40, 2), rng.uniform(5, 20, 2)] for _ in range(rng.integers(0, 3))]
        labels = [o["category"] for o in objs] + [int(rng.integers(3)) for _ in range(len(boxes) - len(objs))]
        preds.append(_det(boxes, labels, rng.random(len(boxes))))
    ref, ours = _both(preds, targets)
    assert 0.05 < ref["map"] < 0.95
    m = dm.match_detections(preds, targets, 3)
    # Drawing image 0 twice and image 1 never is the same as a data set listing image 0 twice.
    counts = np.ones(25)
    counts[0], counts[1] = 2, 0
    doubled = [preds[0], *preds[2:], preds[0]]
    tdoubled = [targets[0], *targets[2:], targets[0]]
    assert dm.map_metric(m, counts) == pytest.approx(dm.coco_map(doubled, tdoubled, CLASSES)["map"], abs=1e-9)


def test_boxes_partly_outside_the_image_match_pycocotools_exactly():
    """The pipeline's detections stick out of the image (a centre near the border, its size): the case where
    torchmetrics' wrapper drifted from pycocotools (coco_map's docstring)."""
    rng = np.random.default_rng(7)
    targets, preds = [], []
    for _ in range(40):
        objs = [
            {
                "category": int(rng.integers(3)),
                "bbox": [*rng.uniform(0, 44, 2).tolist(), *rng.uniform(6, 20, 2).tolist()],
            }
            for _ in range(rng.integers(1, 4))
        ]
        targets.append(objs)
        boxes = np.c_[rng.uniform(-8, 60, (20, 2)), rng.uniform(2, 30, (20, 2))]
        for k, o in enumerate(objs):
            boxes[k] = np.asarray(o["bbox"]) + rng.normal(0, 2, 4)
        preds.append(_det(boxes, rng.integers(0, 3, 20), rng.random(20)))
    ours = dm.map_from_matches(dm.match_detections(preds, targets, 3))
    ref = dm.coco_map(preds, targets, CLASSES)
    assert ours["map"] == pytest.approx(ref["map"], abs=1e-9) and ours["map_50"] == pytest.approx(
        ref["map_50"], abs=1e-9
    )


# --- segmentation: IoU -------------------------------------------------------------------------------------


def test_mean_iou_of_a_hand_made_mask_pair():
    true = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]]])
    pred = np.array([[[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]]])
    # background: TP 7, FP (pred 0, true 2) 2, FN (true 0, pred 1) 1 -> 7/10; class 1: 4/5; class 2: 2/4.
    r = dm.iou_from_confusion(dm.confusion_per_image(pred, true, 3).sum(0))
    assert r["iou_per_label"] == pytest.approx([0.7, 0.8, 0.5])
    assert r["mean_iou"] == pytest.approx((0.7 + 0.8 + 0.5) / 3)
    import torch
    from torchmetrics.classification import MulticlassJaccardIndex

    ref = MulticlassJaccardIndex(num_classes=3, average="macro")(torch.as_tensor(pred), torch.as_tensor(true))
    assert float(ref) == pytest.approx(r["mean_iou"])


def test_bootstrap_gain_is_zero_for_identical_models_and_positive_for_a_better_one():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, (20, 8, 8))
    good = np.where(rng.random(true.shape) < 0.9, true, 0)
    bad = np.where(rng.random(true.shape) < 0.5, true, 0)
    cm = lambda p: dm.confusion_per_image(p, true, 3)  # noqa: E731
    same = dm.bootstrap_gain([cm(good)], [cm(good)], dm.miou_metric, 20, n_bootstrap=50, confidence=0.95, seed=0)
    assert same["gain"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    better = dm.bootstrap_gain([cm(good)], [cm(bad)], dm.miou_metric, 20, n_bootstrap=50, confidence=0.95, seed=0)
    assert better["ci_low"] > 0 and better["gain"] > better["ci_low"]


# --- the scene generator -----------------------------------------------------------------------------------


def test_scene_boxes_and_masks_match_the_pixels():
    from PIL import Image

    from transferlab.data.scenes import ITEM_THRESHOLD, make_scene

    rng = np.random.default_rng(3)
    items = np.zeros((6, 28, 28), np.uint8)
    for k in range(6):  # solid rectangles of different shapes: the painted pixels are known exactly
        items[k, 2 + k : 20 + k, 4:24] = 200
    pool = {0: np.array([0, 1, 2]), 1: np.array([3, 4, 5])}
    seen = 0
    for _ in range(30):
        s = make_scene(rng, items, pool, [0, 1], size=64, max_objects=4, item_sizes=(20, 28), min_visible_pixels=40)
        owner = np.full((64, 64), -1)
        for k, (m, box) in enumerate(zip(s.masks, s.boxes, strict=True)):
            ys, xs = np.nonzero(m)
            assert box == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]  # box = mask's bbox
            assert m.sum() >= 40
            assert (owner[m] == -1).all()  # masks are disjoint (occlusion resolved)
            owner[m] = k
            # mask pixels carry the item's colour: the painted value (>= threshold x min tint), never background
            assert (s.image[m].max(axis=1) >= int(ITEM_THRESHOLD * 0.6)).all()
        seen += len(s.masks) + s.dropped
    assert seen > 30
    # one item alone: its mask is exactly the resized item's pixels at or above the threshold, at its place
    rng = np.random.default_rng(5)
    s = make_scene(
        rng, items, {0: np.array([2])}, [0], size=64, max_objects=1, item_sizes=(24, 24), min_visible_pixels=1
    )
    x, y, w, h = (int(v) for v in s.boxes[0])
    resized = np.asarray(Image.fromarray(items[2]).resize((24, 24), Image.BILINEAR)) >= ITEM_THRESHOLD
    ys, xs = np.nonzero(resized)
    expect = np.zeros((64, 64), bool)
    expect[y - ys.min() + ys, x - xs.min() + xs] = True
    assert (s.masks[0] == expect).all()


def test_scene_splits_use_disjoint_item_images():
    from transferlab.data.scenes import item_pools

    labels = np.repeat(np.arange(3), 50)
    pools = item_pools(labels, [0, 2], seed=1)
    for c in (0, 2):
        sets = [set(pools[s][c]) for s in ("train", "val", "test")]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert all((labels[list(x)] == c).all() for x in sets)


# --- COCO ----------------------------------------------------------------------------------------------------


def _coco(tmp_path: Path, annotations: list[dict], n_images: int = 10) -> DenseDataParams:
    from PIL import Image

    (tmp_path / "img").mkdir()
    images = []
    for i in range(n_images):
        Image.fromarray(np.full((40, 50, 3), i * 10, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 50, "height": 40})
    coco = {
        "images": images,
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": annotations,
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return DenseDataParams(kind="coco", images=str(tmp_path / "img"), annotations=str(tmp_path / "ann.json"))


def _good(i: int, cat: int = 7) -> dict:
    return {
        "id": i,
        "image_id": i % 10,
        "category_id": cat,
        "bbox": [5, 5, 20, 10],
        "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]],
    }


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"bbox": [40, 5, 20, 10]}, "outside its 50x40 image"),
        ({"bbox": [5, 5, 0, 10]}, "non-positive size"),
        ({"category_id": 3}, "unknown category_id 3"),
        ({"segmentation": [[5, 5, 5, 5, 5, 5]]}, "empty mask"),
    ],
)
def test_bad_coco_annotations_raise_a_clear_error_or_are_dropped_under_the_cap(tmp_path, bad, reason):
    from transferlab.data.coco import CocoError, load_coco

    anns = [_good(i, 7 if i % 2 else 9) for i in range(20)]
    anns[3] = {**anns[3], **bad}
    dp = _coco(tmp_path, anns)
    with pytest.raises(
        CocoError, match=rf"ann.json: 1 of 20 annotations are bad \(annotation id 3: .*{reason}.*max_bad_fraction"
    ):
        load_coco(dp, 32, seed=0, need_masks=True)
    splits, names, info = load_coco(dp.model_copy(update={"max_bad_fraction": 0.1}), 32, seed=0, need_masks=True)
    assert names == ["cat", "dog"] and info["bad_annotations_dropped"] == 1
    assert sum(len(o) for s in splits.values() for o in s.objects) == 19
    assert sum(len(s) for s in splits.values()) == 10


def test_coco_masks_and_boxes_are_scaled_to_the_image_size(tmp_path):
    from transferlab.data.coco import load_coco

    dp = _coco(tmp_path, [_good(i) for i in range(10)])
    splits, _, _ = load_coco(dp, 32, seed=0, need_masks=True)
    s = splits["train"]
    x, y, w, h = s.objects[0][0]["bbox"]
    assert (x, y, w, h) == pytest.approx((5 * 32 / 50, 5 * 32 / 40, 20 * 32 / 50, 10 * 32 / 40))
    ys, xs = np.nonzero(s.masks[0] == 1)  # category 7 -> class 0 -> mask value 1
    assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1


# --- params ----------------------------------------------------------------------------------------------------


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_classification_strategy_on_a_detection_task_is_refused_with_the_fix():
    raw = _params()
    raw["dense"]["strategies"]["linear_probe"] = {}
    with pytest.raises(
        ParamsError,
        match=r"dense.strategies.linear_probe: 'linear_probe' is a classification "
        r"strategy .* dense.task is 'detection': use one of \['finetune_full', 'finetune_top', "
        r"'head_only', 'lora', 'scratch'\]",
    ):
        parse_params(raw)


def test_unknown_dense_strategy_and_unknown_key_name_the_valid_ones():
    raw = _params()
    raw["dense"]["strategies"]["bogus"] = {}
    with pytest.raises(ParamsError, match=r"unknown dense strategy kind 'bogus' \(valid: \['finetune_full'"):
        parse_params(raw)
    raw = _params()
    raw["dense"]["strategies"]["head_only"]["rnak"] = 4
    with pytest.raises(ParamsError, match=r"dense.strategies.head_only.rnak: unknown key"):
        parse_params(raw)
    raw = _params()
    raw["dense"]["task"] = "classification"
    with pytest.raises(ParamsError, match=r"dense.task"):
        parse_params(raw)


def test_the_dense_strategies_declare_their_tasks_and_classification_ones_theirs():
    from transferlab.strategies import STRATEGIES
    from transferlab.strategies.dense import DENSE_STRATEGIES

    assert "dense" not in STRATEGIES  # the dense registry's module is not a classification strategy
    assert all(set(s.tasks) == {"detection", "segmentation"} for s in DENSE_STRATEGIES.values())
    assert STRATEGIES["linear_probe"].tasks == ("classification",)


# --- models ----------------------------------------------------------------------------------------------------


def test_the_encoder_gets_every_packaged_weight_and_lora_targets_pointwise_convs():
    import torch

    from transferlab.models.dense import build_dense_model, encoder_from_source
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.strategies.dense import DENSE_STRATEGIES

    src = load_source("efficientnet_lite0", SourceSpec(kind="packaged"))
    enc = encoder_from_source(src.arch, src, 0)
    full = src.model.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(v, full[k]), k
    model = build_dense_model(enc, "detection", 3, 16)
    lora = DENSE_STRATEGIES["lora"]
    cfg = lora.Config(kind="lora", rank=2)
    lora.adapt(model, cfg)
    lora.param_groups(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    assert trainable and all("lora_" in n and (".conv_pw." in n or ".conv_pwl." in n) for n in trainable)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out["heatmap"].shape == (2, 3, 16, 16) and not torch.isnan(out["size"]).any()


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_detection_pipeline_through_dvc_repro(tmp_path, monkeypatch):
    from test_stage_params import declared_params, read_records, undeclared_reads
    from tiny_repo import copy_project, init_repo, sh

    from stages._common import RECORD_ENV

    repo = copy_project(tmp_path / "repo")
    init_repo(repo)
    params = _params()
    params["dense"]["data"].update(train_images=16, val_images=6, test_images=8)
    params["dense"].update(
        epochs=1,
        lr_search_epochs=1,
        lr_grid=[1.0],
        seeds=[0, 1],
        n_bootstrap=50,
        batch_size=8,
        figure_images=2,
        strategies={"head_only": {}, "lora": {"rank": 2}, "scratch": {"epochs_factor": 2}},
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # what `make repro-detection` does
    shutil.copy(repo / "detection" / "pipeline.yaml", repo / "detection" / "dvc.yaml")
    record = tmp_path / "reads.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))  # every key a stage reads is recorded (tests/test_stage_params.py)
    sh(sys.executable, "-m", "dvc", "repro", "detection/dvc.yaml", cwd=repo)
    monkeypatch.delenv(RECORD_ENV)
    declared = declared_params(yaml.safe_load((repo / "detection" / "dvc.lock").read_text()))
    reads = {k.split(":")[-1]: v for k, v in read_records(record).items()}
    assert sorted(reads) == sorted(declared)
    assert not undeclared_reads(reads, declared), undeclared_reads(reads, declared)
    summary = json.loads((repo / "metrics/dense/detection/summary.json").read_text())
    assert set(summary["strategies"]) == {"head_only", "lora", "scratch"}
    assert set(summary["gain_vs_scratch"]) == {"head_only", "lora"}
    for g in summary["gain_vs_scratch"].values():
        assert g["ci_low"] <= g["gain"] <= g["ci_high"]
    assert summary["recommendation"]["strategy"] in summary["strategies"]
    train = json.loads((repo / "metrics/dense/detection/train/scratch.json").read_text())
    assert train["epochs"] == 2 and len(train["per_seed"]["0"]["history"]) == 2
    assert (repo / "plots/dense_detection.png").stat().st_size > 0
    assert "gain vs scratch" in (repo / "reports/dense_detection.md").read_text()
    status = sh(sys.executable, "-m", "dvc", "repro", "detection/dvc.yaml", cwd=repo)
    assert "Running stage" not in status, status

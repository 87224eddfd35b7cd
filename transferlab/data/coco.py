"""A user's dense data set in COCO format: an images folder and an annotations JSON.

Read: `images` (id, file_name, width, height), `categories` (id, name), `annotations` (image_id, category_id,
bbox [x, y, w, h] in pixels, and `segmentation` as polygons or RLE, decoded with pycocotools.mask). Every
annotation is checked: known image and category, a box of positive size inside its image, a non-empty mask when
one is given. Bad ones are counted and dropped up to `dense.data.max_bad_fraction` of all annotations; beyond it
`CocoError` names the file, the first bad annotations with their reason, and the fix.

Images are resized to a square of `dense.image_size` (boxes scaled, masks by nearest neighbour). Splits come from
`split_files` (file names, one a line) or a seeded split stratified by each image's most frequent category.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data.dense import DENSE_SPLITS, DenseSplit
from transferlab.data.loaders import DatasetError
from transferlab.params import DenseDataParams


class CocoError(DatasetError):
    """A COCO data set that cannot be used; the message names the file, the annotations and the fix."""


def _reason(ann: dict[str, Any], images: dict[int, dict], categories: dict[int, int]) -> str | None:
    """Why an annotation is bad, or None."""
    if ann.get("image_id") not in images:
        return f"unknown image_id {ann.get('image_id')!r}"
    if ann.get("category_id") not in categories:
        return f"unknown category_id {ann.get('category_id')!r} (categories: {sorted(categories)})"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return f"bbox {box!r} is not [x, y, w, h]"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"bbox {box} has a non-positive size"
    im = images[ann["image_id"]]
    tol = 1.0  # COCO exporters round boxes outwards by up to a pixel
    if x < -tol or y < -tol or x + w > im["width"] + tol or y + h > im["height"] + tol:
        return f"bbox {box} lies outside its {im['width']}x{im['height']} image"
    return None


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygon list, uncompressed or compressed RLE) as an (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def load_coco(
    dp: DenseDataParams, image_size: int, seed: int, need_masks: bool
) -> tuple[dict[str, DenseSplit], list[str], dict]:
    """The train / val / test splits of `dense.data` (kind coco).

    Args:
        dp: `dense.data`.
        image_size: the square side every image is resized to.
        seed: the split's seed (when there are no split files).
        need_masks: segmentation: every kept annotation must carry a `segmentation`.

    Returns:
        ({split: DenseSplit}, class names in category-id order, info: counts of bad and dropped annotations).

    Raises:
        CocoError: unreadable JSON, missing images, or more bad annotations than `max_bad_fraction`.
    """
    ann_path, img_dir = Path(str(dp.annotations)), Path(str(dp.images))
    try:
        coco = json.loads(ann_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CocoError(f"{ann_path}: cannot read the COCO annotations ({exc}); fix: dense.data.annotations") from None
    images = {im["id"]: im for im in coco.get("images", [])}
    cat_ids = sorted(c["id"] for c in coco.get("categories", []))
    if not images or not cat_ids:
        raise CocoError(f"{ann_path}: no `images` or no `categories`; a COCO file lists both")
    categories = {cid: k for k, cid in enumerate(cat_ids)}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = coco.get("annotations", [])
    bad: list[tuple[Any, str]] = []
    good: list[dict] = []
    for ann in anns:
        why = _reason(ann, images, categories)
        mask = None
        if why is None and (need_masks or "segmentation" in ann):
            im = images[ann["image_id"]]
            if "segmentation" not in ann:
                why = "no segmentation (dense.task segmentation needs masks)"
            else:
                try:
                    mask = decode_mask(ann["segmentation"], im["height"], im["width"])
                except Exception as exc:  # pycocotools raises TypeError/ValueError on malformed input
                    why = f"segmentation cannot be decoded ({type(exc).__name__}: {exc})"
                else:
                    if not mask.any():
                        why = "empty mask"
        if why is None:
            good.append({**ann, "_mask": mask})
        else:
            bad.append((ann.get("id"), why))
    if len(bad) > dp.max_bad_fraction * max(len(anns), 1):
        shown = "; ".join(f"annotation id {i}: {w}" for i, w in bad[:5])
        raise CocoError(
            f"{ann_path}: {len(bad)} of {len(anns)} annotations are bad ({shown}{' ...' if len(bad) > 5 else ''}). "
            f"Fix them or remove them from the file, or set dense.data.max_bad_fraction >= "
            f"{len(bad) / max(len(anns), 1):.3f} to drop them (counted in metrics/dense/data.json)"
        )
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for ann in good:
        by_image[ann["image_id"]].append(ann)
    order = sorted(images, key=lambda i: images[i]["file_name"])
    assignment = _split(order, images, by_image, categories, dp, seed, ann_path)
    splits = {}
    for split in DENSE_SPLITS:
        ids = [i for i in order if assignment[i] == split]
        if not ids:
            raise CocoError(f"{ann_path}: split '{split}' has no images; fix the split files or the fractions")
        splits[split] = _build(ids, images, by_image, categories, img_dir, image_size)
    info = {
        "kind": "coco",
        "annotations": len(anns),
        "bad_annotations_dropped": len(bad),
        "bad_examples": [f"id {i}: {w}" for i, w in bad[:20]],
    }
    return splits, [names[c] for c in cat_ids], info


def _split(order, images, by_image, categories, dp: DenseDataParams, seed: int, ann_path: Path) -> dict[int, str]:
    if dp.split_files is not None:
        by_name = {images[i]["file_name"]: i for i in order}
        out: dict[int, str] = {}
        for split, path in dp.split_files.items():
            for line in Path(path).read_text().splitlines():
                name = line.strip()
                if not name:
                    continue
                if name not in by_name:
                    raise CocoError(f"{path}: '{name}' is not an image of {ann_path}; fix dense.data.split_files")
                if by_name[name] in out:
                    raise CocoError(f"{path}: '{name}' is in two splits; every image belongs to one")
                out[by_name[name]] = split
        missing = [images[i]["file_name"] for i in order if i not in out]
        if missing:
            raise CocoError(f"dense.data.split_files: {len(missing)} images in no split (e.g. {missing[:3]})")
        return out
    # Stratified by each image's most frequent category (ties: the lowest id; no object: its own stratum).
    rng = np.random.default_rng(seed)
    strata: dict[int, list[int]] = {}
    for i in order:
        counts = Counter(categories[a["category_id"]] for a in by_image[i])
        key = min(counts, key=lambda c: (-counts[c], c)) if counts else -1
        strata.setdefault(key, []).append(i)
    out = {}
    for key in sorted(strata):
        ids = [strata[key][j] for j in rng.permutation(len(strata[key]))]
        n_val, n_test = round(len(ids) * dp.val_fraction), round(len(ids) * dp.test_fraction)
        for j, i in enumerate(ids):
            out[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return out


def _build(ids, images, by_image, categories, img_dir: Path, size: int) -> DenseSplit:
    arrays, masks, objects = [], [], []
    for i in ids:
        im = images[i]
        path = img_dir / im["file_name"]
        try:
            with Image.open(path) as pil:
                rgb = pil.convert("RGB")
        except OSError as exc:
            raise CocoError(f"{path}: cannot read image {i} ({exc}); fix dense.data.images") from None
        if rgb.size != (im["width"], im["height"]):
            raise CocoError(f"{path}: is {rgb.size[0]}x{rgb.size[1]}, the annotations say {im['width']}x{im['height']}")
        sx, sy = size / im["width"], size / im["height"]
        arrays.append(np.asarray(rgb.resize((size, size), Image.BILINEAR)))
        sem = np.zeros((size, size), np.uint8)
        objs = []
        for a in by_image[i]:
            cat = categories[a["category_id"]]
            x, y, w, h = a["bbox"]
            x0, y0 = max(0.0, x * sx), max(0.0, y * sy)
            x1, y1 = min(float(size), (x + w) * sx), min(float(size), (y + h) * sy)
            objs.append({"category": cat, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            if a["_mask"] is not None:
                m = np.asarray(Image.fromarray(a["_mask"].astype(np.uint8)).resize((size, size), Image.NEAREST)) > 0
                sem[m] = cat + 1  # later annotations over earlier ones, as in the generated scenes
        masks.append(sem)
        objects.append(objs)
    return DenseSplit(np.stack(arrays), np.stack(masks), objects, [images[i]["file_name"] for i in ids])

"""The built-in dense data set, offline: scenes of Fashion-MNIST items on seeded textured backgrounds.

Each scene is an S x S RGB image with 1..`max_objects` items of the chosen classes, each resized to a random side
in `item_sizes`, tinted, and pasted at a random place. An item's pixels are its resized image's pixels at or above
`ITEM_THRESHOLD` (its own non-zero pixels, less the faint resampling fringe); only those are painted, so the
ground truth is exact: later items occlude earlier ones, an object's mask is its still-visible pixels, its box
the bounding box of that mask. An object left with fewer than `min_visible_pixels` visible pixels is dropped and
those pixels are repainted with the background, so no unlabelled fragment stays in the image.

Train, validation and test scenes draw their items from disjoint Fashion-MNIST images (each class's images
split once, seeded), so no test object was seen in training, even in another scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from transferlab.data.dense import DenseSplit
from transferlab.data.loaders import FASHION_MNIST_CLASSES, DatasetError, load_fashion_mnist
from transferlab.params import DataParams, DenseDataParams

# Resized items: pixels below this are the resampling fringe or the (zero) Fashion-MNIST background.
ITEM_THRESHOLD = 32
# Shares of each class's Fashion-MNIST images given to the train / val / test item pools (disjoint).
POOL_SHARES = (0.6, 0.2, 0.2)


@dataclass
class Scene:
    """One generated scene: the image, each kept object's class, visible mask and box [x, y, w, h]."""

    image: np.ndarray  # (S, S, 3) uint8
    categories: list[int]
    masks: list[np.ndarray]  # (S, S) bool each, disjoint
    boxes: list[list[float]]
    item_rows: list[int]  # Fashion-MNIST rows of the kept items
    dropped: int = 0  # items placed but hidden below min_visible_pixels


def item_pools(labels: np.ndarray, class_ids: list[int], seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint per-class pools of Fashion-MNIST rows for train / val / test (seeded, `POOL_SHARES`)."""
    rng = np.random.default_rng(seed)
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "val": {}, "test": {}}
    for c in class_ids:
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        a = int(len(rows) * POOL_SHARES[0])
        b = a + int(len(rows) * POOL_SHARES[1])
        pools["train"][c], pools["val"][c], pools["test"][c] = rows[:a], rows[a:b], rows[b:]
    return pools


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A seeded texture, (S, S, 3) float in [0, 110]: smooth colour blobs plus stripes plus pixel noise, dark
    enough that items (mostly 120-255) stay visible, busy enough that a detector must look at shapes."""
    coarse = rng.uniform(0, 60, (4, 4, 3)).astype(np.float32)
    blobs = np.stack(
        [np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.BILINEAR)) for k in range(3)], -1
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    stripes = 20 * (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) + 1)
    noise = rng.normal(0, 6, (size, size, 3))
    return np.clip(blobs + stripes[..., None] + noise, 0, 110)


def make_scene(
    rng: np.random.Generator,
    items: np.ndarray,
    pool: dict[int, np.ndarray],
    class_ids: list[int],
    *,
    size: int,
    max_objects: int,
    item_sizes: tuple[int, int],
    min_visible_pixels: int,
) -> Scene:
    """One scene (see the module docstring). `items`: the Fashion-MNIST images; `pool`: class -> usable rows;
    the category of an object is its index in `class_ids`."""
    bg = background(rng, size)
    canvas = bg.copy()
    owner = np.full((size, size), -1, np.int64)
    placed: list[tuple[int, int]] = []  # (category, row)
    for k in range(int(rng.integers(1, max_objects + 1))):
        cat = int(rng.integers(len(class_ids)))
        rows = pool[class_ids[cat]]
        row = int(rows[rng.integers(len(rows))])
        side = int(rng.integers(item_sizes[0], item_sizes[1] + 1))
        item = np.asarray(Image.fromarray(items[row]).resize((side, side), Image.BILINEAR)).astype(np.float32)
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        tint = rng.uniform(0.6, 1.0, 3)
        on = item >= ITEM_THRESHOLD
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        region[on] = item[on][:, None] * tint
        owner[y0 : y0 + side, x0 : x0 + side][on] = k
        placed.append((cat, row))
    cats, masks, boxes, kept_rows = [], [], [], []
    for k, (cat, row) in enumerate(placed):
        visible = owner == k
        if visible.sum() < min_visible_pixels:
            canvas[visible] = bg[visible]  # dropped: no unlabelled fragment stays
            continue
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        boxes.append([float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)])
        cats.append(cat)
        masks.append(visible)
        kept_rows.append(row)
    dropped = len(placed) - len(cats)
    return Scene(np.round(canvas).astype(np.uint8), cats, masks, boxes, kept_rows, dropped)


def scenes_to_split(scenes: list[Scene], prefix: str) -> DenseSplit:
    """Stack scenes into a `DenseSplit` (semantic mask: 0 background, category + 1)."""
    size = scenes[0].image.shape[0]
    masks = np.zeros((len(scenes), size, size), np.uint8)
    objects = []
    for i, s in enumerate(scenes):
        for cat, m in zip(s.categories, s.masks, strict=True):
            masks[i][m] = cat + 1
        objects.append([{"category": c, "bbox": b} for c, b in zip(s.categories, s.boxes, strict=True)])
    return DenseSplit(
        np.stack([s.image for s in scenes]), masks, objects, [f"{prefix}_{i:05d}" for i in range(len(scenes))]
    )


def generate_scenes(dp: DenseDataParams, image_size: int, seed: int) -> tuple[dict[str, DenseSplit], list[str], dict]:
    """The train / val / test scenes of `dense.data` (kind scenes).

    Returns:
        ({split: DenseSplit}, class names, info: the item pools' sizes and the objects dropped as hidden).

    Raises:
        DatasetError: an unknown class name (with the valid ones), or Fashion-MNIST missing (with the fix).
    """
    unknown = [c for c in dp.classes if c not in FASHION_MNIST_CLASSES]
    if unknown:
        raise DatasetError(
            f"dense.data.classes: {unknown} are not Fashion-MNIST classes (valid: {FASHION_MNIST_CLASSES})"
        )
    if dp.item_sizes[1] > image_size:
        raise DatasetError(f"dense.data.item_sizes: {dp.item_sizes} do not fit in dense.image_size {image_size}")
    raw = load_fashion_mnist(DataParams(dataset="fashion_mnist", path=dp.path))
    class_ids = [FASHION_MNIST_CLASSES.index(c) for c in dp.classes]
    pools = item_pools(raw.labels, class_ids, seed)
    counts = {"train": dp.train_images, "val": dp.val_images, "test": dp.test_images}
    splits, dropped = {}, {}
    for k, (name, n) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, k])  # one stream per split: changing one split's size leaves the others
        scenes = [
            make_scene(
                rng,
                raw.images,
                pools[name],
                class_ids,
                size=image_size,
                max_objects=dp.max_objects,
                item_sizes=(dp.item_sizes[0], dp.item_sizes[1]),
                min_visible_pixels=dp.min_visible_pixels,
            )
            for _ in range(n)
        ]
        splits[name] = scenes_to_split(scenes, name)
        dropped[name] = sum(s.dropped for s in scenes)
    info = {
        "kind": "scenes",
        "dataset_sha256": raw.input_sha256,
        "objects_dropped_as_hidden": dropped,
        "item_pool_sizes": {n: {dp.classes[i]: len(pools[n][c]) for i, c in enumerate(class_ids)} for n in pools},
    }
    return splits, list(dp.classes), info

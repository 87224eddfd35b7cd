"""The prepared data of the dense tasks: images with boxes and a per-pixel class mask, one split per file set.

Both sources of dense data (`scenes`: the built-in generator; `coco`: a user's COCO data set) produce a
`DenseSplit`, and `dense-prepare` stores it under its output folder as

* `<split>_images.npy`: (N, S, S, 3) uint8;
* `<split>_masks.npy`: (N, S, S) uint8, 0 = background, c + 1 = class c (later objects over earlier ones);
* `<split>_objects.json`: per image, its id and its objects `{category, bbox: [x, y, w, h]}` (pixels, COCO order);
* `meta.json`: the class names and what was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.core.io import read_json, write_json, write_npy

DENSE_SPLITS = ("train", "val", "test")


@dataclass
class DenseSplit:
    """One split of a dense data set (see the module docstring for the layout)."""

    images: np.ndarray
    masks: np.ndarray
    objects: list[list[dict[str, Any]]]
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: np.ndarray | list[int]) -> DenseSplit:
        rows = list(rows)
        return DenseSplit(
            self.images[rows], self.masks[rows], [self.objects[i] for i in rows], [self.image_ids[i] for i in rows]
        )


def save_dense(folder: str | Path, splits: dict[str, DenseSplit], class_names: list[str], info: dict) -> None:
    """Write the splits and `meta.json` (class names, counts, `info`) under `folder`."""
    folder = Path(folder)
    for name, split in splits.items():
        write_npy(folder / f"{name}_images.npy", split.images)
        write_npy(folder / f"{name}_masks.npy", split.masks)
        rows = [{"image_id": i, "objects": o} for i, o in zip(split.image_ids, split.objects, strict=True)]
        write_json(folder / f"{name}_objects.json", rows)
    counts = {n: {"images": len(s), "objects": sum(len(o) for o in s.objects)} for n, s in splits.items()}
    write_json(folder / "meta.json", {"class_names": list(class_names), "counts": counts, **info})


def load_dense(folder: str | Path, splits: tuple[str, ...] = DENSE_SPLITS) -> tuple[dict[str, DenseSplit], list[str]]:
    """Read what `save_dense` wrote: ({split: DenseSplit}, class names)."""
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    out = {}
    for name in splits:
        rows = read_json(folder / f"{name}_objects.json")
        out[name] = DenseSplit(
            np.load(folder / f"{name}_images.npy"),
            np.load(folder / f"{name}_masks.npy"),
            [r["objects"] for r in rows],
            [r["image_id"] for r in rows],
        )
    return out, list(meta["class_names"])

"""The deployment domain: the images a trained model will meet, stored like the prepared splits.

Two kinds (`deploy.data.kind`):

* `corrupted` (built-in, offline): the target data set's unused raw images (never a train, val or test image,
  deduplicated by hash: `budgets.extra_pool`), `per_class` of each class in a seeded order, resized like the
  prepared splits, then each image corrupted by one family of `corruptions` (equal shares, seeded assignment)
  at `severity`. The families follow Hendrycks & Dietterich (ICLR 2019, "Benchmarking Neural Network
  Robustness to Common Corruptions"), their CIFAR-10 constants, applied at the pipeline's image size (blur
  and pixelation scaled from 32 px). Its labels are kept for checking. `corruptions: []` gives the same
  images without shift: the control a shift measurement must not flag.
* `folder`: a user's folder. Flat (or `labels: none`): every image unlabelled. Class sub-folders named like
  the training classes: labelled, for checking only. Files are listed sorted; images that cannot be decoded
  are counted and skipped up to `data.max_corrupt_fraction`; at most `max_images`, a seeded sample.

The labels are written apart from the images (`save_deployment`: two folders), so a stage that adapts a model
to the deployment images can depend on the images without being able to read a label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferlab.core.io import read_json, write_json, write_npy
from transferlab.data.loaders import IMAGE_SUFFIXES, DatasetError, RawDataset
from transferlab.data.splits import Prepared, _to_rgb_resized
from transferlab.params import DataParams, DeployDataParams

# A stream of its own for the assignment of families (the pool has its own: `budgets._POOL_STREAM`).
_FAMILY_STREAM = 3
_FOLDER_STREAM = 4


def _noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return x + rng.normal(0.0, c, size=x.shape)


def _blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = (1, 2, 3, 4, 6)[s - 1] * x.shape[0] / 32  # CIFAR's sigmas at 32 px, scaled to this size
    return gaussian_filter(x, sigma=(sigma, sigma, 0))


def _contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    m = x.mean(axis=(0, 1), keepdims=True)
    return (x - m) * c + m


def _brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]


def _pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    size = x.shape[0]
    small = max(2, round(size * (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]))
    im = Image.fromarray(np.clip(x * 255, 0, 255).round().astype(np.uint8))
    im = im.resize((small, small), Image.BOX).resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float64) / 255


# family -> fn(image in [0, 1] float64 (S, S, 3), severity 1-5, generator) -> corrupted image (clipped after)
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}


def corrupt(image: np.ndarray, family: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (S, S, 3) image under `family` at `severity` (1-5), back to uint8."""
    if family not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{family}' (valid: {sorted(CORRUPTIONS)})")
    x = CORRUPTIONS[family](image.astype(np.float64) / 255, severity, rng)
    return np.clip(x * 255, 0, 255).round().astype(np.uint8)


@dataclass
class Deployment:
    """Deployment images (uint8, like the prepared splits), their ids, and what is known about them."""

    images: np.ndarray
    ids: np.ndarray  # int64: a raw-data index (corrupted) or the file's rank in sorted order (folder)
    labels: np.ndarray | None  # class indices for checking only; None when unlabelled
    groups: np.ndarray  # str per image: the corruption family ("clean" without one), or the folder's group
    meta: dict = field(default_factory=dict)


def corrupted_deployment(
    raw: RawDataset, prepared: Prepared, data: DataParams, spec: DeployDataParams, seed: int
) -> Deployment:
    """The built-in deployment domain (see the module docstring).

    Raises:
        DatasetError: a text data set, or fewer unused images than a class needs (lower deploy.data.per_class).
    """
    from transferlab.data.budgets import extra_pool

    pool = extra_pool(raw, prepared, data.image_size, seed, spec.per_class)
    short = {raw.class_names[c]: n for c, n in pool.available.items() if min(n, spec.per_class) < spec.per_class}
    if short:
        raise DatasetError(
            f"deploy.data.per_class: {spec.per_class} unused images per class asked for, and {short} have fewer "
            "(every train/val/test image is excluded): lower deploy.data.per_class"
        )
    n = len(pool.labels)
    rng = np.random.default_rng([seed, _FAMILY_STREAM])
    families = list(spec.corruptions)
    if families:
        order = rng.permutation(n)  # equal shares, assigned in a seeded order
        groups = np.empty(n, dtype=object)
        groups[order] = [families[i % len(families)] for i in range(n)]
        images = np.stack(
            [corrupt(img, str(g), spec.severity, rng) for img, g in zip(pool.images, groups, strict=True)]
        )
    else:
        groups = np.full(n, "clean", dtype=object)
        images = pool.images
    return Deployment(
        images=images,
        ids=pool.source_index,
        labels=pool.labels,
        groups=groups.astype(str),
        meta={
            "kind": "corrupted",
            "corruptions": families,
            "severity": spec.severity if families else None,
            "per_class": spec.per_class,
            "shifted": bool(families),
        },
    )


def folder_deployment(
    path: str | Path, class_names: list[str], data: DataParams, spec: DeployDataParams, seed: int
) -> Deployment:
    """A user's folder of deployment images (see the module docstring).

    Raises:
        DatasetError: a missing or empty folder, sub-folders that are not the training classes (with `labels:
            auto`), or more undecodable files than `data.max_corrupt_fraction` allows.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"deploy.data.path: {root} is not a folder (set it to the folder of deployment images)")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labelled = spec.labels == "auto" and bool(subdirs)
    if labelled:
        unknown = [d.name for d in subdirs if d.name not in class_names]
        if unknown:
            raise DatasetError(
                f"deploy.data.path: sub-folders {unknown} are not training classes ({class_names}): name them like "
                "the classes to check predictions against them, or set deploy.data.labels: none"
            )
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DatasetError(f"deploy.data.path: no images ({sorted(IMAGE_SUFFIXES)}) under {root}")
    rank = np.arange(len(files))
    if len(files) > spec.max_images:
        rank = np.sort(np.random.default_rng([seed, _FOLDER_STREAM]).choice(len(files), spec.max_images, replace=False))
    images, ids, labels, groups, bad = [], [], [], [], []
    for i in rank:
        f = files[i]
        try:
            with Image.open(f) as im:
                im.load()
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad.append(f"{f.relative_to(root)}: {exc}")
            continue
        images.append(_to_rgb_resized(arr, data.image_size))
        ids.append(int(i))
        rel = f.relative_to(root)
        group = rel.parts[0] if len(rel.parts) > 1 else "."
        groups.append(group)
        if labelled:
            labels.append(class_names.index(group))
    if len(bad) > data.max_corrupt_fraction * len(rank):
        raise DatasetError(
            f"deploy.data.path: {len(bad)} of {len(rank)} files cannot be decoded (more than data.max_corrupt_fraction "
            f"= {data.max_corrupt_fraction}), e.g. {bad[:3]}: remove or re-export them"
        )
    if not images:
        raise DatasetError(f"deploy.data.path: no decodable image under {root}")
    return Deployment(
        images=np.stack(images),
        ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64) if labelled else None,
        groups=np.asarray(groups, dtype=str),
        meta={"kind": "folder", "files": len(files), "undecodable": len(bad), "undecodable_examples": bad[:5]},
    )


def save_deployment(images_dir: str | Path, labels_dir: str | Path, dep: Deployment, class_names: list[str]) -> dict:
    """Write the images (with ids, groups, meta) to `images_dir` and the labels, if any, to `labels_dir`.

    Returns:
        The summary written as the stage's metrics (counts per group and, when labelled, per class).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    write_npy(images_dir / "images.npy", dep.images)
    write_npy(images_dir / "ids.npy", dep.ids)
    write_npy(images_dir / "groups.npy", dep.groups)
    groups, counts = np.unique(dep.groups, return_counts=True)
    summary = {
        **dep.meta,
        "images": int(len(dep.images)),
        "labelled": dep.labels is not None,
        "per_group": {str(g): int(c) for g, c in zip(groups, counts, strict=True)},
    }
    write_json(images_dir / "meta.json", {**summary, "class_names": class_names})
    labels_dir.mkdir(parents=True, exist_ok=True)
    if dep.labels is not None:
        write_npy(labels_dir / "labels.npy", dep.labels)
        summary["per_class"] = {
            class_names[c]: int(n) for c, n in enumerate(np.bincount(dep.labels, minlength=len(class_names)))
        }
    write_json(labels_dir / "meta.json", {"labelled": dep.labels is not None, "images": int(len(dep.images))})
    return summary


def load_deployment(images_dir: str | Path, labels_dir: str | Path | None = None) -> Deployment:
    """Read what `save_deployment` wrote; labels only when `labels_dir` is given (and holds them).

    Raises:
        FileNotFoundError: no deployment images (run deploy-prepare first).
    """
    images_dir = Path(images_dir)
    if not (images_dir / "images.npy").is_file():
        raise FileNotFoundError(f"{images_dir}: no deployment images; run `make repro-deploy` (stage deploy-prepare)")
    labels = None
    if labels_dir is not None and (Path(labels_dir) / "labels.npy").is_file():
        labels = np.load(Path(labels_dir) / "labels.npy")
    return Deployment(
        images=np.load(images_dir / "images.npy"),
        ids=np.load(images_dir / "ids.npy"),
        labels=labels,
        groups=np.load(images_dir / "groups.npy"),
        meta=read_json(images_dir / "meta.json"),
    )

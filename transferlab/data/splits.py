"""From a loaded dataset to the prepared splits every later stage reads, and back.

`prepare_splits` removes exact duplicates (so that no sample lands in two splits), draws per-class
train/val/test samples with a seeded generator (stored in a seeded shuffled order, never class by class),
and stores the model inputs: RGB uint8 arrays resized to a square, or token ids of `data.tokenizer` (with
the texts beside them). `save_prepared` / `load_prepared` write and read `data/prepared/`; no later stage
decodes, resizes or tokenizes again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.core.io import read_json, write_json, write_npy
from transferlab.data.loaders import SPLITS, DatasetError, RawDataset
from transferlab.params import DataParams

log = logging.getLogger(__name__)


def _to_rgb_resized(image: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(image)
    if im.mode != "RGB":
        im = im.convert("RGB")  # grayscale -> 3 equal channels: every source model takes RGB
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _image_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def _allocate(n: int, want: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per-class (train, val, test) counts: as asked when the class is big enough, else shares of n."""
    if n >= sum(want):
        return want
    val = max(1, round(n * want[1] / sum(want)))
    test = max(1, round(n * want[2] / sum(want)))
    return n - val - test, val, test


def prepare_splits(raw: RawDataset, params: DataParams, seed: int) -> tuple[dict[str, dict], dict]:
    """Validate, deduplicate, split and resize a raw dataset.

    Args:
        raw: the loader's output.
        params: the `data` params (per-class counts, image size, corrupt-file threshold).
        seed: the run's seed; the split depends on it and on nothing else (not on file order).

    Returns:
        (splits, report): splits maps 'train'/'val'/'test' to {'images': uint8 (N,S,S,3), 'labels':
        int64 (N,)}; report holds the counts that go to metrics/data.json.

    Raises:
        DatasetError: too many corrupt files, no images, a single class, or a class too small to split.
    """
    n_corrupt = len(raw.corrupt_files)
    if raw.files_seen and n_corrupt / raw.files_seen > params.max_corrupt_fraction:
        shown = "\n  ".join(raw.corrupt_files[:10])
        raise DatasetError(
            f"{n_corrupt} of {raw.files_seen} files could not be decoded "
            f"({n_corrupt / raw.files_seen:.1%} > data.max_corrupt_fraction={params.max_corrupt_fraction}). "
            f"Fix or remove them, or raise the threshold. First ones:\n  {shown}"
        )
    for bad in raw.corrupt_files:
        log.warning("skipped corrupt file: %s", bad)
    n = len(raw.labels)
    if n == 0:
        raise DatasetError("the dataset holds no decodable images")
    present = np.unique(raw.labels)
    empty_classes = [raw.class_names[c] for c in range(len(raw.class_names)) if c not in present]
    if empty_classes:
        raise DatasetError(f"class(es) {empty_classes} have no decodable image; add images or drop the class")
    if len(present) < 2:
        raise DatasetError(
            f"only one class ({raw.class_names[int(present[0])]!r}) found: classification needs at least two"
        )

    # Exact duplicates: keep the first occurrence of each image (text) so that none straddles two splits.
    text = raw.texts is not None
    hashes = [_text_hash(t) for t in raw.texts] if text else [_image_hash(img) for img in raw.images]
    first: dict[str, int] = {}
    conflicting = 0
    keep = np.ones(n, bool)
    for i, h in enumerate(hashes):
        if h in first:
            keep[i] = False
            conflicting += int(raw.labels[first[h]] != raw.labels[i])
        else:
            first[h] = i
    duplicates_dropped = int((~keep).sum())

    rng = np.random.default_rng(seed)
    want = (params.train_per_class, params.val_per_class, params.test_per_class)
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    short_classes: dict[str, int] = {}
    official = raw.official_test if raw.official_test is not None else None
    for c in range(len(raw.class_names)):
        idx = np.flatnonzero(keep & (raw.labels == c))  # sorted: independent of the loader's file order
        if official is not None:
            pool_trval = rng.permutation(idx[~official[idx]])
            pool_test = rng.permutation(idx[official[idx]])
            n_tr, n_va = min(want[0], len(pool_trval)), 0
            n_va = min(want[1], len(pool_trval) - n_tr)
            n_te = min(want[2], len(pool_test))
            parts = (pool_trval[:n_tr], pool_trval[n_tr : n_tr + n_va], pool_test[:n_te])
        else:
            if len(idx) < 3:
                raise DatasetError(
                    f"class {raw.class_names[c]!r} has {len(idx)} unique image(s): at least 3 are needed "
                    "(one each for train, val and test)"
                )
            n_tr, n_va, n_te = _allocate(len(idx), want)
            perm = rng.permutation(idx)
            parts = (perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va : n_tr + n_va + n_te])
        if (len(parts[0]), len(parts[1]), len(parts[2])) != want:
            short_classes[raw.class_names[c]] = len(idx)
        for s, part in zip(SPLITS, parts, strict=True):
            chosen[s].extend(int(i) for i in part)

    splits: dict[str, dict] = {}
    text_counts: dict[str, int | float] = {}
    tokenizer = None
    if text:
        from transferlab.data.tokenize import load_tokenizer, tokenize, vocabulary_sha256

        tokenizer = load_tokenizer(params.tokenizer)
    for s in SPLITS:
        # Stored in a seeded shuffled order, never class by class: any consumer that takes a prefix or
        # consecutive chunks (BatchNorm re-estimation, probes) then sees every class in proportion.
        order = rng.permutation(np.asarray(chosen[s], dtype=np.int64))
        if text:
            texts = [raw.texts[i] for i in order]
            images, counts = tokenize(texts, tokenizer, params.max_length)
            for k, v in counts.items():
                text_counts[k] = max(text_counts.get(k, 0), v) if k == "max_tokens" else text_counts.get(k, 0) + v
            splits[s] = {"texts": np.asarray(texts, dtype=str)}
        else:
            images = np.stack([_to_rgb_resized(np.asarray(raw.images[i]), params.image_size) for i in order])
            splits[s] = {}
        splits[s].update({"images": images, "labels": raw.labels[order].astype(np.int64), "source_index": order})

    if text:
        split_hashes = {s: {_text_hash(t) for t in splits[s]["texts"]} for s in SPLITS}
        # Unlabeled texts for domain-adaptive pre-training: never a validation or test text.
        held_out = set(chosen["val"]) | set(chosen["test"])
        pool = np.array([i for i in np.flatnonzero(keep) if i not in held_out], dtype=np.int64)
        pool = np.sort(rng.permutation(pool)[: params.unlabeled_texts])
        splits["unlabeled"] = {"texts": np.asarray([raw.texts[i] for i in pool], dtype=str), "source_index": pool}
    else:
        split_hashes = {s: {_image_hash(img) for img in splits[s]["images"]} for s in SPLITS}
    cross = sum(
        len(split_hashes[a] & split_hashes[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
    )
    counts = {s: np.bincount(splits[s]["labels"], minlength=len(raw.class_names)) for s in SPLITS}
    train_counts = counts["train"]
    report = {
        "modality": raw.modality,
        "num_classes": len(raw.class_names),
        **({"max_length": params.max_length} if text else {"image_size": params.image_size}),
        "files_seen": raw.files_seen,
        "corrupt_files": n_corrupt,
        ("duplicate_texts_dropped" if text else "duplicate_images_dropped"): duplicates_dropped,
        "duplicates_with_conflicting_labels": conflicting,
        # After splitting on unique images, resizing can still make two images identical: checked here.
        "cross_split_duplicates": int(cross),
        "train_samples": int(len(splits["train"]["labels"])),
        "val_samples": int(len(splits["val"]["labels"])),
        "test_samples": int(len(splits["test"]["labels"])),
        "train_imbalance_ratio": float(train_counts.max() / max(train_counts.min(), 1)),
        "short_classes": len(short_classes),
        "per_class": {name: {s: int(counts[s][c]) for s in SPLITS} for c, name in enumerate(raw.class_names)},
    }
    if text:
        n_texts = sum(len(splits[s]["labels"]) for s in SPLITS)
        text_counts["mean_tokens"] = round(text_counts.pop("total_tokens") / max(n_texts, 1), 3)
        report.update({**raw.dropped, **text_counts, "unlabeled_texts": int(len(splits["unlabeled"]["texts"]))})
        report["tokenizer_vocab_sha256"] = vocabulary_sha256(tokenizer)
    if short_classes:
        log.warning("classes with fewer images than asked (got/asked %s): %s", want, short_classes)
    for s in SPLITS:
        if len(np.unique(splits[s]["labels"])) < len(raw.class_names):
            log.warning("split %s misses some classes: per-class metrics there will be undefined", s)
    return splits, report


def save_prepared(out_dir: str | Path, splits: dict[str, dict], class_names: list[str], meta: dict) -> None:
    """Write the splits as .npy files (stable bytes) plus meta.json (classes, input hash, counts)."""
    out_dir = Path(out_dir)
    for s, data in splits.items():
        for key in ("images", "labels", "source_index", "texts"):
            if key in data:
                write_npy(out_dir / f"{s}_{key}.npy", data[key])
    modality = "text" if "texts" in splits["train"] else "image"
    write_json(out_dir / "meta.json", {"class_names": class_names, "modality": modality, **meta})


@dataclass
class Prepared:
    """The prepared splits as stored by `save_prepared`."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    meta: dict
    # Stable sample ids (the index in the raw dataset): predictions are aligned on them, not on row order.
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    # Text data: `images` holds the model inputs (int32 token ids, -1 padded) and `texts` the texts, per
    # split, plus 'unlabeled' (train-pool texts for domain-adaptive pre-training).
    texts: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def modality(self) -> str:
        return self.meta.get("modality", "image")


def load_prepared(in_dir: str | Path) -> Prepared:
    """Load what `save_prepared` wrote.

    Raises:
        DatasetError: the folder is missing or incomplete (run the prepare stage first).
    """
    in_dir = Path(in_dir)
    if not (in_dir / "meta.json").is_file():
        raise DatasetError(f"{in_dir} holds no prepared data: run `dvc repro prepare` first")
    meta = read_json(in_dir / "meta.json")
    images = {s: np.load(in_dir / f"{s}_images.npy") for s in SPLITS}
    labels = {s: np.load(in_dir / f"{s}_labels.npy") for s in SPLITS}
    ids = {s: np.load(in_dir / f"{s}_source_index.npy") for s in SPLITS}
    texts = {s: np.load(p) for s in (*SPLITS, "unlabeled") if (p := in_dir / f"{s}_texts.npy").is_file()}
    return Prepared(images, labels, meta["class_names"], meta, ids, texts)

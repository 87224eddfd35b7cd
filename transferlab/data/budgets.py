"""Label budgets: nested, stratified, seeded training subsets with the validation and test splits held fixed.

The label-budget sweep (`curve-point@<budget>`) trains every strategy on `budget` labelled images per class and
tests it on the prepared test split, the same at every budget. Its training subsets are nested (a smaller budget's
images are all in every larger one's), so a curve measures more labels and nothing else:

* budgets up to `data.train_per_class`: a seeded per-class order of the prepared train split (`train_order`,
  its own generator from the seed, not the prepare stage's), subset(b) = the first b of each class;
* larger budgets: the prepared train split plus images of the raw data set that prepare left unused
  (`extra_pool`): never a prepared train, val or test image (by `source_index`, and by hash after the resize,
  like prepare's cross-split check), never a duplicate (prepare's keep-the-first rule), never the data set's
  official test part; each class in a seeded order, resized like prepare. subset(b) = the prepared train split
  plus the first b - train_per_class extras of each class.

A class with fewer images than a budget asks for gets all it has; `BudgetSubset.capped` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transferlab.data.loaders import DatasetError, RawDataset
from transferlab.data.splits import Prepared, _image_hash, _to_rgb_resized

# Stream tags of the generators below: the seed alone fixes each order, and neither shares a stream with
# the prepare stage's split (np.random.default_rng(seed)).
_TRAIN_ORDER_STREAM = 1
_POOL_STREAM = 2


@dataclass(frozen=True)
class ExtraPool:
    """Unused raw images, per class in a seeded order: `images[k]` is class `labels[k]`'s `rank[k]`-th extra."""

    images: np.ndarray  # uint8 (N, S, S, 3), resized like the prepared splits
    labels: np.ndarray  # int64 (N,)
    source_index: np.ndarray  # int64 (N,): index in the raw data set (the predictions' sample_id space)
    rank: np.ndarray  # int64 (N,): position in its class's seeded order (0 = first drawn)
    available: dict[int, int]  # class -> unused images it has (the pool holds at most `limit_per_class` of them)


@dataclass(frozen=True)
class BudgetSubset:
    """The training images of one budget (validation and test: the prepared ones, unchanged)."""

    budget: int  # labels per class asked for
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray  # source_index of every training image
    train_rows: np.ndarray  # rows of the prepared train split in it (its first len(train_rows) images)
    per_class: dict[int, int]  # class -> images used
    capped: dict[int, int]  # class -> images used, for the classes that had fewer than `budget`


def train_order(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Per class, the rows of the prepared train split in a seeded order (the order budgets take them in).

    Args:
        labels: the prepared train labels.
        seed: the pipeline's seed.

    Returns:
        class -> row indices into the train split; the same for the same labels and seed.
    """
    rng = np.random.default_rng([seed, _TRAIN_ORDER_STREAM])
    classes = np.unique(labels)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}


def extra_pool(raw: RawDataset, prepared: Prepared, image_size: int, seed: int, limit_per_class: int) -> ExtraPool:
    """The raw images prepare left unused, per class in a seeded order, the first `limit_per_class` of each.

    The order of a class does not depend on `limit_per_class` (a longer pool extends a shorter one), so the
    subsets built from it stay nested whatever the largest budget.

    Args:
        raw: the data set as its loader returns it (`loaders.load_dataset(params.data)`), the one prepare read.
        prepared: the prepared splits (their `ids` are raw indices).
        image_size: `data.image_size`.
        seed: the pipeline's seed.
        limit_per_class: extras kept per class (the largest budget minus `data.train_per_class`).

    Raises:
        DatasetError: a text data set (budgets above data.train_per_class are for images only).
    """
    if raw.texts is not None:
        raise DatasetError(
            "curve.labels_per_class: budgets above data.train_per_class draw unused raw images, and this data set "
            "holds texts: keep every budget <= data.train_per_class, or raise data.train_per_class"
        )
    n = len(raw.labels)
    keep = np.ones(n, bool)  # prepare's rule: the first occurrence of each image, every later copy dropped
    seen: set[str] = set()
    for i in range(n):
        h = _image_hash(np.asarray(raw.images[i]))
        keep[i] = h not in seen
        seen.add(h)
    used = np.concatenate([np.asarray(prepared.ids[s], dtype=np.int64) for s in ("train", "val", "test")])
    keep[used] = False
    if raw.official_test is not None:
        keep &= ~raw.official_test
    held = {_image_hash(img) for s in ("train", "val", "test") for img in prepared.images[s]}
    rng = np.random.default_rng([seed, _POOL_STREAM])
    images, labels, index, rank, available = [], [], [], [], {}
    for c in range(len(raw.class_names)):
        order = rng.permutation(np.flatnonzero(keep & (raw.labels == c)))  # sorted first: file order is irrelevant
        taken = 0
        for i in order:
            if taken >= limit_per_class:
                break
            img = _to_rgb_resized(np.asarray(raw.images[i]), image_size)
            if _image_hash(img) in held:  # identical to a prepared image once resized: prepare's cross-split rule
                continue
            images.append(img)
            labels.append(c)
            index.append(int(i))
            rank.append(taken)
            taken += 1
        available[c] = int(len(order))
    shape = (0, image_size, image_size, 3)
    return ExtraPool(
        images=np.stack(images) if images else np.zeros(shape, np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        source_index=np.asarray(index, dtype=np.int64),
        rank=np.asarray(rank, dtype=np.int64),
        available=available,
    )


def budget_subset(prepared: Prepared, budget: int, seed: int, pool: ExtraPool | None = None) -> BudgetSubset:
    """The training subset of `budget` labels per class: nested in every larger budget's, stratified, seeded.

    Args:
        prepared: the prepared splits.
        budget: labels per class (>= 1).
        seed: the pipeline's seed (`train_order`).
        pool: the unused raw images (`extra_pool`); needed only when `budget` exceeds a class's prepared train
            images, else ignored.

    Returns:
        The subset; rows of the prepared train split first (in their stored order), then the extras.

    Raises:
        ValueError: budget below 1, or above the prepared train split with no pool.
    """
    if budget < 1:
        raise ValueError(f"curve.labels_per_class: a budget must be >= 1 label per class (got {budget})")
    y = prepared.labels["train"]
    order = train_order(y, seed)
    rows = np.sort(np.concatenate([o[:budget] for o in order.values()]))
    images, labels, ids = [prepared.images["train"][rows]], [y[rows]], [prepared.ids["train"][rows]]
    per_class = {c: int(min(budget, len(o))) for c, o in order.items()}
    short = {c: budget - k for c, k in per_class.items() if k < budget}
    if short and pool is None:
        raise ValueError(
            f"budget {budget} exceeds the prepared train split of classes {sorted(short)}: pass the unused raw "
            "images (extra_pool)"
        )
    if short:
        take = np.zeros(len(pool.labels), bool)
        for c, need in short.items():
            take |= (pool.labels == c) & (pool.rank < need)
        images.append(pool.images[take])
        labels.append(pool.labels[take])
        ids.append(pool.source_index[take])
        for c in short:
            per_class[c] += int(((pool.labels == c) & take).sum())
    capped = {c: k for c, k in per_class.items() if k < budget}
    return BudgetSubset(
        budget=int(budget),
        images=np.concatenate(images),
        labels=np.concatenate(labels).astype(np.int64),
        ids=np.concatenate(ids).astype(np.int64),
        train_rows=rows,
        per_class=per_class,
        capped=capped,
    )


def subset_prepared(prepared: Prepared, subset: BudgetSubset) -> Prepared:
    """`prepared` with its train split replaced by `subset` (val and test the same arrays)."""
    images = {**prepared.images, "train": subset.images}
    labels = {**prepared.labels, "train": subset.labels}
    ids = {**prepared.ids, "train": subset.ids}
    return Prepared(images, labels, prepared.class_names, prepared.meta, ids, prepared.texts)

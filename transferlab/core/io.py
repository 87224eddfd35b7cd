"""Atomic writes and content hashes: a killed stage never leaves a half-written file behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class OutputError(OSError):
    """An output that cannot be written (full disk, quota, read-only or unwritable folder); names the fix."""


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(
        exc.errno,
        f"cannot write {path}: {os.strerror(exc.errno or 0)}. Free space or fix the permissions of "
        f"{path.parent} (df -h {path.parent}), then rerun: no partial file was left (outputs are written "
        "atomically). Earlier results: `dvc checkout` restores cached outputs, `git checkout -- metrics/` the "
        "metrics files.",
    )


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the same folder, then rename over `path`.

    Raises:
        OutputError: a full disk, a quota, a read-only or unwritable folder (the temp file is removed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise _output_error(path, exc) from None
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException as exc:
        # numpy reports a short write without an errno: a disk with no room left is the cause then.
        full = isinstance(exc, OSError) and exc.errno is None and shutil.disk_usage(path.parent).free < 2**20
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.errno in DISK_ERRNOS or full):
            raise _output_error(path, OSError(exc.errno or errno.ENOSPC, str(exc))) from None
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as sorted, indented JSON (stable bytes for stable inputs)."""
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"
    return _atomic(path, lambda p: p.write_text(text))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """Save one array as .npy (no zip container, so the bytes depend only on the data)."""

    def _save(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    return _atomic(path, _save)


def save_torch(path: str | Path, obj: Any) -> Path:
    """torch.save through a buffer: saved to a file, torch names the zip's inner folder after the (random)
    temporary file, so two saves of the same tensors differ in bytes and DVC sees a changed output."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return _atomic(path, lambda p: p.write_bytes(data))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (sorted relative names and contents)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def dict_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(data), sort_keys=True).encode()).hexdigest()


def dir_size_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

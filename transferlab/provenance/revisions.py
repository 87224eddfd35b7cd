"""Reading one revision of the project without checking it out: its files (`git show`), its `dvc.lock`,
its DVC-tracked outputs (from the local DVC cache by the md5 the lock recorded) and DVC's own content
hashes, so that `review` and `audit` can compare revisions and verify files byte for byte.

A revision is a git rev (`main`, a sha, `HEAD~1`) or None for the working tree. Nothing here runs
`dvc repro` or changes the repository; DVC itself is imported only as a last resort to fetch an output
that is not in the local cache (`dvc.api.open`, which can use a configured remote).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import posixpath
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

WORKSPACE = None  # the `rev` that means "the working tree as it is on disk"


class RevisionError(RuntimeError):
    """A revision or file cannot be read; the message says what to do."""


def git(root: str | Path, *args: str, check: bool = True) -> str:
    """Run git in `root` and return its stdout (stripped).

    Raises:
        RevisionError: git failed (when `check`), with git's own message.
    """
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        raise RevisionError("git is not installed or not on PATH") from None
    if check and res.returncode != 0:
        raise RevisionError(f"`git {' '.join(args)}` failed in {root}: {res.stderr.strip()}")
    return res.stdout.strip()


def repo_root(start: str | Path = ".") -> Path:
    """The top of the git work tree that holds `start`.

    Raises:
        RevisionError: `start` is not inside a git repository.
    """
    try:
        return Path(git(start, "rev-parse", "--show-toplevel"))
    except RevisionError:
        raise RevisionError(
            f"{Path(start).resolve()} is not inside a git repository: run from the project root"
        ) from None


def resolve_commit(root: str | Path, rev: str) -> str:
    """The full sha of `rev`.

    Raises:
        RevisionError: unknown rev, with the fix (fetch it, or name another).
    """
    out = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not out:
        raise RevisionError(
            f"unknown git revision {rev!r}: fetch it (`git fetch origin {rev}:{rev}`; in CI check out with "
            "fetch-depth: 0) or name another with --base / --rev"
        )
    return out


def is_ancestor(root: str | Path, older: str, newer: str) -> bool:
    res = subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=root, capture_output=True)
    return res.returncode == 0


def changed_paths(root: str | Path, a: str, b: str) -> list[str]:
    """Paths that differ between commits `a` and `b`."""
    return sorted(p for p in git(root, "diff", "--name-only", a, b).splitlines() if p)


def read_bytes(root: str | Path, rev: str | None, path: str) -> bytes | None:
    """A file's bytes at `rev` (None: the working tree), or None when it does not exist there."""
    if rev is WORKSPACE:
        p = Path(root) / path
        return p.read_bytes() if p.is_file() else None
    res = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return res.stdout if res.returncode == 0 else None


def read_text(root: str | Path, rev: str | None, path: str) -> str | None:
    """A file's text at `rev` (None: the working tree), or None when it does not exist there."""
    data = read_bytes(root, rev, path)
    return None if data is None else data.decode("utf-8")


def list_files(root: str | Path, rev: str | None, path: str) -> list[str]:
    """Files at `path` (a file or a folder, recursively) at `rev`, as sorted repo-relative posix paths."""
    if rev is WORKSPACE:
        p = Path(root) / path
        if p.is_file():
            return [path]
        return sorted(str(f.relative_to(root).as_posix()) for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    out = git(root, "ls-tree", "-r", "--name-only", rev, "--", path, check=False)
    return sorted(line for line in out.splitlines() if line)


def read_yaml(root: str | Path, rev: str | None, path: str) -> Any:
    text = read_text(root, rev, path)
    return None if text is None else yaml.safe_load(text)


def read_json(root: str | Path, rev: str | None, path: str) -> Any:
    text = read_text(root, rev, path)
    return None if text is None else json.loads(text)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}; lists and scalars are leaves."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --- dvc.lock --------------------------------------------------------------------------------------


@dataclass
class LockedStage:
    """One stage entry of `dvc.lock`."""

    name: str
    cmd: str
    deps: dict[str, str] = field(default_factory=dict)  # path -> md5 ('.dir' suffix for folders)
    outs: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # flattened 'file:key' -> value

    def fingerprint(self) -> str:
        """What decides whether DVC reruns the stage: command, dependency hashes and params."""
        return hashlib.md5(
            json.dumps([self.cmd, self.deps, self.params], sort_keys=True, default=str).encode()
        ).hexdigest()


def _entries(items: list[dict] | None) -> dict[str, str]:
    return {e["path"]: str(e.get("md5") or e.get("hash") or "") for e in items or []}


def read_lock(root: str | Path, rev: str | None) -> dict[str, LockedStage]:
    """stage name -> LockedStage of `dvc.lock` at `rev` (empty when the revision has none).

    Raises:
        RevisionError: the lock file is not DVC's schema 2.0.
    """
    lock = read_yaml(root, rev, "dvc.lock")
    if not lock:
        return {}
    if str(lock.get("schema")) != "2.0":
        raise RevisionError(f"dvc.lock at {rev or 'the working tree'}: schema {lock.get('schema')!r}, expected '2.0'")
    out = {}
    for name, st in (lock.get("stages") or {}).items():
        cmd = st.get("cmd", "")
        params = {}
        for file, values in (st.get("params") or {}).items():
            params.update({f"{file}:{k}": v for k, v in flatten(values).items()})
        out[name] = LockedStage(
            name,
            " ".join(cmd) if isinstance(cmd, list) else cmd,
            _entries(st.get("deps")),
            _entries(st.get("outs")),
            params,
        )
    return out


def locked_out(lock: dict[str, LockedStage], path: str) -> tuple[str, str] | None:
    """(stage name, md5) of the stage whose outs hold `path`, or None."""
    for name, st in lock.items():
        if path in st.outs:
            return name, st.outs[path]
    return None


# --- DVC's content hashes and cache ----------------------------------------------------------------


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def dir_manifest(path: str | Path) -> list[dict[str, str]]:
    """DVC 3's listing of a folder: [{'md5', 'relpath'}], sorted by relpath (what `<md5>.dir` holds)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(
        ({"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()} for f in files), key=lambda e: e["relpath"]
    )


def manifest_md5(manifest: list[dict[str, str]]) -> str:
    """DVC's hash of a folder: md5 of its JSON manifest (json.dumps, sort_keys) plus '.dir'."""
    return hashlib.md5(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records in `dvc.lock` for a file or a folder (`<md5>.dir`).

    Raises:
        FileNotFoundError: nothing at `path`.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if path.is_dir():
        return manifest_md5(dir_manifest(path))
    raise FileNotFoundError(f"{path} does not exist")


def cache_dir(root: str | Path) -> Path:
    """The local DVC cache (`cache.dir` in .dvc/config[.local], else .dvc/cache)."""
    root = Path(root)
    found = root / ".dvc" / "cache"
    for name in ("config", "config.local"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if cfg.has_option("cache", "dir"):
            d = Path(cfg.get("cache", "dir"))
            found = d if d.is_absolute() else (root / ".dvc" / d).resolve()
    return found


def cache_path(root: str | Path, md5: str) -> Path | None:
    """Where the local cache holds the object `md5` (DVC 3: files/md5/xx/rest; DVC 2: xx/rest), or None."""
    base = cache_dir(root)
    for d in (base / "files" / "md5", base):
        p = d / md5[:2] / md5[2:]
        if p.is_file():
            return p
    return None


def cached_manifest(root: str | Path, md5: str) -> list[dict[str, str]] | None:
    """The manifest of a cached folder `<md5>.dir`, or None when the cache lacks it."""
    p = cache_path(root, md5)
    return json.loads(p.read_text()) if p else None


def fetch_output(root: str | Path, rev: str | None, path: str) -> tuple[bytes | None, str]:
    """The bytes of DVC-tracked file `path` as revision `rev` recorded it.

    The working tree's file is read from disk. Another revision's is found by the md5 in that revision's
    `dvc.lock`, in the local cache first, then through `dvc.api.open` (a configured remote).

    Returns:
        (bytes or None, a note saying where they came from or why they are missing).
    """
    if rev is WORKSPACE:
        p = Path(root) / path
        return (p.read_bytes(), "working tree") if p.is_file() else (None, f"{path} is not in the working tree")
    entry = locked_out(read_lock(root, rev), path)
    if entry is None:
        data = read_bytes(root, rev, path)  # a git-tracked file (e.g. a cache: false metrics file)
        if data is not None:
            return data, f"git show {rev}:{path}"
        return None, f"{path} is not an output in {rev}'s dvc.lock"
    stage, md5 = entry
    local = cache_path(root, md5)
    if local is not None:
        data = local.read_bytes()
        if file_md5(local) != md5:
            return None, f"DVC cache object {local} does not hash to {md5} (corrupt cache: `dvc fetch` it again)"
        return data, f"DVC cache ({md5[:8]}, {stage} at {rev})"
    try:
        import dvc.api

        with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as fh:
            return fh.read(), f"dvc.api.open ({stage} at {rev})"
    except Exception as exc:  # noqa: BLE001 - dvc raises many types; the note carries the reason
        return None, (
            f"{path} ({md5[:8]}) of {rev} is neither in the local DVC cache nor fetchable "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}); `dvc pull` on {rev} or "
            "configure a remote"
        )


def dvc_yaml_metrics(root: str | Path, rev: str | None) -> list[str]:
    """Metrics files of `rev`: the top-level `metrics:` list of dvc.yaml (folders expanded), else metrics/."""
    dvc_yaml = read_yaml(root, rev, "dvc.yaml") or {}
    entries = dvc_yaml.get("metrics") or ["metrics"]
    paths = set()
    for e in entries:
        name = e if isinstance(e, str) else next(iter(e))
        paths.update(
            f for f in list_files(root, rev, posixpath.normpath(name)) if f.endswith((".json", ".yaml", ".yml"))
        )
    return sorted(paths)

"""`make bench-scaling`: how time and peak memory of the pipeline's stages grow with the data and the candidates.

Two axes, each point run by the real stage modules (`python -m stages.<name> --params <generated>`) in a
fresh temporary directory, each stage in its own child process: its wall seconds, CPU seconds (user + system)
and peak RSS (that child's `ru_maxrss`, read with `os.wait4`) are one row of the table.

- Training images (default 250 / 1,000 / 4,000 / 16,000: Fashion-MNIST, 10 classes, so 25 / 100 / 400 /
  1,600 per class; val and test stay at params.yaml's per-class counts): `prepare`, `features@efficientnet_lite0`
  (its forward pass covers train + val + test), `score` (every estimator of params.yaml on that one
  candidate) and `train@finetune_top` with ONE epoch (`train.epochs: 1`, `train.seeds: [0]`,
  `train.lr_grid: [1.0]`: no rate search, no plateau). A fixed epoch count makes the training row the cost
  of one epoch (+ one validation pass and the stage's fixed costs): the pipeline's real training cost is
  that times the epochs its protocol runs, which early stopping decides and which is not a function of size.
- Candidates (default 1 / 3 / 5 / 10, at `--candidate-images` training images, default 1,000 = the
  project's 100 per class): `features@<c>` for each candidate and one `score` over all of them. The
  candidates, in order: the three packaged EfficientNet-Lites, then `random_init` (the project's control,
  tf_efficientnet_lite0) and six more timm architectures with random weights (same compute as trained
  ones; works offline). Each candidate's `features@` runs once, in its own fresh directory; the
  features row of k candidates is the sum of the first k (wall and CPU) and their maximum (peak RSS), which
  is what `dvc repro` pays, one stage after the other. `score` runs once per k, in a fresh directory.

Every stage opens an MLflow run on one SQLite database shared by the whole benchmark and created before
the first point (a new database costs 3-4 s of migrations once; that is not a per-stage cost). Image size:
params.yaml's `data.image_size` unless `--image-size`. Growth: the slope of log(time) against log(size) per
stage and axis, over all points ("slope") and over the last two ("tail": the large-size behaviour, where the
stage's fixed ~2-3 s of imports and tracking no longer hides it); about 1 means linear.

usage: python benchmarks/scaling.py [--quick] [--sizes 250,1000,4000,16000] [--candidates 1,3,5,10]
       [--max-images N] [--candidate-images 1000] [--epochs 1] [--image-size 48] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").is_file() else sys.executable
NUM_CLASSES = 10  # Fashion-MNIST
TRAIN_STRATEGY = "finetune_top"
IMAGES_SOURCE = "efficientnet_lite0"
# The candidate axis, in the order they are added: the packaged sources first (the project's default
# candidates), then the project's random_init control, then timm architectures with random weights.
CANDIDATES: list[tuple[str, dict[str, str]]] = [
    ("efficientnet_lite0", {"kind": "packaged"}),
    ("efficientnet_lite1", {"kind": "packaged"}),
    ("efficientnet_lite2", {"kind": "packaged"}),
    ("random_init", {"kind": "random_init", "arch": "tf_efficientnet_lite0"}),
    ("resnet10t", {"kind": "random_init", "arch": "resnet10t"}),
    ("mobilenetv3_small_100", {"kind": "random_init", "arch": "mobilenetv3_small_100"}),
    ("resnet18", {"kind": "random_init", "arch": "resnet18"}),
    ("mobilenetv3_large_100", {"kind": "random_init", "arch": "mobilenetv3_large_100"}),
    ("efficientnet_b0", {"kind": "random_init", "arch": "efficientnet_b0"}),
    ("regnetx_002", {"kind": "random_init", "arch": "regnetx_002"}),
]
FULL_SIZES = [250, 1000, 4000, 16000]
FULL_CANDIDATES = [1, 3, 5, 10]
QUICK_SIZES = [250, 1000]
QUICK_CANDIDATES = [1, 3]
STAGES = ("prepare", "features", "score", "train")


def child_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # `stages` is not an installed package; children run in temp directories
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "TRANSFERLAB_LOG": "WARNING",
        "TQDM_DISABLE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # it would override the generated params' tracking.uri
    return env


class StageTimeout(RuntimeError):
    """A child ran past `--stage-timeout` and was killed."""


def run_child(args: list[str], cwd: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run `python <args>` in `cwd`; wall and CPU seconds and peak RSS (MiB) of that child.

    Raises:
        StageTimeout: it ran past `timeout_s` (killed: that one process, which this function started).
        RuntimeError: the child failed; the message holds its command and the end of its stderr.
    """
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen([PYTHON, *args], cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: os.wait4, not Popen.wait
        if timer:
            timer.cancel()
        wall = time.perf_counter() - t
        rc = os.waitstatus_to_exitcode(status)
        if timeout_s and wall >= timeout_s and rc != 0:
            raise StageTimeout(f"`python {' '.join(args[:2])}` killed after {wall:.0f} s (--stage-timeout)")
        if rc != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"`python {' '.join(args)}` (in {cwd}) exited {rc}:\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def make_params(
    path: Path,
    base: dict[str, Any],
    *,
    train_images: int,
    image_size: int,
    sources: dict[str, dict[str, str]],
    db: Path,
    epochs: int,
) -> None:
    """params.yaml for one point: the project's params with the point's data size and sources, one
    training seed, no rate search, a fixed epoch count, and the shared tracking database."""
    import yaml

    raw = json.loads(json.dumps(base))  # deep copy
    raw["tracking"]["uri"] = f"sqlite:///{db}"
    raw["data"]["train_per_class"] = train_images // NUM_CLASSES
    raw["data"]["image_size"] = image_size
    raw["sources"] = sources
    raw["pretrain"] = {}  # no `pipeline` source: no pretrain stage to run
    raw["diagnose"]["forgetting_source"] = None  # it must name a pipeline source
    raw["train"].update(
        source=next(iter(sources)), seeds=[0], lr_grid=[1.0], epochs=epochs, patience=epochs, device="cpu"
    )
    raw["tune"]["strategies"] = []
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def stage_cmd(stage: str, params: Path, d: Path, prepared: Path, source: str = IMAGES_SOURCE) -> list[str]:
    """The stage's command line as dvc.yaml writes it, with every path inside the point's directory."""
    common = ["--params", str(params)]
    if stage == "prepare":
        return ["-m", "stages.prepare", *common, "--out", str(prepared), "--metrics", str(d / "metrics/data.json")]
    if stage == "features":
        return [
            "-m", "stages.features", *common, "--source", source, "--prepared", str(prepared),
            "--out", str(d / "data/features" / source), "--perf", str(d / "perf/features" / f"{source}.json"),
        ]  # fmt: skip
    if stage == "score":
        return [
            "-m", "stages.score", *common, "--prepared", str(prepared), "--features", str(d / "data/features"),
            "--latency", str(d / "perf/features"), "--metrics", str(d / "metrics/score.json"),
            "--selection", str(d / "data/selection.json"), "--perf", str(d / "perf/score.json"),
        ]  # fmt: skip
    name = TRAIN_STRATEGY
    return [
        "-m", "stages.train", *common, "--strategy", name, "--prepared", str(prepared),
        "--features", str(d / "data/features"), "--selection", str(d / "data/selection.json"),
        "--out", str(d / "models" / name), "--metrics", str(d / "metrics/train" / f"{name}.json"),
        "--history", str(d / "plots/history" / name), "--perf", str(d / "perf/train" / f"{name}.json"),
        "--run-info", str(d / "runs/train" / f"{name}.json"),
    ]  # fmt: skip


def create_database(top: Path, db: Path) -> None:
    """Create the shared MLflow database (its migrations) once, before any measured stage."""
    code = (
        "from transferlab.params import TrackingParams\n"
        "from transferlab.provenance.tracking import stage_run\n"
        f"with stage_run(TrackingParams(uri='sqlite:///{db}', experiment='transferlab'), 'warm-up', {{}}):\n"
        "    pass\n"
    )
    run_child(["-c", code], top)


# ----------------------------------------------------------------------------- table and fits


class Table:
    """Rows (axis, n, stage, wall_s, cpu_s, rss_mib), each printed when added."""

    HEADER = f"{'axis':10s} {'n':>6s}  {'stage':34s} {'wall_s':>8s} {'cpu_s':>8s} {'peak_rss_MiB':>12s}"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        print(self.HEADER, flush=True)

    def add(self, axis: str, n: int, stage: str, m: dict[str, float], label: str | None = None) -> None:
        row = {"axis": axis, "n": n, "stage": stage, **m}
        self.rows.append(row)
        print(
            f"{axis:10s} {n:6d}  {label or stage:34s} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['rss_mib']:12.0f}",
            flush=True,
        )


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def growth(slope: float | None) -> str:
    if slope is None:
        return "-"
    if slope < 0.2:
        return "flat"
    if slope < 0.8:
        return "sub-linear"
    if slope <= 1.2:
        return "~linear"
    return "super-linear"


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Slopes per axis and stage (time and memory), and the dominant stage at each point."""
    lines = ["", "# growth: slope of log(value) on log(n); ~1 = linear, ~0 = flat; tail = the last two points"]
    lines.append(f"{'axis':10s} {'stage':10s} {'time slope':>10s} {'tail':>6s} {'RSS slope':>9s}  growth (time, tail)")
    for axis in ("images", "candidates"):
        for stage in STAGES:
            pts = sorted((r["n"], r["wall_s"], r["rss_mib"]) for r in rows if r["axis"] == axis and r["stage"] == stage)
            if len(pts) < 2:
                continue
            ns, ts, ms = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            s, tail, sm = loglog_slope(ns, ts), loglog_slope(ns[-2:], ts[-2:]), loglog_slope(ns, ms)
            lines.append(f"{axis:10s} {stage:10s} {s:10.2f} {tail:6.2f} {sm:9.2f}  {growth(s)}, tail {growth(tail)}")
    lines.append("# dominant stage (share of the point's wall time)")
    for axis in ("images", "candidates"):
        for n in sorted({r["n"] for r in rows if r["axis"] == axis}):
            pts = [r for r in rows if r["axis"] == axis and r["n"] == n]
            total = sum(r["wall_s"] for r in pts)
            top = max(pts, key=lambda r: r["wall_s"])
            shares = ", ".join(f"{r['stage']} {r['wall_s'] / total:.0%}" for r in pts)
            lines.append(f"{axis:10s} n={n:<6d} {top['stage']} ({shares}; total {total:.0f} s)")
    return lines


# ----------------------------------------------------------------------------- the two axes


def images_axis(table: Table, top: Path, base: dict, sizes: list[int], args: argparse.Namespace, db: Path) -> None:
    sources = dict(CANDIDATES[:1])
    for n in sizes:
        d = top / f"images_{n}"
        d.mkdir()
        params = d / "params.yaml"
        make_params(
            params, base, train_images=n, image_size=args.image_size, sources=sources, db=db, epochs=args.epochs
        )
        prepared = d / "data/prepared"
        for stage in STAGES:
            try:
                m = run_child(stage_cmd(stage, params, d, prepared), d, args.stage_timeout)
            except StageTimeout as exc:
                print(f"# images n={n}: {exc}; the rest of this point is skipped", flush=True)
                break
            label = {
                "features": f"features@{IMAGES_SOURCE}",
                "train": f"train@{TRAIN_STRATEGY} ({args.epochs} epoch{'s' if args.epochs > 1 else ''})",
            }.get(stage)
            table.add("images", n, stage, m, label)
        if not args.keep:
            shutil.rmtree(d / "models", ignore_errors=True)  # the largest outputs; the rest is small


def candidates_axis(table: Table, top: Path, base: dict, counts: list[int], args: argparse.Namespace, db: Path) -> None:
    n_images = args.candidate_images
    shared = top / "candidates_data"
    shared.mkdir()
    params = shared / "params.yaml"
    make_params(
        params, base, train_images=n_images, image_size=args.image_size, sources=dict(CANDIDATES[:1]), db=db, epochs=1
    )
    prepared = shared / "data/prepared"
    run_child(stage_cmd("prepare", params, shared, prepared), shared)  # the same data for every k: not a row
    per_candidate: list[dict[str, float]] = []
    for name, spec in CANDIDATES[: max(counts)]:
        d = top / f"features_{name}"
        d.mkdir()
        p = d / "params.yaml"
        make_params(p, base, train_images=n_images, image_size=args.image_size, sources={name: spec}, db=db, epochs=1)
        try:
            per_candidate.append(run_child(stage_cmd("features", p, d, prepared, source=name), d, args.stage_timeout))
        except StageTimeout as exc:
            print(f"# features@{name}: {exc}; no candidate count that includes it is run", flush=True)
            break
        print(
            f"#   features@{name}: {per_candidate[-1]['wall_s']:.1f} s, {per_candidate[-1]['rss_mib']:.0f} MiB",
            flush=True,
        )
    for k in counts:
        if k > len(per_candidate):
            continue
        first = per_candidate[:k]
        feats = {
            "wall_s": sum(m["wall_s"] for m in first),
            "cpu_s": sum(m["cpu_s"] for m in first),
            "rss_mib": max(m["rss_mib"] for m in first),
        }
        table.add("candidates", k, "features", feats, f"features x {k} (sum; RSS: max)")
        d = top / f"candidates_{k}"
        for sub in ("data/features", "perf/features"):
            (d / sub).mkdir(parents=True)
        p = d / "params.yaml"
        make_params(
            p, base, train_images=n_images, image_size=args.image_size, sources=dict(CANDIDATES[:k]), db=db, epochs=1
        )
        for name, _ in CANDIDATES[:k]:
            (d / "data/features" / name).symlink_to(top / f"features_{name}" / "data/features" / name)
            (d / "perf/features" / f"{name}.json").symlink_to(
                top / f"features_{name}" / "perf/features" / f"{name}.json"
            )
        try:
            m = run_child(stage_cmd("score", p, d, prepared), d, args.stage_timeout)
        except StageTimeout as exc:
            print(f"# candidates k={k}: {exc}", flush=True)
            continue
        table.add("candidates", k, "score", m, f"score ({k} candidates)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK_SIZES}, candidates {QUICK_CANDIDATES}, 250 images"
    )
    p.add_argument("--sizes", default=None, help=f"training images per point (default {FULL_SIZES}); multiples of 10")
    p.add_argument("--candidates", default=None, help=f"candidate counts (default {FULL_CANDIDATES}, at most 10)")
    p.add_argument("--max-images", type=int, default=None, help="drop the image sizes above this")
    p.add_argument("--candidate-images", type=int, default=None, help="training images of the candidates axis (1000)")
    p.add_argument("--epochs", type=int, default=1, help="fixed training epochs of the train stage (default 1)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: params.yaml's data.image_size)")
    p.add_argument(
        "--stage-timeout",
        type=float,
        default=None,
        help="kill a stage after this many seconds and go on (default: none)",
    )
    p.add_argument("--axes", default="images,candidates", help="which axes to run (default both)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--keep", default=None, help="keep the points' directories here (default: a deleted temp dir)")
    args = p.parse_args()

    import yaml

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    args.image_size = args.image_size or int(base["data"]["image_size"])
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    counts = (
        [int(c) for c in args.candidates.split(",")]
        if args.candidates
        else (QUICK_CANDIDATES if args.quick else FULL_CANDIDATES)
    )
    if args.candidate_images is None:
        args.candidate_images = 250 if args.quick else 1000
    if args.max_images is not None:
        sizes = [s for s in sizes if s <= args.max_images]
        args.candidate_images = min(args.candidate_images, args.max_images)
    bad = [s for s in [*sizes, args.candidate_images] if s < NUM_CLASSES or s % NUM_CLASSES]
    if bad:
        p.error(
            f"--sizes/--candidate-images: {bad} are not positive multiples of {NUM_CLASSES} (images per class x 10)"
        )
    if any(not 1 <= c <= len(CANDIDATES) for c in counts):
        p.error(f"--candidates: {counts}: each must be between 1 and {len(CANDIDATES)}")
    if args.epochs < 1:
        p.error(f"--epochs {args.epochs}: must be at least 1")
    axes = args.axes.split(",")
    unknown = [a for a in axes if a not in ("images", "candidates")]
    if unknown:
        p.error(f"--axes: unknown {unknown} (valid: images, candidates)")

    started = time.perf_counter()
    print(
        f"# nproc={os.cpu_count()} load average {os.getloadavg()[0]:.1f}; image size {args.image_size} px; "
        f"val/test per class {base['data']['val_per_class']}/{base['data']['test_per_class']}; "
        f"train@{TRAIN_STRATEGY}: {args.epochs} fixed epoch(s), 1 seed, no rate search",
        flush=True,
    )
    print(
        f"# images axis: {sizes} (source {IMAGES_SOURCE}); candidates axis: {counts} at {args.candidate_images} "
        "training images",
        flush=True,
    )
    if args.keep:
        top = Path(args.keep).resolve()
        top.mkdir(parents=True, exist_ok=False)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="transferlab-scaling-")
        top = Path(tmp.name)
    try:
        db = top / "mlflow.db"
        create_database(top, db)
        table = Table()
        if "images" in axes:
            images_axis(table, top, base, sizes, args, db)
        if "candidates" in axes:
            candidates_axis(table, top, base, counts, args, db)
        for line in summarize(table.rows):
            print(line)
        print(f"# scaling took {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
        if args.json:
            Path(args.json).write_text(json.dumps(table.rows, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()

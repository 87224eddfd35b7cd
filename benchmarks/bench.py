"""`make bench`: fixed per-stage overhead, time to a params error, training throughput and the scoring cost
ratio, measured side by side in one run on this machine, printed as one table.

Every measurement runs in its own child process (a fresh interpreter: import costs are real, and the peak
RSS column is that child's own `ru_maxrss`, read with `os.wait4`). Times are medians over `--repeats`
runs. Rows:

- `python -c pass`: the floor every stage pays.
- `import stages.<x>`: the stage module's top level (what every run of it pays before validating params).
- `params error stages.<x>`: `python -m stages.<x> --params <typo file>` with dummy paths, until it exits
  with the params error (the fixed path a typo takes).
- `tracking open/close`: `stage_run` of an empty run on an existing SQLite MLflow database (the first use
  of a new database also creates its tables: its own row).
- `stage overhead stages.<x>`: import + params validation + an empty tracking run, in one process: the
  fixed cost of a stage with nothing to compute, against the goal of 3 s over `python -c pass`.
- `train: ...`: images per second of EfficientNet-Lite0 at 48 px, batch 32, all layers trainable:
  (a) the project's `training.loop.fit`, (b) a naive loop as in the timm/torchvision docs (ImageFolder over
  PNG files + PIL transforms per image), (c) bare forward+backward+step on one in-memory batch, (d) (c)
  with channels_last.
- `scoring / fine-tuning`: `benchmarks/scoring_cost.py`'s measurement, on data/prepared when it exists,
  else on random images of the same sizes: every candidate's forward pass over the train split + every
  estimator, against `finetune_full` as the protocol runs it per candidate: seconds per epoch (timed on
  `--finetune-images` training images, after a warm-up step, scaled to the split) x the epochs of the rate
  search and the seed runs, read from metrics/train/finetune_full.json when a run of the current protocol
  left one, else params' lower bound (`scoring_cost.protocol_epochs`; the note says which). The ratios are
  the goals: absolute seconds move with the machine and its load.

usage: python benchmarks/bench.py [--repeats 3] [--steps 8] [--train-images 256] [--finetune-images 128]
       [--no-scoring] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TRANSFERLAB_LOG": "ERROR"}
GOAL_OVERHEAD_S = 3.0
GOAL_PARAMS_ERROR_S = 2.0
GOAL_TRAIN_RATIO = 1.4


def run_child(args: list[str], cwd: Path = ROOT) -> dict[str, Any]:
    """Run `python <args>`; wall seconds, peak RSS (MiB) of that process, exit code, stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "s": wall,
            "rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
            "rc": proc.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def median_run(args: list[str], repeats: int, cwd: Path = ROOT) -> dict[str, Any]:
    runs = [run_child(args, cwd) for _ in range(repeats)]
    best = runs[-1]
    return {**best, "s": statistics.median(r["s"] for r in runs), "rss_mib": max(r["rss_mib"] for r in runs)}


def child_result(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON a `--child` measurement printed on its last stdout line."""
    if run["rc"] != 0:
        raise RuntimeError(f"child failed ({run['rc']}):\n{run['stderr'][-3000:]}")
    return json.loads(run["stdout"].strip().splitlines()[-1])


# ----------------------------------------------------------------------------- child measurements


def _typo_params(path: Path) -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["strategies"]["lora"] = {**(raw["strategies"].get("lora") or {}), "rnak": 4}
    path.write_text(yaml.safe_dump(raw))


def child_stage_overhead(stage: str, db: str) -> dict[str, Any]:
    """Import a stage, validate params.yaml, open and close an empty tracking run (one process)."""
    import importlib

    t0 = time.perf_counter()
    importlib.import_module(f"stages.{stage}")
    t1 = time.perf_counter()
    from transferlab.config import load_params

    params = load_params(ROOT / "params.yaml")
    t2 = time.perf_counter()
    from transferlab.params import TrackingParams
    from transferlab.provenance.tracking import stage_run

    tracking = TrackingParams(uri=f"sqlite:///{db}", experiment="bench")
    with stage_run(tracking, f"{stage}@bench", {"seed": params.seed}):
        pass
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "params_s": t2 - t1, "tracking_s": t3 - t2}


def _lite0(num_classes: int = 10) -> Any:
    import timm

    # The packaged lite0's architecture; random weights cost the same per step as the ImageNet ones.
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def child_train(mode: str, steps: int, n_images: int, size: int = 48, batch: int = 32) -> dict[str, Any]:
    """Training images/s of lite0 in one of the modes (fit, naive, bare, channels_last)."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _lite0()
    if mode in ("bare", "channels_last"):
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        if mode == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up: first steps allocate and pick kernels
            step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return {"images_per_s": steps * batch / (time.perf_counter() - t)}

    images = rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    labels = np.arange(n_images) % 10
    if mode in ("fit", "fit_contiguous"):
        from transferlab.core.seeding import seed_everything
        from transferlab.strategies import get_strategy, strategy_config
        from transferlab.training.loop import fit, image_batches
        from transferlab.training.protocol import TrainRecipe

        gen = seed_everything(0)
        strategy = get_strategy("finetune_full")
        cfg = strategy_config("finetune_full", {"lr": 1e-3})
        norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        n_val = batch
        # The pipeline's own layout (params train.channels_last, on by default), or the default layout.
        cl = mode == "fit"
        if cl:
            model = model.to(memory_format=torch.channels_last)
        t = time.perf_counter()
        fit(
            model,
            strategy,
            cfg,
            image_batches(images, norm, "crop_flip", gen, cl),
            labels,
            image_batches(images[:n_val], norm, "none", gen, cl),
            labels[:n_val],
            TrainRecipe(epochs=1, batch_size=batch, patience=1, weight_decay=1e-4),
            generator=gen,
            label="bench",
        )
        # One epoch over n_images plus a validation pass over one batch (forward only), both counted.
        return {"images_per_s": n_images / (time.perf_counter() - t)}

    # naive: the docs' recipe: PNG files in class folders, ImageFolder, PIL transforms per image, DataLoader.
    from PIL import Image
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        for i, (img, c) in enumerate(zip(images, labels, strict=True)):
            folder = Path(tmp) / f"class_{c}"
            folder.mkdir(exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png")
        tf = transforms.Compose(
            [
                transforms.Resize(size),
                transforms.RandomCrop(size, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(tmp, tf), batch_size=batch, shuffle=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        t = time.perf_counter()
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"images_per_s": n_images / (time.perf_counter() - t)}


def child_scoring(finetune_images: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scoring_cost import measure, pipeline_epoch_seconds, protocol_epochs, synthetic_data

    from transferlab.config import load_params

    params = load_params(ROOT / "params.yaml")
    prepared = ROOT / "data" / "prepared"
    if (prepared / "meta.json").is_file():
        from transferlab.data.splits import load_prepared

        data, where = load_prepared(prepared), "data/prepared"
    else:
        data, where = synthetic_data(params), "random images of the prepared sizes"
    epochs, epochs_from = protocol_epochs(params, ROOT / "metrics" / "train")
    result = measure(
        params,
        data,
        sorted(params.sources),
        pipeline_dir=str(ROOT / "models" / "pretrain"),
        splits=("train",),  # what scoring needs; val/test go to the features cache, not to the ranking
        finetune_images=finetune_images,
        epochs=epochs,
    )
    check = pipeline_epoch_seconds(ROOT / "metrics" / "train", ROOT / "perf" / "train")
    return {**result, "data": where, "epochs_from": epochs_from, "pipeline_check": check}


# ----------------------------------------------------------------------------- the table


class Rows(list):
    """The table's rows (what, value, note, peak RSS MiB), each printed when appended."""

    WIDTH = 52

    def __init__(self) -> None:
        super().__init__()
        print(f"{'measurement':{self.WIDTH}s} {'value':>9s} {'peak_rss_MiB':>12s}  note", flush=True)

    def append(self, row: tuple[str, float | None, str, float | None]) -> None:
        super().append(row)
        what, value, note, rss = row
        v = f"{value:9.2f}" if value is not None else f"{'-':>9s}"
        m = f"{rss:12.0f}" if rss is not None else f"{'-':>12s}"
        print(f"{what:{self.WIDTH}s} {v} {m}  {note}", flush=True)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown CPU",
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return f"nproc={os.cpu_count()}, CPU: {cpu}, RAM {mem_kib / 1024**2:.1f} GiB, Python {sys.version.split()[0]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per timed child (median)")
    p.add_argument("--steps", type=int, default=8, help="timed steps of the bare training loops")
    p.add_argument("--train-images", type=int, default=256, help="images per epoch of the fit and naive loops")
    p.add_argument("--stages", default=None, help="comma-separated stage modules (default: all)")
    p.add_argument(
        "--finetune-images", type=int, default=128, help="training images timed per candidate's fine-tuning epoch"
    )
    p.add_argument("--no-scoring", action="store_true", help="skip the scoring cost ratio (about 2 minutes)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        sys.path.insert(0, str(ROOT))  # `stages` is not an installed package: import it from this tree
        kind, *rest = args.child
        if kind == "overhead":
            out = child_stage_overhead(rest[0], rest[1])
        elif kind == "train":
            out = child_train(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_scoring(int(rest[0]))
        print(json.dumps(out))
        return

    stages = args.stages.split(",") if args.stages else STAGES
    rows = Rows()  # printed as they come: a slow machine still shows what was measured
    started = time.perf_counter()
    print(f"# {machine()}", flush=True)
    me = str(Path(__file__).resolve())

    floor = median_run(["-c", "pass"], args.repeats)
    rows.append(("python -c pass", floor["s"], "", floor["rss_mib"]))

    for stage in stages:
        r = median_run(["-c", f"import stages.{stage}"], args.repeats)
        rows.append((f"import stages.{stage}", r["s"], "" if r["rc"] == 0 else f"exit {r['rc']}", r["rss_mib"]))

    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "typo.yaml"
        _typo_params(bad)
        for stage in stages:
            # First run: argparse names the required options; then dummy values get us to params validation.
            probe = run_child(["-m", f"stages.{stage}", "--params", str(bad)])
            required = []
            if "the following arguments are required:" in probe["stderr"]:
                line = probe["stderr"].split("the following arguments are required:")[1].splitlines()[0]
                required = [a.strip() for a in line.split(",")]
            argv = ["-m", f"stages.{stage}", "--params", str(bad)]
            for flag in required:
                argv += [flag, str(Path(tmp) / "dummy")]
            r = median_run(argv, args.repeats)
            ok = r["rc"] != 0 and "rnak" in r["stderr"]
            note = "reports the typo" if ok else f"exit {r['rc']}: typo NOT reported first"
            rows.append((f"params error stages.{stage}", r["s"], note, r["rss_mib"]))

        db = Path(tmp) / "mlflow.db"
        first = run_child([me, "--child", "overhead", "prepare", str(db)])
        res = child_result(first)
        rows.append(
            ("tracking open/close, new database", res["tracking_s"], "creates the tables once", first["rss_mib"])
        )
        runs = [run_child([me, "--child", "overhead", "prepare", str(db)]) for _ in range(args.repeats)]
        t_track = statistics.median(child_result(r)["tracking_s"] for r in runs)
        rows.append(("tracking open/close, existing database", t_track, "empty run, tags + params", None))
        for stage in stages:
            runs = [run_child([me, "--child", "overhead", stage, str(db)]) for _ in range(args.repeats)]
            total = statistics.median(r["s"] for r in runs) - floor["s"]
            parts = [child_result(r) for r in runs]
            note = (
                f"import {statistics.median(x['import_s'] for x in parts):.2f} + params "
                f"{statistics.median(x['params_s'] for x in parts):.2f} + tracking "
                f"{statistics.median(x['tracking_s'] for x in parts):.2f}; goal <= {GOAL_OVERHEAD_S:.0f} s: "
                f"{'met' if total <= GOAL_OVERHEAD_S else 'NOT met'}"
            )
            rows.append((f"stage overhead stages.{stage}", total, note, max(r["rss_mib"] for r in runs)))

    train = {}
    for mode, label in (
        ("fit", "(a) training.loop.fit, channels_last (the pipeline)"),
        ("fit_contiguous", "(a') training.loop.fit, default layout"),
        ("naive", "(b) naive ImageFolder+PIL loop"),
        ("bare", "(c) bare fwd+bwd, one batch"),
        ("channels_last", "(d) (c) with channels_last"),
    ):
        r = run_child([me, "--child", "train", mode, str(args.steps), str(args.train_images)])
        train[mode] = child_result(r)["images_per_s"]
        rows.append((f"train img/s lite0 48px b32 {label}", train[mode], "images/s (not s)", r["rss_mib"]))
    rows.append(
        ("channels_last / bare", train["channels_last"] / train["bare"], "ratio (>1: channels_last faster)", None)
    )
    ratio = train["fit"] / train["naive"]
    rows.append(
        (
            "project loop / naive loop",
            ratio,
            f"ratio; goal >= {GOAL_TRAIN_RATIO}: {'met' if ratio >= GOAL_TRAIN_RATIO else 'NOT met'}",
            None,
        )
    )

    if not args.no_scoring:
        print("# scoring / fine-tuning: the ratios are the goals (absolute seconds move with the machine's load)")
        r = run_child([me, "--child", "scoring", str(args.finetune_images)])
        res = child_result(r)
        print(f"# fine-tuning epochs per candidate: {res['epochs']} ({res['epochs_from']})", flush=True)
        for row in res["rows"]:
            rows.append(
                (
                    f"scoring {row['candidate']}",
                    row["forward_s"] + row["estimators_s"],
                    f"forward {row['forward_s']:.1f} + estimators {row['estimators_s']:.1f} s vs fine-tune "
                    f"{row['finetune_s']:.1f} s ({res['epochs']} x {row['epoch_s']:.1f} s epoch): {row['ratio']:.1%}",
                    None,
                )
            )
        rows.append(
            (
                "scoring / fine-tuning, all candidates",
                res["ratio"],
                f"ratio; {res['scoring_s']:.1f} s vs {res['finetune_s']:.1f} s; on {res['data']}",
                r["rss_mib"],
            )
        )
        check = res["pipeline_check"]
        if check:
            rows.append(
                (
                    f"pipeline epoch s, train@finetune_full ({check['source']})",
                    check["epoch_s"],
                    f"perf/train over {check['epochs']} seed epochs (incl. validation): cross-check of epoch_s",
                    None,
                )
            )

    worst_error = max((v for w, v, *_ in rows if w.startswith("params error")), default=0.0)
    print(
        f"# params errors: slowest {worst_error:.2f} s (goal <= {GOAL_PARAMS_ERROR_S:.0f} s: "
        f"{'met' if worst_error <= GOAL_PARAMS_ERROR_S else 'NOT met'}); "
        f"bench took {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps([dict(zip(("what", "value", "note", "peak_rss_mib"), r, strict=True)) for r in rows], indent=2)
        )


if __name__ == "__main__":
    main()

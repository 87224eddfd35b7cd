"""A tiny image project for end-to-end runs: the real dvc.yaml, stages and library in a temporary git + DVC
repository, three classes of 24 px synthetic images, three candidates (real packaged ImageNet weights, timm's
hub code path reading a local file, a random control) and one-or-two-epoch budgets. Used by
tests/test_pipeline_e2e.py and tests/faults.py; its pieces (the image folder, the inputs of a single
train@ / tune@ stage) by the tests that run one stage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd: str, cwd: Path, check: bool = True) -> str:
    """Run a command the way a user runs the pipeline (this venv's python first on PATH, no phoning home)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFERLAB_LOG": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def copy_project(repo: Path) -> Path:
    """The pipeline's files (dvc.yaml, the opt-in curve/, deploy/ and detection/ pipeline.yaml, stages, the
    library, ignore files) copied into `repo`."""
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "curve", "deploy", "detection", "stages", "transferlab", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            # curve/, deploy/, detection/: the opt-in templates only (their dvc.yaml, lock, models and predictions
            # are a local run's)
            opt_in = item in ("curve", "deploy", "detection")
            local = ("dvc.yaml", "dvc.lock", "predictions", "models") if opt_in else ()
            ignore = shutil.ignore_patterns("__pycache__", *local)
            shutil.copytree(src, repo / item, ignore=ignore)
        else:
            shutil.copy(src, repo / item)
    return repo


def init_repo(repo: Path) -> None:
    """git init + dvc init (no analytics) in `repo`."""
    sh("git", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=repo)


def write_image_folder(root: Path) -> dict:
    """Three classes x 14 synthetic 24 px PNGs under `root/images/<class>/` (a bright band per class), and the
    default params pointed at them with tiny per-class counts; returns those params."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square", "stripe"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(14):
            img = rng.integers(0, 50, (24, 24, 3), dtype=np.uint8)
            img[c * 8 : c * 8 + 8] = 230
            Image.fromarray(img).save(root / "images" / name / f"{i}.png")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        dataset="imagefolder", path="images", image_size=32, train_per_class=6, val_per_class=3, test_per_class=5
    )
    return params


TINY_SPEC = {"kind": "random_init", "arch": "test_efficientnet"}


def write_stage_inputs(root: Path, images: dict, labels: dict, class_names: list[str], source) -> None:
    """What `train@` / `tune@` read, as prepare, features@ and score would write it under `root`: the prepared
    splits (`prepared/`), `source`'s features cache of train and val (`features/tiny/`), and `selection.json`
    naming `tiny` (TINY_SPEC, the spec `source` is loaded from)."""
    from transferlab.core.io import write_json
    from transferlab.data.splits import save_prepared
    from transferlab.models.inference import extract

    splits = {s: {"images": images[s], "labels": labels[s], "source_index": np.arange(len(labels[s]))} for s in labels}
    save_prepared(root / "prepared", splits, class_names, {})
    (root / "features" / "tiny").mkdir(parents=True, exist_ok=True)
    for s in ("train", "val"):
        feats, _ = extract(source.model, images[s], source.mean, source.std)
        np.save(root / "features" / "tiny" / f"{s}_features.npy", feats)
    write_json(root / "selection.json", {"selected": "tiny", "spec": TINY_SPEC})


def build(repo: Path, train_device: str | None = None) -> Path:
    """Lay out the tiny project in `repo` (git init, dvc init); nothing is run yet. `train_device` overrides
    `train.device` (tests/gpu/gpu_check.py: cuda)."""
    import timm
    import torch

    copy_project(repo)
    params = write_image_folder(repo)
    params["train"].update(
        epochs=2, patience=1, batch_size=8, source="auto", seeds=[0, 1], lr_grid=[1.0, 3.0], lr_search_epochs=1
    )
    if train_device:
        params["train"]["device"] = train_device
    params["strategies"] = {
        "scratch": {"lr": 0.003},
        "linear_probe": {"epochs": 3},
        "finetune_top": {"k": 1},
        "lora": {"rank": 2},
    }
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), repo / "test_resnet.pth")
    params["sources"] = {
        "efficientnet_lite0": {"kind": "packaged"},
        "local_resnet": {"kind": "timm", "arch": "test_resnet", "path": "test_resnet.pth"},
        "random_init": {"kind": "random_init", "arch": "test_efficientnet"},
    }
    params["pretrain"] = {}
    params["score"]["latency_repeats"] = 2
    params["agreement"].update(finetune_epochs=1, n_bootstrap=100)
    params["compare"]["n_bootstrap"] = 200
    params["diagnose"].update(
        forgetting_source=None, probe_images=24, mmd_permutations=50, remedy_epochs=1, n_bootstrap=200
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(repo)
    return repo

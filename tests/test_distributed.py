"""Data-parallel training (train.processes, torchrun, DistributedDataParallel on gloo): two processes split
every batch and train to the one-process result.

Checked against a one-process run of the same seed: exactly (to float rounding) where nothing but the batch
is split (a linear head on features; LoRA, whose source BatchNorm stays frozen), within noise where
BatchNorm in training mode sees half a batch per process (full fine-tuning). Each process must have
trained on its own half: a launcher that gave every process the whole batch would match too, and fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

TESTS = Path(__file__).parent
ENV = {**os.environ, "DDP_EPOCHS": "8", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFERLAB_LOG": "WARNING"}
STRATEGIES = ["linear_probe", "lora", "finetune_full"]


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same training in one process, and in two under torchrun."""
    out = {1: tmp_path_factory.mktemp("one"), 2: tmp_path_factory.mktemp("two")}
    worker = str(TESTS / "ddp_worker.py")
    _run([sys.executable, worker, str(out[1]), *STRATEGIES])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker, str(out[2])]
        + STRATEGIES
    )
    return out


def _load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_process_trains_on_its_half_of_every_batch(runs, name):
    whole = json.loads((runs[1] / f"{name}.rank0.seen.json").read_text())
    halves = [json.loads((runs[2] / f"{name}.rank{r}.seen.json").read_text()) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole)  # the same steps in both processes
    assert [a + b for a, b in zip(*halves, strict=True)] == whole  # together: exactly the one-process batches
    assert all(abs(a - b) <= 1 for a, b in zip(*halves, strict=True)) and max(halves[0]) < max(whole)
    assert _load(runs[2], name)["processes"] == 2 and _load(runs[1], name)["processes"] == 1


@pytest.mark.parametrize("name", ["linear_probe", "lora"])
def test_two_processes_train_to_the_one_process_weights(runs, name):
    one, two = _load(runs[1], name), _load(runs[2], name)
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():
        np.testing.assert_allclose(two["state"][key], value, rtol=0, atol=1e-5, err_msg=f"{name}: {key}")
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["val_accuracy"] == b["val_accuracy"] and a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert one["best_val_accuracy"] >= 0.9  # it learned: matching an untrained run would prove little


def test_full_fine_tuning_lands_within_noise_of_one_process(runs):
    """BatchNorm statistics per half batch: not the same numbers, the same result within a few of the 18
    validation images (an untrained network stays at 1/3)."""
    one, two = _load(runs[1], "finetune_full"), _load(runs[2], "finetune_full")
    assert one["best_val_accuracy"] >= 0.8 and two["best_val_accuracy"] >= 0.8
    assert abs(one["best_val_accuracy"] - two["best_val_accuracy"]) <= 3 / 18 + 1e-6
    assert one["history"][0]["train_loss"] != two["history"][0]["train_loss"]  # BatchNorm did see half batches


def _project(tmp_path: Path, processes: int) -> Path:
    """A tiny project with what train@linear_probe reads: prepared splits, the features cache, the selection."""
    from conftest import make_images
    from tiny_repo import TINY_SPEC, write_stage_inputs

    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec

    root = tmp_path / f"p{processes}"
    images, labels = {}, {}
    for i, (s, n) in enumerate((("train", 12), ("val", 6), ("test", 6))):
        images[s], labels[s] = make_images(n, 3, 32, seed=i)
    write_stage_inputs(root, images, labels, ["a", "b", "c"], load_source("tiny", SourceSpec(**TINY_SPEC), seed=0))
    params = {
        "sources": {"tiny": TINY_SPEC},
        "strategies": {"scratch": {}, "linear_probe": {"lr": 0.05}},
        "diagnose": {"forgetting_source": None},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "t"},
        "train": {
            "source": "tiny",
            "seeds": [0, 1],
            "batch_size": 10,
            "epochs": 6,
            "patience": 3,
            "lr_grid": [0.5, 1.0],
            "lr_search_epochs": 2,
            "processes": processes,
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_the_train_stage_relaunches_itself_under_torchrun(tmp_path):
    """`train.processes: 2`: the stage starts itself again under torchrun; the metrics are the one-process
    stage's (a linear head: same weights), written once, in one MLflow run tagged with the process count."""
    argv = "--strategy linear_probe --prepared prepared --features features --selection selection.json "
    argv += "--out models/linear_probe --metrics metrics.json --history history --perf perf.json --run-info run.json"
    env = {k: v for k, v in ENV.items() if k not in ("MLFLOW_TRACKING_URI", "LOCAL_RANK", "WORLD_SIZE")}
    metrics = {}
    for processes in (1, 2):
        root = _project(tmp_path, processes)
        _run([sys.executable, "-m", "stages.train", *argv.split()], cwd=root, env=env)
        metrics[processes] = json.loads((root / "metrics.json").read_text())
    one, two = metrics[1], metrics[2]
    assert two["per_seed"].keys() == {"0", "1"} and two["lr"] == one["lr"] and two["converged"] == one["converged"]
    for seed, run in two["per_seed"].items():
        ref = one["per_seed"][seed]
        for key in ("best_val_accuracy", "best_epoch", "epochs_run", "final_train_accuracy", "images_seen"):
            assert run[key] == ref[key], (seed, key)
        assert run["best_val_loss"] == pytest.approx(ref["best_val_loss"], abs=1e-5)
    info = json.loads((tmp_path / "p2" / "run.json").read_text())
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'p2' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 trained, rank 0 alone recorded
    assert runs[0].data.tags["processes"] == "2" and runs[0].info.run_id == info["mlflow_run_id"]
    assert runs[0].data.params["resolved.processes"] == "2"

"""One end-to-end `dvc repro` of the real dvc.yaml on a tiny config, in a temporary git repository:
real stages, real MLflow database, real packaged ImageNet weights, real peft LoRA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny_repo import build, sh

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


_sh = sh


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = build(tmp_path_factory.mktemp("e2e"))
    _sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    return repo


def test_repro_writes_every_output(repo):
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["strategies"]) == {"scratch", "linear_probe", "finetune_top", "lora", "raw_pixel_logreg"}
    lora = summary["strategies"]["lora"]
    gain = lora["gain_vs_scratch"]["accuracy"]
    assert gain["ci_low"] <= gain["gain"] <= gain["ci_high"]
    assert lora["seeds"] == 2 and set(lora["per_seed_test_accuracy"]) == {"0", "1"}
    # Two epochs cannot show a 1-epoch plateau for every model: whatever did not converge gets no verdict.
    for name, row in summary["strategies"].items():
        if name not in ("scratch", "raw_pixel_logreg") and not (
            row["converged"] and summary["strategies"]["scratch"]["converged"]
        ):
            assert row["verdict"].startswith("inconclusive (")
    assert "validation" in summary["protocol"] and summary["recommendation"]["choice"] in summary["strategies"]
    assert "equal_compute" in lora
    for seed in (0, 1):
        assert (repo / f"models/lora/seed_{seed}/adapter/adapter_model.safetensors").is_file()
    # Provenance lives outside the model folder that evaluate@lora depends on.
    assert not (repo / "models/lora/run_info.json").exists()
    info = json.loads((repo / "runs/train/lora.json").read_text())
    assert info["mlflow_run_id"] and info["params"]["strategies.lora"]["rank"] == 2
    train = json.loads((repo / "metrics/train/lora.json").read_text())
    assert train["seeds"] == [0, 1] and "convergence" in train["per_seed"]["0"]
    # The grid [1, 3], perhaps tried again at twice the budget, perhaps extended beyond an edge: one chosen rate.
    live = [r for r in train["lr_search"] if not r.get("superseded")]
    assert len(live) >= 2 and sum(r["chosen"] for r in live) == 1 and train["lr"] in {r["lr"] for r in live}
    assert (repo / "mlflow.db").is_file()
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["train_samples"] == 18 and data["num_classes"] == 3
    history = (repo / "plots/history/scratch/seed_0.csv").read_text().splitlines()
    assert history[0] == "epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,grad_norm,train_gflops"
    predictions = (repo / "predictions/lora.csv").read_text().splitlines()
    assert predictions[0].startswith("sample_id,seed,y_true,y_pred") and len(predictions) == 1 + 2 * 15
    score = json.loads((repo / "metrics/score.json").read_text())
    assert set(score["candidates"]) == {"efficientnet_lite0", "local_resnet", "random_init"}
    assert score["selected"] != "random_init" and score["train_source"] == score["selected"]
    assert all(score["candidates"][c]["logme"] is not None for c in score["candidates"])
    assert json.loads((repo / "data/selection.json").read_text())["selected"] == score["selected"]
    agreement = json.loads((repo / "metrics/agreement.json").read_text())
    assert set(agreement["recipes"]) == {"linear_probe", "short_finetune"}
    assert (repo / "plots/agreement.png").is_file() and (repo / "plots/compute.png").is_file()
    diagnosis = json.loads((repo / "metrics/diagnosis.json").read_text())
    assert diagnosis["summary"]["checks_run"]
    html = (repo / "reports/report.html").read_text()
    assert "<table>" in html and "Protocol" in html and "equal compute" in html


def test_two_checkouts_in_other_folders_write_identical_outputs(repo, tmp_path_factory):
    """Nothing an output records depends on where the checkout lives (an absolute venv path in a features
    cache's source.json once made every clone rewrite dvc.lock): the tiny project built and reproduced in a
    second folder, at another depth, gives every output byte for byte and the same dvc.lock (same machine, so
    the same floating point). Timings (perf/, and the report's training-seconds column), the MLflow run ids (runs/) and
    the MLflow database are the only files allowed to differ."""
    import hashlib

    TIMED = {"report.md", "report.html"}  # the report prints each model's training seconds

    other = build(tmp_path_factory.mktemp("elsewhere") / "two" / "levels" / "down")
    _sh(sys.executable, "-m", "dvc", "repro", cwd=other)

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("data", "models", "metrics", "predictions", "plots", "reports")
            for p in sorted((root / top).rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name not in TIMED
        }

    a, b = digests(repo), digests(other)
    assert len(a) > 50
    assert sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)) == []

    def lock_without_timings(root: Path) -> dict:
        lock = yaml.safe_load((root / "dvc.lock").read_text())

        def timed(entry: dict) -> bool:
            # timings, and the audit records of runs/ (each holds its execution's MLflow run id)
            return entry["path"].startswith(("perf/", "runs/")) or Path(entry["path"]).name in TIMED

        for stage in lock["stages"].values():
            for part in ("deps", "outs"):
                stage[part] = [e for e in stage.get(part, []) if not timed(e)]
        return lock

    assert lock_without_timings(repo) == lock_without_timings(other)


def test_the_report_renders_in_a_browser(repo, tmp_path):
    """Every figure of the real report (gain, compute, agreement, learning curves, the confusion of scratch and
    of the recommended model when that is another trained model) decodes in headless Chromium, with no console
    message and no request to the network."""
    from browser import assert_report_renders

    summary = json.loads((repo / "metrics/summary.json").read_text())
    choice = summary["recommendation"]["choice"]
    extra = int(choice not in (None, "scratch", "raw_pixel_logreg"))
    page = assert_report_renders(repo / "reports/report.html", tmp_path, min_figures=5 + extra, min_tables=5)
    assert page["body"]["figures"] == str(5 + extra)


def test_second_repro_does_nothing(repo):
    out = _sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert "Running stage" not in out
    assert "up to date" in _sh(sys.executable, "-m", "dvc", "status", cwd=repo).lower()


def test_changing_lora_rank_invalidates_only_the_lora_branch(repo):
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["strategies"]["lora"]["rank"] = 4
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(_sh(sys.executable, "-m", "dvc", "status", "--json", cwd=repo))
    finally:
        params_path.write_text(original)
    # compare and diagnose read the list of strategies, so they are listed too; no other strategy is.
    assert set(status) == {"train@lora", "compare", "diagnose"}


def test_forced_rerun_of_a_train_stage_leaves_downstream_cached(repo):
    """Provenance (run id, git state) is written outside models/<strategy>: identical weights, same hash."""
    _sh(sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train@linear_probe", cwd=repo)
    status = _sh(sys.executable, "-m", "dvc", "status", cwd=repo)
    assert "evaluate@linear_probe" not in status, status


def test_mlflow_holds_one_finished_run_per_stage(repo):
    import sqlite3

    db = sqlite3.connect(repo / "mlflow.db")
    rows = db.execute("select r.name, r.status from runs r").fetchall()
    names = {n for n, s in rows if s == "FINISHED"}
    assert {"prepare", "score", "agreement", "train@lora", "evaluate@lora", "baseline", "compare", "diagnose"} <= names


def test_a_killed_training_stage_loses_nothing_and_reruns_identically(repo):
    """`kill -9` of DVC and train@finetune_top at a seeded moment inside its MLflow run (tests/faults.py
    does every kind of stage): the killed run is left RUNNING; `dvc checkout` brings the previous models back
    from the cache without computing; `dvc repro` then reproduces every output byte for byte, and the killed
    run ends up KILLED, none RUNNING. Last in this module: it adds runs to the MLflow database."""
    import random

    from faults import kill_inside, running_runs, snapshot, statuses  # tests/faults.py, beside tiny_repo

    reference = snapshot(repo)
    kill = kill_inside(repo, "train@finetune_top", delay=round(random.Random(0).uniform(0.0, 0.1), 2))
    assert kill["killed"], kill
    left = running_runs(repo)
    assert [name for _, name in left] == ["train@finetune_top"]
    models = {k: v for k, v in reference.items() if k.startswith("models/finetune_top/")}
    assert models
    # DVC removed them before running the stage; on the tiny data the stage may have written them again
    # before the kill (docs/faults.md counts what each kind of stage loses). Either way, they come back:
    for k in models:
        (repo / k).unlink(missing_ok=True)
    _sh(sys.executable, "-m", "dvc", "checkout", "train@finetune_top", cwd=repo)
    assert {k: v for k, v in snapshot(repo).items() if k in models} == models  # back, nothing recomputed
    _sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    after = snapshot(repo)
    assert {k for k in reference if after.get(k) != reference[k]} == set()
    assert running_runs(repo) == [] and statuses(repo, [r for r, _ in left]) == ["KILLED"]
    assert "up to date" in _sh(sys.executable, "-m", "dvc", "status", cwd=repo).lower()

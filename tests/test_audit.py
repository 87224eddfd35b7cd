"""`transferlab audit`: the hash chain commit -> dvc.lock -> MLflow run -> files, with deliberate tampering.

The fixture plays the pipeline without running it: it commits code and params, then "runs" train@lora and
evaluate@lora through the real `stage_run` / `run_info` (a real MLflow SQLite database, a real artifact),
writes the dvc.lock DVC would write (md5s computed the way DVC does, checked in test_revisions below) and
commits it, as a user does after `dvc repro`. Each test audits a copy, untouched or tampered with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from transferlab import cli
from transferlab.core.io import path_sha256, write_json
from transferlab.params import TrackingParams
from transferlab.provenance import revisions as rv
from transferlab.provenance.audit import audit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def fake_pipeline(repo: Path, weights: bytes) -> None:
    """What `dvc repro train@lora evaluate@lora` leaves behind (outputs, provenance, MLflow runs, dvc.lock)."""
    import mlflow

    from transferlab.provenance.tracking import run_info, stage_run

    params = yaml.safe_load((repo / "params.yaml").read_text())
    tracking = TrackingParams(uri=f"sqlite:///{repo}/mlflow.db", experiment="audit")
    read = {"seed": params["seed"], "strategies.lora": params["strategies"]["lora"]}
    cwd = os.getcwd()
    os.chdir(repo)  # stage_run reads git state and places artifacts relative to the working directory
    try:
        with stage_run(tracking, "train@lora", read, strategy="lora") as run:
            seed_dir = repo / "models" / "lora" / "seed_0"
            seed_dir.mkdir(parents=True, exist_ok=True)
            (seed_dir / "model.pt").write_bytes(weights)
            write_json(seed_dir / "model_meta.json", {"strategy": "lora", "seed": 0})
            train_metrics = {"best_val_accuracy_mean": 0.81, "trainable_params": 1234, "converged": True}
            write_json(repo / "metrics/train/lora.json", train_metrics)
            mlflow.log_metrics({"best_val_accuracy_mean": 0.81, "trainable_params": 1234.0})
            info = run_info(run, "train@lora", read, {}, extra={"model_sha256": path_sha256(repo / "models/lora")})
            write_json(repo / "runs/train/lora.json", info)
            mlflow.log_artifacts(str(repo / "models/lora"), artifact_path="model")
        with stage_run(tracking, "evaluate@lora", {"seed": params["seed"]}, strategy="lora"):
            eval_metrics = {"test_accuracy": 0.795, "macro_f1": 0.79123, "seeds": 1}
            write_json(repo / "metrics/eval/lora.json", eval_metrics)
            (repo / "predictions").mkdir(exist_ok=True)
            (repo / "predictions/lora.csv").write_text("sample_id,seed,y_true,y_pred\n0,0,1,1\n")
            mlflow.log_metrics({"test_accuracy": 0.795, "macro_f1": 0.79123, "seeds": 1.0})
            mlflow.set_tag("model_sha256", path_sha256(repo / "models/lora"))
    finally:
        os.chdir(cwd)

    def entry(path: str) -> dict:
        return {"path": path, "hash": "md5", "md5": rv.dvc_md5(repo / path)}

    lock = {
        "schema": "2.0",
        "stages": {
            "train@lora": {
                "cmd": "python -m stages.train --strategy lora",
                "deps": [entry("stages/train.py")],
                "params": {"params.yaml": {"seed": params["seed"], "strategies.lora": params["strategies"]["lora"]}},
                "outs": [entry("metrics/train/lora.json"), entry("models/lora"), entry("runs/train/lora.json")],
            },
            "evaluate@lora": {
                "cmd": "python -m stages.evaluate --strategy lora",
                "deps": [entry("models/lora"), entry("stages/evaluate.py")],
                "params": {"params.yaml": {"seed": params["seed"]}},
                "outs": [entry("metrics/eval/lora.json"), entry("predictions/lora.csv")],
            },
        },
    }
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    write_json(repo / "metrics/summary.json", {"recommendation": {"choice": "lora"}})


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("audit_src") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("/models/\n/runs/\n/predictions/\n/mlflow.db\n/mlartifacts/\n")
    (repo / "stages").mkdir()
    (repo / "stages/train.py").write_text("# train\n")
    (repo / "stages/evaluate.py").write_text("# evaluate\n")
    (repo / "params.yaml").write_text(
        "seed: 42\ntracking: {uri: 'sqlite:///mlflow.db', experiment: audit}\nstrategies:\n  lora: {rank: 8}\n"
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "code and params")
    fake_pipeline(repo, weights=b"\x00weights-of-lora" * 100)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "dvc repro: lock and metrics")
    return repo


@pytest.fixture
def repo(pipeline_repo, tmp_path, monkeypatch) -> Path:
    """A copy to tamper with (the MLflow artifact store stays the original's: absolute paths)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dst = tmp_path / "repo"
    shutil.copytree(pipeline_repo, dst, symlinks=True)
    return dst


def statuses(report) -> dict[tuple[str, str], str]:
    return {(c.subject, c.against): c.status for a in report.audits for c in a.checks}


def test_untampered_chain_is_ok(repo, capsys):
    report = audit(repo, "champion")
    assert report.ok, [c for c in report.failures]
    st = statuses(report)
    assert st[("models/lora", "dvc.lock (train@lora)")] == "ok"
    assert st[("models/lora", "runs/train/lora.json model_sha256")] == "ok"
    assert any(s == "ok" and subj == "metrics/eval/lora.json" and "MLflow" in ag for (subj, ag), s in st.items())
    assert any(s == "ok" and "artifact" in ag for (_, ag), s in st.items())  # the logged weights = the folder
    # The run happened at the parent commit; the commit relation is checked through the stage's inputs.
    assert any(ag == "git commit" and s == "ok" for (_, ag), s in st.items())
    assert cli.main(["-C", str(repo), "audit", "models/lora"]) == 0
    assert "VERDICT: OK" in capsys.readouterr().out
    run_id = json.loads((repo / "runs/train/lora.json").read_text())["mlflow_run_id"]
    assert audit(repo, run_id).ok
    assert audit(repo, "HEAD").ok  # a revision: its git-tracked metrics against its lock, runs found by commit


def test_edited_metrics_file_is_a_mismatch(repo, capsys):
    path = repo / "metrics/eval/lora.json"
    m = json.loads(path.read_text())
    m["test_accuracy"] = 0.9  # a nicer number, typed in by hand
    path.write_text(json.dumps(m))
    report = audit(repo, "lora")
    st = statuses(report)
    assert not report.ok
    assert st[("metrics/eval/lora.json", "dvc.lock (evaluate@lora)")] == "mismatch"
    assert any(subj == "metrics/eval/lora.json" and "MLflow" in ag and s == "mismatch" for (subj, ag), s in st.items())
    assert cli.main(["-C", str(repo), "audit", "champion"]) == 1
    assert "VERDICT: FAILED" in capsys.readouterr().out


def test_modified_weights_are_a_mismatch(repo):
    with open(repo / "models/lora/seed_0/model.pt", "r+b") as fh:
        fh.write(b"\x01")  # one flipped byte
    st = statuses(audit(repo, "models/lora/"))
    assert st[("models/lora", "dvc.lock (train@lora)")] == "mismatch"
    assert st[("models/lora", "runs/train/lora.json model_sha256")] == "mismatch"
    assert any(subj == "models/lora" and "artifact" in ag and s == "mismatch" for (subj, ag), s in st.items())


def test_run_from_a_dirty_tree_is_flagged(repo):
    (repo / "stages/train.py").write_text("# train, edited but not committed\n")
    fake_pipeline(repo, weights=b"\x00other-weights" * 100)  # dvc.lock and files consistent with each other
    report = audit(repo, "lora")
    flags = [c for c in report.failures if c.against == "git dirty flag"]
    assert flags and flags[0].status == "flagged" and "stages/train.py" in flags[0].detail
    assert statuses(report)[("models/lora", "dvc.lock (train@lora)")] == "ok"  # only the dirty tree is wrong


def test_dirty_only_in_pipeline_outputs_is_not_flagged(repo):
    # A rerun that rewrites a git-tracked metrics file before a later stage runs: outputs, not edits.
    (repo / "metrics/eval/lora.json").write_text("{}\n")
    fake_pipeline(repo, weights=b"\x00weights-of-lora" * 100)
    report = audit(repo, "lora")
    assert report.ok, report.failures


def test_unknown_target_and_missing_recommendation_exit_2(repo, capsys):
    assert cli.main(["-C", str(repo), "audit", "no-such-thing"]) == 2
    assert "champion" in capsys.readouterr().err
    (repo / "metrics/summary.json").write_text("{}")
    assert cli.main(["-C", str(repo), "audit", "champion"]) == 2
    assert "dvc repro compare" in capsys.readouterr().err


def test_dvc_md5_matches_dvc_itself(tmp_path):
    """The folder hash audit compares with dvc.lock is DVC's own (`dvc add` writes it into the .dvc file)."""
    dvc = shutil.which("dvc") or str(Path(os.sys.executable).parent / "dvc")
    git(tmp_path, "init", "-q")
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "x.txt").write_text("a\n")
    (d / "sub" / "y.bin").write_bytes(b"\x00\x01")
    subprocess.run([dvc, "add", "-q", "d"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "d.dvc").read_text())["outs"][0]["md5"]
    assert rv.dvc_md5(d) == recorded
    assert rv.cache_path(tmp_path, recorded) is not None  # files/md5/<2>/<30>.dir, where DVC 3 put it

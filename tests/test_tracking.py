"""MLflow tracking: a real run in a real SQLite database; an unreachable server fails fast and clearly."""

from __future__ import annotations

import time

import pytest

from transferlab.params import TrackingParams
from transferlab.provenance.tracking import TrackingError, check_reachable, flatten, run_info, stage_run


def test_stage_run_records_params_tags_and_provenance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/t.db", experiment="t")
    with stage_run(tracking, "train@lora", {"strategies.lora": {"rank": 4}}, strategy="lora") as run:
        info = run_info(run, "train@lora", {"rank": 4}, {"prepared": "abc"})
    import mlflow

    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["strategies.lora.rank"] == "4"
    assert got.data.tags["stage"] == "train@lora" and got.data.tags["strategy"] == "lora"
    assert {"git_commit", "git_dirty", "params_sha256"} <= set(got.data.tags)
    assert info["mlflow_run_id"] == run.info.run_id and info["input_sha256"] == {"prepared": "abc"}
    assert "torch" in info["library_versions"]


def test_failed_stage_marks_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/t.db", experiment="t")
    with pytest.raises(RuntimeError), stage_run(tracking, "x", {}) as run:
        raise RuntimeError("boom")
    import mlflow

    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_unreachable_server_fails_fast_with_the_fix():
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable.*sqlite:///mlflow.db"):
        check_reachable("http://127.0.0.1:9", timeout_s=2)
    assert time.perf_counter() - start < 10


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_champion_alias_follows_the_recommendation_and_keeps_its_history(tmp_path, monkeypatch):
    """Two successive recommendations: the alias moves, the versions carry the history MLflow does not keep."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from transferlab.params import TrackingParams
    from transferlab.provenance.tracking import EXPERIMENT_TAGS, register_champion, stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp")
    assert register_champion(tracking, "lora", {}) is None  # nothing trained yet
    for name in ("lora", "finetune_full"):
        with stage_run(tracking, f"train@{name}", {"x": 1}, strategy=name):
            (tmp_path / "w.txt").write_text(name)
            mlflow.log_artifact(str(tmp_path / "w.txt"), artifact_path="model")
    first = register_champion(tracking, "lora", {"commit": "abc"})
    second = register_champion(tracking, "finetune_full", {"commit": "def"})
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("exp", "champion").version) == second["version"]
    new = client.get_model_version("exp", second["version"])
    old = client.get_model_version("exp", first["version"])
    assert new.tags["strategy"] == "finetune_full" and new.tags["champion.previous_version"] == first["version"]
    assert old.tags["champion.replaced_by_version"] == second["version"]
    assert (
        client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == EXPERIMENT_TAGS["mlflow.experimentKind"]
    )


_CHILD = """
import os, signal, sys
from transferlab.params import TrackingParams
from transferlab.provenance.tracking import stage_run
tracking = TrackingParams(uri=sys.argv[1], experiment="t")
with stage_run(tracking, "train@" + sys.argv[2], {}) as run:
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
"""


def _child_run(tmp_path, uri: str, signal_name: str) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, uri, signal_name], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    return proc.returncode, proc.stdout.strip().splitlines()[0]


def test_a_stage_killed_with_sigkill_is_marked_killed_by_the_next_stage(tmp_path, monkeypatch):
    """kill -9 leaves the run RUNNING (nothing in the process can end it); the next stage run on this host
    finds its pid dead and marks it KILLED, with which stage noticed."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/t.db"
    code, run_id = _child_run(tmp_path, uri, "SIGKILL")
    assert code == -9
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    with stage_run(TrackingParams(uri=uri, experiment="t"), "score", {}):
        pass
    killed = mlflow.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["transferlab.killed_detected_by"] == "score"


def test_a_live_run_of_another_process_is_left_running(tmp_path, monkeypatch):
    """Two stages at once (dvc queue -j 2): a RUNNING run whose process is alive is not touched."""
    import os

    import mlflow

    from transferlab.provenance.tracking import mark_orphaned_runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/t.db", experiment="t")
    with stage_run(tracking, "train@a", {}) as run:
        assert str(os.getpid()) == run.data.tags["transferlab.pid"]
        assert mark_orphaned_runs(run.info.experiment_id, stage="other") == []
        assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"


def test_sigterm_ends_the_run_as_killed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/t.db"
    code, run_id = _child_run(tmp_path, uri, "SIGTERM")
    assert code != 0
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(run_id).info.status == "KILLED"


def test_queued_experiments_track_into_the_projects_database(tmp_path, monkeypatch):
    """`dvc queue start` runs each experiment in <project>/.dvc/tmp/exps/tmpXXXX, deleted afterwards: the
    relative `sqlite:///mlflow.db` and the artifact folder must resolve to the project, not to that copy."""
    import mlflow

    from transferlab.provenance.tracking import project_root, resolve_uri

    workspace = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_root() == (tmp_path / "proj").resolve()
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{(tmp_path / 'proj').resolve()}/mlflow.db"
    assert resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"  # absolute paths stay
    assert resolve_uri("http://host:5000") == "http://host:5000"
    with stage_run(TrackingParams(uri="sqlite:///mlflow.db", experiment="q"), "train@lora", {}) as run:
        pass
    assert (tmp_path / "proj" / "mlflow.db").is_file() and not (workspace / "mlflow.db").exists()
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "proj" / "mlartifacts").resolve().as_uri()


_RACER = """
import os, sys, time
from pathlib import Path
from transferlab.params import TrackingParams
from transferlab.provenance.tracking import stage_run
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
with stage_run(TrackingParams(uri=sys.argv[1], experiment="race"), "stage" + sys.argv[3], {}):
    pass
"""


def test_stages_starting_at_once_on_a_new_database_all_succeed(tmp_path):
    """dvc queue start -j 2: two stages set up a new SQLite database at the same moment. Unserialised, MLflow's
    schema migrations collided ("duplicate column name: step") and a stage failed."""
    import os
    import sqlite3
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    uri, go = f"sqlite:///{tmp_path}/m.db", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, uri, str(go), str(i)],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    import time

    time.sleep(4)  # every child imported and waiting
    go.write_text("")
    errors = [p.communicate()[1][-500:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    db = sqlite3.connect(tmp_path / "m.db")
    assert db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] == 4
    assert db.execute("select count(*) from experiments where name = 'race'").fetchone()[0] == 1

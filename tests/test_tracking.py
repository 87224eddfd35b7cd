"""MLflow tracking: a real run in a real SQLite database; an unreachable server fails fast and clearly."""

from __future__ import annotations

import time

import pytest

from transferlab.params import TrackingParams
from transferlab.tracking import TrackingError, check_reachable, flatten, run_info, stage_run


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
    from transferlab.tracking import EXPERIMENT_TAGS, register_champion, stage_run

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

"""The multi-user tracking set-up, for real: scripts/tracking_server.sh starts PostgreSQL (Debian's package) and
an MLflow tracking server on it in a temporary state folder; a real `tune@` stage tracks into the server and
keeps its Optuna study in PostgreSQL, two Optuna workers share one study there, and a stopped server fails a
stage before any work, then serves the same runs again once restarted."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import two_worker_study
from mlflow.tracking import MlflowClient
from tiny_repo import write_image_folder, write_stage_inputs

from transferlab.tuning.optuna_backend import tune
from transferlab.tuning.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tracking_server.sh"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on (bound to port 0 together, so the kernel hands out distinct ones)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class Server:
    state: Path
    pg_port: int
    mlflow_port: int

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def optuna_url(self) -> str:
        # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the lock does not install.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/optuna"

    def script(self, command: str) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "TRACKING_STATE": str(self.state),
            "TRACKING_PG_PORT": str(self.pg_port),
            "TRACKING_MLFLOW_PORT": str(self.mlflow_port),
            "MLFLOW": str(Path(sys.executable).parent / "mlflow"),  # this venv's mlflow serves
        }
        return subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=240)

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        """Rows of `query` in PostgreSQL's `mlflow` database: what the server really stored, not its API."""
        import psycopg2

        # closing(): psycopg2's own `with conn` ends the transaction but leaves the connection open.
        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, dbname="mlflow", user="postgres")
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """PostgreSQL + MLflow server started by the script in a fresh state folder on free ports; stopped at the
    end of the module, also when a test fails."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.fail("PostgreSQL's server binaries are missing (/usr/lib/postgresql/*/bin/initdb): run `make postgres`")
    # Under /tmp itself, not pytest's tmp_path: as root the server runs as the `postgres` user, who cannot enter
    # pytest's 0700 folders; and a unix socket path must stay under 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="tracking-", dir="/tmp"))
    state.chmod(0o755)
    srv = Server(state, *_free_ports(2))
    t = time.perf_counter()
    started = srv.script("start")
    try:
        assert started.returncode == 0, f"start failed:\n{started.stdout}\n{started.stderr}"
        print(f"\ntracking server cold start (initdb, PostgreSQL, MLflow): {time.perf_counter() - t:.1f} s")
        yield srv
    finally:
        stopped = srv.script("stop")
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, f"stop failed:\n{stopped.stdout}\n{stopped.stderr}"


def _stage(cwd: Path, *argv: str, tracking_uri: str) -> subprocess.CompletedProcess:
    """Run `python -m stages.<name> ...` as dvc.yaml calls it, tracking into `tracking_uri`."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(ROOT),
        "TRANSFERLAB_LOG": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_start_is_idempotent_and_prints_the_uris(server):
    again = server.script("start")
    assert again.returncode == 0, again.stderr
    assert "PostgreSQL already running" in again.stdout and "MLflow server already running" in again.stdout
    assert f"MLFLOW_TRACKING_URI={server.uri}" in again.stdout
    assert f"tune.storage: {server.optuna_url}" in again.stdout
    status = server.script("status")
    assert status.returncode == 0 and "MLflow server: running" in status.stdout, status.stdout


def test_a_tune_stage_tracks_into_the_server_with_its_study_in_postgresql(
    server, tiny_source, tiny_data, tmp_path, monkeypatch
):
    """tune@linear_probe, run as dvc.yaml runs it: its MLflow run, params and trials reach the server, its
    artifact is uploaded through the server into the server's artifact folder, the runs are rows of
    PostgreSQL's `mlflow` database, and its Optuna study (two workers) lives in PostgreSQL's `optuna`."""
    monkeypatch.chdir(tmp_path)
    write_stage_inputs(tmp_path, tiny_data["images"], tiny_data["labels"], tiny_data["class_names"], tiny_source)
    params = {
        "sources": {"tiny": {"kind": "random_init", "arch": "test_efficientnet"}},
        "train": {"source": "tiny", "batch_size": 8, "augment": "none"},
        "strategies": {"scratch": {}, "linear_probe": {"lr": 0.003}},
        "diagnose": {"forgetting_source": None},
        # The params' own tracking.uri is the local default: MLFLOW_TRACKING_URI sends the stage to the server.
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "server-test"},
        "tune": {
            "strategies": ["linear_probe"],
            "n_trials": 4,
            "epochs": 1,
            "workers": 2,
            "storage": server.optuna_url,
            "space": {"linear_probe": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = "stages.tune --strategy linear_probe --prepared prepared --features features --selection selection.json"
    argv += " --out tuned/linear_probe.yaml --metrics metrics/linear_probe.json"
    t = time.perf_counter()
    proc = _stage(tmp_path, *argv.split(), tracking_uri=server.uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\ntune@linear_probe (4 trials, 2 workers) against the server: {time.perf_counter() - t:.1f} s")

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("server-test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'tune@linear_probe'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    run = parents[0]
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "linear_probe"
    assert run.data.params["tune.storage"] == server.optuna_url
    metrics = json.loads((tmp_path / "metrics/linear_probe.json").read_text())
    assert math.isclose(run.data.metrics["best_value"], metrics["best_value"])
    assert sorted(r.info.run_name for r in trials) == [f"trial-{i}" for i in range(4)]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {run.info.run_id}

    # The artifact went through the server (mlflow-artifacts:/ proxy) into the server's artifact folder...
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["linear_probe.yaml"]
    local = Path(client.download_artifacts(run.info.run_id, "linear_probe.yaml", str(tmp_path / "download")))
    expected = (tmp_path / "tuned/linear_probe.yaml").read_bytes()
    assert local.read_bytes() == expected
    stored = server.state / "artifacts" / exp.experiment_id / run.info.run_id / "artifacts" / "linear_probe.yaml"
    assert stored.read_bytes() == expected
    # ...and nothing tracking-related was written beside the client.
    assert not {"mlflow.db", "mlruns", "mlartifacts", "optuna.db"} & {p.name for p in tmp_path.iterdir()}

    # The backend really is PostgreSQL: the run and its tag are rows of its tables.
    assert server.sql("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)) == [("FINISHED",)]
    assert server.sql("SELECT value FROM tags WHERE run_uuid = %s AND key = 'stage'", (run.info.run_id,)) == [
        ("tune@linear_probe",)
    ]
    study = optuna.load_study(study_name="tune@linear_probe", storage=server.optuna_url)
    assert len(study.trials) == 4 and math.isclose(study.best_value, metrics["best_value"], abs_tol=1e-6)


def test_two_parallel_workers_share_one_study_on_postgresql(server, tmp_path):
    """Two forked workers on one PostgreSQL study: every trial of the budget ran once (none lost, none
    duplicated), both workers took part, the best trial reported is the best of all, and a second study of
    another name lives beside it untouched."""
    space = SearchSpace.from_dict({"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    common = dict(storage_url=server.optuna_url, base_config={"kind": "lora"}, pruner=False)
    other = tune(lambda c, r: c["lr"], space, n_trials=3, seed=1, study_name="other", **common)
    two_worker_study(server.optuna_url, tmp_path / "calls", study_name="parallel")
    assert {"parallel", "other"} <= set(optuna.get_all_study_names(storage=server.optuna_url))
    kept = optuna.load_study(study_name="other", storage=server.optuna_url)
    assert len(kept.trials) == 3 and kept.best_value == other["best_value"]


def _image_project(root: Path) -> Path:
    """A project folder for `stages.prepare`: the default params on a tiny image folder (3 classes x 14)."""
    params = write_image_folder(root)
    params["tracking"].update(experiment="server-restart", connect_timeout_s=5)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_a_stopped_server_fails_the_stage_before_any_work_and_a_restart_keeps_the_runs(server, tmp_path):
    """Last in this module: it stops and restarts the server. The runs in PostgreSQL and the artifacts
    outlive the restart; while it is down, a stage fails at once with the URI and the fix, writing nothing."""
    project = _image_project(tmp_path)
    argv = ("stages.prepare", "--out", "data/prepared", "--metrics", "metrics/data.json")
    before = MlflowClient(tracking_uri=server.uri).search_experiments()

    stopped = server.script("stop")
    assert stopped.returncode == 0 and "MLflow server stopped" in stopped.stdout, stopped.stderr
    assert "PostgreSQL stopped" in stopped.stdout
    status = server.script("status")
    assert status.returncode == 3 and "MLflow server: stopped" in status.stdout, status.stdout

    t = time.perf_counter()
    failed = _stage(project, *argv, tracking_uri=server.uri)
    seconds = time.perf_counter() - t
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"MLflow tracking server {server.uri} is unreachable" in failed.stderr
    assert "tracking.uri" in failed.stderr and "Traceback" not in failed.stderr
    assert not (project / "data").exists() and not (project / "metrics").exists()  # before any work
    assert seconds < 30, f"an unreachable server took {seconds:.1f} s to be reported"
    print(f"\nprepare against the stopped server: failed in {seconds:.1f} s")

    t = time.perf_counter()
    restarted = server.script("start")
    assert restarted.returncode == 0, f"{restarted.stdout}\n{restarted.stderr}"
    assert "creating the PostgreSQL cluster" not in restarted.stdout  # the same cluster, started again
    print(f"\nwarm restart (PostgreSQL + MLflow): {time.perf_counter() - t:.1f} s")
    client = MlflowClient(tracking_uri=server.uri)
    assert [e.name for e in client.search_experiments()] == [e.name for e in before]

    ok = _stage(project, *argv, tracking_uri=server.uri)
    assert ok.returncode == 0, ok.stderr[-3000:]
    exp = client.get_experiment_by_name("server-restart")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'prepare'")
    assert run.info.status == "FINISHED" and (project / "metrics/data.json").is_file()
    assert server.sql("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)) == [("FINISHED",)]

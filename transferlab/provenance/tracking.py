"""MLflow tracking and provenance: one MLflow run per stage execution, tagged with the stage, strategy,
git commit (and dirty flag) and params hash; `run_info` gathers what an auditor needs into a provenance
record (`runs/<stage>/<name>.json`), kept outside every output another stage depends on.

The DVC metrics files stay the source of truth; MLflow is the audit trail and the UI.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferlab.core.io import dict_sha256
from transferlab.provenance.revisions import flatten  # the one nested-dict flattening (the audit reads it back)

log = logging.getLogger(__name__)

LIBRARIES = ["torch", "torchvision", "timm", "peft", "numpy", "scikit-learn", "dvc", "mlflow", "pandas", "pydantic"]


# MLflow 3 opens an experiment without a kind on its GenAI traces page, empty here; with a kind, the runs
# table (params, metrics) is what a user sees first in `mlflow ui`.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
CHAMPION_ALIAS = "champion"


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI and the fix."""


def project_root(cwd: str | Path | None = None) -> Path:
    """The project's folder, also from inside a DVC experiment's temporary workspace.

    `dvc exp run --queue` / `dvc queue start` run each experiment in `<project>/.dvc/tmp/exps/tmpXXXX/`, a
    copy deleted afterwards: a tracking database or artifact folder there would vanish with it.
    """
    path = Path(cwd or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def resolve_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over params (`tracking.uri`), as MLflow users expect. A relative SQLite path
    is made absolute under the project's folder (`project_root`), so that queued experiments running in DVC's
    temporary workspaces write to the project's database, not to a copy that is deleted."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"
    return uri


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, before any training, when an HTTP tracking server does not answer.

    Raises:
        TrackingError: no answer within `timeout_s`, naming the URI and the two ways out.
    """
    if not uri.startswith(("http://", "https://")):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the user's own server
            if resp.status >= 500:
                raise TrackingError(f"MLflow server {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}). Start it, fix tracking.uri / "
            "MLFLOW_TRACKING_URI, or use the local database: tracking.uri: sqlite:///mlflow.db"
        ) from None


def git_info(cwd: str | Path = ".") -> dict[str, Any]:
    """The commit and whether the work tree differs from it (a dirty run is still recorded, but flagged)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # dvc.lock and generated outputs change during `dvc repro` itself; code and params are what count.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"))
        # Which files: an auditor tells outputs rewritten earlier in the same `dvc repro` (metrics files
        # tracked by git) from edited code or params.
        paths = git("diff", "--name-only", "HEAD", "--", ".", ":!dvc.lock").splitlines() if dirty else []
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": True}
    return {"git_commit": commit, "git_dirty": dirty, "git_dirty_paths": sorted(paths)[:200]}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return versions


@contextlib.contextmanager
def stage_run(
    tracking: Any, stage: str, params: dict[str, Any], *, strategy: str | None = None, tags: dict | None = None
) -> Iterator[Any]:
    """One MLflow run for one stage execution.

    Args:
        tracking: the `tracking` params (uri, experiment, connect_timeout_s).
        stage: DVC stage name, e.g. 'train@lora'.
        params: the params sections this stage read (logged flattened, and hashed into a tag).
        strategy: the strategy name, when the stage has one.
        tags: extra tags.

    Yields:
        The active mlflow run; a failure inside marks it FAILED and re-raises; SIGTERM or Ctrl-C marks it
        KILLED and exits. Runs of this host left RUNNING by a killed process (SIGKILL) are marked KILLED
        first (`mark_orphaned_runs`).

    Raises:
        TrackingError: the tracking server is unreachable.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolve_uri(tracking.uri)
    check_reachable(uri, tracking.connect_timeout_s)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(tracking.connect_timeout_s)))
    import mlflow

    mlflow.set_tracking_uri(uri)
    with _sqlite_setup_lock(uri):
        exp = mlflow.get_experiment_by_name(tracking.experiment)
        if exp is None:
            location = None
            if not uri.startswith(("http://", "https://", "databricks")):
                location = (project_root() / "mlartifacts").as_uri()  # beside the database, not in ./mlruns
            exp_id = mlflow.create_experiment(tracking.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            exp_id = exp.experiment_id
            if any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
                from mlflow.tracking import MlflowClient

                for k, v in EXPERIMENT_TAGS.items():
                    MlflowClient().set_experiment_tag(exp_id, k, v)
        mark_orphaned_runs(exp_id, stage=stage)
    import socket

    all_tags = {
        "stage": stage,
        "transferlab.host": socket.gethostname(),
        "transferlab.pid": str(os.getpid()),
        "params_sha256": dict_sha256(params),
        **{k: ",".join(v)[:4000] if isinstance(v, list) else str(v) for k, v in git_info().items()},
        **({"strategy": strategy} if strategy else {}),
        **(tags or {}),
    }
    run = mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=all_tags)
    try:
        with _sigterm_ends_run():
            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            keys = sorted(flat)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
                mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
            yield run
    except (_Terminated, KeyboardInterrupt):
        mlflow.end_run(status="KILLED")
        raise SystemExit(f"{stage}: interrupted; its MLflow run {run.info.run_id} is marked KILLED") from None
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def mark_orphaned_runs(experiment_id: str, *, stage: str | None = None) -> list[str]:
    """Mark KILLED every RUNNING run of this experiment started on this host by a process that is gone.

    A stage killed with SIGKILL (`kill -9`, the OOM killer, a lost machine) cannot end its own MLflow run,
    which would stay RUNNING for ever. Each run records its host and pid (tags `transferlab.host`,
    `transferlab.pid`); the next stage to start on the same host finds the dead ones here. Runs of other
    hosts are left alone (their processes cannot be checked from here).

    Returns:
        The run ids marked KILLED.
    """
    import socket

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    marked = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("transferlab.pid", "")
        if tags.get("transferlab.host") != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "transferlab.killed_detected_by", stage or "unknown")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s, pid %s) was killed: marked KILLED", run.info.run_id, tags.get("stage"), pid)
        marked.append(run.info.run_id)
    return marked


class _Terminated(BaseException):
    """SIGTERM inside a stage (DVC stopping, a queue worker cancelled): the run ends as KILLED."""


@contextlib.contextmanager
def _sigterm_ends_run() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[None]:
    """One process at a time sets up a SQLite tracking database (MLflow's schema migrations, the experiment).

    Two stages starting at once on a new database (`dvc queue start -j 2`) both ran the migrations and one
    failed ("duplicate column name: step"); an exclusive lock on `<db>.lock` around the set-up serialises
    them. Runs and metrics written later are short transactions that SQLite's busy timeout absorbs.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _current_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def run_info(run: Any, stage: str, params: dict[str, Any], inputs: dict[str, str], extra: dict | None = None) -> dict:
    """What a provenance record in `runs/` holds: resolved params, versions, git, input hashes, MLflow run."""
    return {
        "stage": stage,
        "mlflow_run_id": run.info.run_id,
        "mlflow_experiment_id": run.info.experiment_id,
        "tracking_uri": _current_uri(),
        "params": params,
        "params_sha256": dict_sha256(params),
        "input_sha256": inputs,
        "library_versions": library_versions(),
        **git_info(),
        **(extra or {}),
    }


def register_champion(tracking: Any, strategy: str, tags: dict[str, str]) -> dict[str, Any] | None:
    """Register the recommended strategy's model (its latest finished `train@<strategy>` run's `model`
    artifact) in the Model Registry and point the `champion` alias at it.

    MLflow keeps no history of an alias, so the history lives in model-version tags: the new version gets
    `champion.previous_version`, the one it replaces `champion.replaced_by_version`.

    Args:
        tracking: the `tracking` params.
        strategy: the recommended strategy (a key of `strategies`).
        tags: version tags (commit, metrics).

    Returns:
        {'name', 'version', 'previous_version', 'run_id'}, or None when no finished train run exists.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(resolve_uri(tracking.uri))
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.stage = 'train@{strategy}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    name = tracking.experiment
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="transferlab: the recommended model of each run")
    previous = None
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # no champion yet
        previous = str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"strategy": strategy, **tags, **({"champion.previous_version": str(previous)} if previous else {})},
    ).version
    if previous and str(previous) != str(version):
        client.set_model_version_tag(name, previous, "champion.replaced_by_version", str(version))
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return {"name": name, "version": str(version), "previous_version": previous, "run_id": run.info.run_id}

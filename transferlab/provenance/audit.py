"""Auditing a number: from a commit to the files on disk, every link verified by its hash.

The chain for one strategy: git commit -> `dvc.lock` (params, dependency and output md5s of `train@<s>`
and `evaluate@<s>`) -> the provenance record `runs/train/<s>.json` (MLflow run id, git commit and dirty
flag, params hash, `model_sha256`) -> the MLflow runs (tags, logged metrics, the model artifact) -> the
files on disk (the model folder, the metrics files, the predictions). `audit()` checks each link it can
and returns a table of checks:

* ok:       verified;
* mismatch: two records disagree (tampered weights, an edited metrics file, a run of other params);
* flagged:  the record itself is suspect (a run from a tree with uncommitted code or params);
* warn:     not proof of tampering, but the numbers no longer match the code (a stale stage);
* skipped:  nothing to check against (no MLflow database, no provenance record), said why.

Any mismatch or flag makes the verdict fail. `reevaluate()` reloads the saved model and recomputes the test
metrics with the evaluate stage's own function (`evaluation.predictions.evaluate_model`, on the paths of its
dvc.lock command), to compare them with the recorded ones (`check_reevaluation`).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.provenance import revisions as rv

FAILING = ("mismatch", "flagged")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Metrics files are rounded to 6 decimals (evaluation.py); MLflow stores doubles.
TOLERANCE = 1e-6


class AuditError(RuntimeError):
    """The target cannot be audited at all; the message says what to do."""


@dataclass
class Check:
    subject: str  # what is checked, e.g. 'models/lora'
    against: str  # what it is checked against, e.g. 'dvc.lock (train@lora)'
    status: str  # ok | mismatch | flagged | warn | skipped
    detail: str = ""


@dataclass
class StrategyAudit:
    strategy: str
    rev: str  # 'workspace' or the git rev
    commit: str
    chain: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def add(self, subject: str, against: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(subject, against, status, detail))


@dataclass
class AuditReport:
    target: str
    audits: list[StrategyAudit] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for a in self.audits for c in a.checks if c.status in FAILING]

    @property
    def ok(self) -> bool:
        return not self.failures


# --- target ----------------------------------------------------------------------------------------


def _workspace_strategies(root: Path) -> set[str]:
    lock = rv.read_lock(root, rv.WORKSPACE)
    names = {n.split("@", 1)[1] for n in lock if n.startswith(("train@", "evaluate@"))}
    return names | {p.name for p in (root / "models").glob("*") if p.is_dir() and p.name != "pretrain"}


def resolve_target(root: Path, target: str, client: Any) -> tuple[list[str], str | None, str | None]:
    """(strategies, rev or None for the working tree, MLflow run id or None) for a target.

    Raises:
        AuditError: the target is none of: champion, models/<s>, a strategy, an MLflow run id, a git rev.
    """
    t = target.rstrip("/")
    if t == "champion":
        summary = rv.read_json(root, rv.WORKSPACE, "metrics/summary.json")
        choice = ((summary or {}).get("recommendation") or {}).get("choice")
        if not choice:
            raise AuditError(
                "metrics/summary.json has no recommendation.choice: run `dvc repro compare` (or `dvc pull`) first"
            )
        return [choice], rv.WORKSPACE, None
    known = _workspace_strategies(root)
    name = t.removeprefix("models/")
    if t.startswith("models/") or name in known:
        if name not in known:
            raise AuditError(f"{t}: no such model or strategy (known: {sorted(known)})")
        return [name], rv.WORKSPACE, None
    if RUN_ID.match(t) and client is not None:
        try:
            run = client.get_run(t)
        except Exception:  # noqa: BLE001 - MLflow raises MlflowException for an unknown id; fall through to git
            run = None
        if run is not None:
            strategy = run.data.tags.get("strategy")
            if not strategy:
                raise AuditError(
                    f"MLflow run {t} ({run.data.tags.get('stage')}) has no strategy tag: audit its strategy"
                )
            return [strategy], rv.WORKSPACE, t
    try:
        rv.resolve_commit(root, t)
    except rv.RevisionError:
        raise AuditError(
            f"{target!r} is not 'champion', a model folder (models/<strategy>), a strategy {sorted(known)}, an "
            "MLflow run id in the tracking store, or a git revision"
        ) from None
    lock = rv.read_lock(root, t)
    names = sorted({n.split("@", 1)[1] for n in lock if n.startswith(("train@", "evaluate@"))})
    if not names:
        raise AuditError(f"dvc.lock at {t} records no train@/evaluate@ stage: nothing to audit there")
    return names, t, None


# --- MLflow ----------------------------------------------------------------------------------------


def tracking_uri(root: Path, uri: str | None = None) -> str:
    """The tracking URI: the argument, MLFLOW_TRACKING_URI, params.yaml `tracking.uri`, else sqlite:///mlflow.db;
    a relative sqlite path is taken relative to the repository root."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        params = rv.read_yaml(root, rv.WORKSPACE, "params.yaml") or {}
        uri = (params.get("tracking") or {}).get("uri") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def open_client(uri: str) -> tuple[Any, str]:
    """(MlflowClient or None, a note). A missing SQLite file is not created: None, and the note says so."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return None, f"no MLflow database at {path} (set tracking.uri or MLFLOW_TRACKING_URI)"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the table readable
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def _find_run(client: Any, tags: dict[str, str]) -> Any:
    """The most recent run with all `tags`, or None."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return None
    flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs(exp_ids, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _find_run_near(client: Any, root: Path, stage: str, commit: str, depth: int = 50) -> Any:
    """The latest run of `stage` made at `commit` or one of its `depth` nearest ancestors: a stage usually
    runs before the commit that records its dvc.lock, so its git tag is that commit's parent."""
    for c in rv.git(root, "rev-list", f"--max-count={depth}", commit).splitlines():
        run = _find_run(client, {"stage": stage, "git_commit": c})
        if run is not None:
            return run
    return None


# --- checks ----------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return math.isclose(fa, fb, rel_tol=0, abs_tol=TOLERANCE) or (math.isnan(fa) and math.isnan(fb))


def _numeric(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _compare_metrics(a: StrategyAudit, subject: str, recorded: dict, logged: dict[str, float], against: str) -> None:
    shared = sorted(set(_numeric(recorded)) & set(logged))
    if not shared:
        a.add(subject, against, "skipped", "no metric in common")
        return
    bad = [f"{k}: file {recorded[k]} vs logged {logged[k]}" for k in shared if not _same(recorded[k], logged[k])]
    if bad:
        a.add(subject, against, "mismatch", "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    else:
        a.add(subject, against, "ok", f"{len(shared)} values equal")


def _check_outs(a: StrategyAudit, root: Path, rev: str | None, stage: rv.LockedStage) -> None:
    """Each output of `stage` against its md5 in the lock: on disk for the working tree, else git or the cache."""
    against = f"dvc.lock ({stage.name})"
    for path, md5 in sorted(stage.outs.items()):
        if rev is rv.WORKSPACE:
            p = root / path
            if not p.exists():
                a.add(path, against, "skipped", "not on disk: `dvc checkout` / `dvc pull`")
                continue
            got = rv.dvc_md5(p)
            if got == md5:
                a.add(path, against, "ok", f"md5 {md5[:12]}")
            else:
                a.add(
                    path, against, "mismatch", f"on disk {got[:12]} != locked {md5[:12]}: changed after the stage ran"
                )
            continue
        data = rv.read_bytes(root, rev, path)
        if data is not None:  # git-tracked (cache: false) output
            got = rv.file_md5_bytes(data)
            a.add(
                path, f"{against} at {rev}", "ok" if got == md5 else "mismatch", f"git {got[:12]} vs locked {md5[:12]}"
            )
            continue
        a.checks.append(_check_cache(root, path, md5, f"{against} at {rev}"))


def _check_cache(root: Path, path: str, md5: str, against: str) -> Check:
    """A DVC-cached output of another revision: present in the local cache, and every object intact."""
    obj = rv.cache_path(root, md5)
    if obj is None:
        return Check(path, against, "skipped", f"{md5[:12]} not in the local DVC cache (`dvc fetch`)")
    if not md5.endswith(".dir"):
        got = rv.file_md5(obj)
        return Check(path, against, "ok" if got == md5 else "mismatch", f"cache object {got[:12]} vs {md5[:12]}")
    manifest = rv.cached_manifest(root, md5)
    if rv.manifest_md5(manifest) != md5:
        return Check(path, against, "mismatch", f"cached manifest of {md5[:12]} was edited")
    bad, missing = [], 0
    for e in manifest:
        p = rv.cache_path(root, e["md5"])
        if p is None:
            missing += 1
        elif rv.file_md5(p) != e["md5"]:
            bad.append(e["relpath"])
    if bad:
        return Check(path, against, "mismatch", f"cache objects altered: {bad[:5]}")
    if missing:
        return Check(path, against, "skipped", f"{missing} of {len(manifest)} files not in the local cache")
    return Check(path, against, "ok", f"{len(manifest)} cached files hash as locked")


def _check_deps(a: StrategyAudit, root: Path, stage: rv.LockedStage) -> None:
    """Dependencies on disk vs the lock: a difference means the recorded numbers predate the current inputs."""
    stale = []
    for path, md5 in sorted(stage.deps.items()):
        p = root / path
        if p.exists() and rv.dvc_md5(p) != md5:
            stale.append(path)
    if stale:
        a.add(f"deps of {stage.name}", "dvc.lock", "warn", f"changed since the run: {stale} (`dvc status`; rerun)")
    else:
        a.add(f"deps of {stage.name}", "dvc.lock", "ok", f"{len(stage.deps)} inputs as locked")


def _check_commit(
    a: StrategyAudit, root: Path, who: str, recorded: str | None, commit: str, stage: rv.LockedStage
) -> None:
    """The commit a run recorded vs the audited one: equal, or an ancestor whose stage inputs are unchanged."""
    if not recorded or recorded == "unknown":
        a.add(who, "git commit", "flagged", "the run recorded no git commit (run outside a git repository)")
        return
    if recorded == commit:
        a.add(who, "git commit", "ok", f"run at {commit[:10]}")
        return
    try:
        rv.resolve_commit(root, recorded)
    except rv.RevisionError:
        a.add(who, "git commit", "mismatch", f"run at {recorded[:10]}, a commit this repository does not have")
        return
    if not rv.is_ancestor(root, recorded, commit):
        a.add(who, "git commit", "mismatch", f"run at {recorded[:10]}, not an ancestor of {commit[:10]}")
        return
    inputs = set(stage.deps) | {k.split(":", 1)[0] for k in stage.params}
    touched = [
        p
        for p in rv.changed_paths(root, recorded, commit)
        if any(p == d or p.startswith(d.rstrip("/") + "/") for d in inputs)
    ]
    if touched:
        a.add(who, "git commit", "mismatch", f"run at {recorded[:10]}; stage inputs changed since: {touched[:5]}")
    else:
        a.add(who, "git commit", "ok", f"run at {recorded[:10]} (ancestor of {commit[:10]}; stage inputs unchanged)")


def _check_dirty(
    a: StrategyAudit, who: str, dirty: Any, paths: list[str] | None, lock: dict[str, rv.LockedStage]
) -> None:
    if str(dirty).lower() not in ("true", "1"):
        a.add(who, "git dirty flag", "ok", "clean tree")
        return
    if paths is None:
        a.add(who, "git dirty flag", "flagged", "run from a tree with uncommitted changes (which files: not recorded)")
        return
    outs = {p for st in lock.values() for p in st.outs}
    edited = [p for p in paths if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outs)]
    if edited:
        a.add(who, "git dirty flag", "flagged", f"run from a tree with uncommitted changes to {edited[:5]}")
    else:
        a.add(who, "git dirty flag", "ok", "dirty only in pipeline outputs rewritten by the same `dvc repro`")


def _dirty_paths(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return value
    return [p for p in str(value).split(",") if p]


def _audit_strategy(
    root: Path, name: str, rev: str | None, run_id: str | None, client: Any, client_note: str
) -> StrategyAudit:
    from transferlab.core.io import dict_sha256, path_sha256

    commit = rv.git(root, "rev-parse", "HEAD") if rev is rv.WORKSPACE else rv.resolve_commit(root, rev)
    a = StrategyAudit(name, rev or "workspace", commit)
    lock = rv.read_lock(root, rev)
    train, ev = lock.get(f"train@{name}"), lock.get(f"evaluate@{name}")
    a.chain["commit"] = commit
    a.chain["dvc.lock stages"] = [s.name for s in (train, ev) if s]
    if train is None and ev is None:
        a.add(
            "dvc.lock",
            f"train@{name} / evaluate@{name}",
            "mismatch",
            "no stage in dvc.lock: run `dvc repro` and commit",
        )
        return a
    for st in (train, ev):
        if st is not None:
            _check_outs(a, root, rev, st)
            if rev is rv.WORKSPACE:
                _check_deps(a, root, st)
    model_dir = root / "models" / name
    model_sha = path_sha256(model_dir) if rev is rv.WORKSPACE and model_dir.is_dir() else None

    # The provenance record beside the pipeline (git-ignored: only in the working tree where it ran).
    record = None
    record_path = root / "runs" / "train" / f"{name}.json"
    if train is not None and rev is rv.WORKSPACE:
        if record_path.is_file():
            from transferlab.core.io import read_json

            record = read_json(record_path)
            a.chain["provenance"] = str(record_path.relative_to(root))
            if model_sha is not None:
                rec = record.get("model_sha256")
                a.add(
                    f"models/{name}",
                    f"{a.chain['provenance']} model_sha256",
                    "ok" if rec == model_sha else "mismatch",
                    "weights as trained"
                    if rec == model_sha
                    else f"folder {model_sha[:12]} != recorded {str(rec)[:12]}: weights changed after training",
                )
            if dict_sha256(record.get("params")) != record.get("params_sha256"):
                a.add(a.chain["provenance"], "its params_sha256", "mismatch", "params edited after the run")
            flat = rv.flatten(record.get("params") or {})
            diffs = [k for k, v in train.params.items() if k.split(":", 1)[1] in flat and flat[k.split(":", 1)[1]] != v]
            a.add(
                a.chain["provenance"] + " params",
                f"dvc.lock ({train.name}) params",
                "mismatch" if diffs else "ok",
                f"differ: {diffs[:5]}" if diffs else "resolved params agree with the locked ones",
            )
            _check_commit(a, root, a.chain["provenance"], record.get("git_commit"), commit, train)
            _check_dirty(
                a, a.chain["provenance"], record.get("git_dirty"), _dirty_paths(record.get("git_dirty_paths")), lock
            )
        else:
            a.add(
                str(record_path.relative_to(root)),
                "train run",
                "skipped",
                f"no provenance record: `dvc repro train@{name}`",
            )

    # MLflow.
    if client is None:
        a.add("MLflow", "tracking store", "skipped", client_note)
        return a
    train_run = None
    try:
        if run_id:
            train_run = client.get_run(run_id)
        elif record and record.get("mlflow_run_id"):
            train_run = client.get_run(record["mlflow_run_id"])
        elif train is not None:
            train_run = _find_run_near(client, root, train.name, commit)
    except Exception as exc:  # noqa: BLE001 - MlflowException for a deleted or unknown run
        a.add("MLflow run", "tracking store", "mismatch", f"recorded run not found ({type(exc).__name__}: {exc})")
    if train_run is not None and train_run.data.tags.get("stage", "").startswith("evaluate@"):
        eval_run, train_run = train_run, None
    else:
        eval_run = None
    if train_run is not None:
        tags, rid = train_run.data.tags, train_run.info.run_id
        who = f"MLflow run {rid[:8]}"
        a.chain["train run"] = rid
        a.add(who, "run status", "ok" if train_run.info.status == "FINISHED" else "mismatch", train_run.info.status)
        if record and record.get("params_sha256") != tags.get("params_sha256"):
            a.add(
                who,
                "params_sha256",
                "mismatch",
                f"tag {tags.get('params_sha256', '')[:12]} vs record {str(record.get('params_sha256'))[:12]}",
            )
        elif record:
            a.add(who, "params_sha256", "ok", "tag equals the provenance record")
        if rev is not rv.WORKSPACE or record is None:
            _check_commit(a, root, who, tags.get("git_commit"), commit, train or ev)
            _check_dirty(a, who, tags.get("git_dirty"), _dirty_paths(tags.get("git_dirty_paths")), lock)
        recorded = rv.read_json(root, rev, f"metrics/train/{name}.json")
        if recorded is not None:
            _compare_metrics(a, f"metrics/train/{name}.json", recorded, train_run.data.metrics, f"{who} metrics")
        if model_sha is not None:
            a.checks.append(_check_artifact(client, rid, model_sha, f"models/{name}"))
    elif train is not None and not any(c.subject == "MLflow run" for c in a.checks):
        a.add(f"MLflow run of {train.name}", "tracking store", "skipped", f"no run found in {client_note}")

    if eval_run is None and ev is not None:
        want = {"stage": ev.name}
        if model_sha is not None:
            want["model_sha256"] = model_sha
        else:
            want["git_commit"] = commit
        eval_run = _find_run(client, want) if model_sha is not None else _find_run_near(client, root, ev.name, commit)
    if eval_run is not None:
        who = f"MLflow run {eval_run.info.run_id[:8]}"
        a.chain["evaluate run"] = eval_run.info.run_id
        recorded = rv.read_json(root, rev, f"metrics/eval/{name}.json")
        if recorded is not None:
            _compare_metrics(a, f"metrics/eval/{name}.json", recorded, eval_run.data.metrics, f"{who} metrics")
        if model_sha is not None and eval_run.data.tags.get("model_sha256") not in (None, model_sha):
            a.add(f"models/{name}", f"{who} model_sha256", "mismatch", "evaluated other weights than those on disk")
        if rev is not rv.WORKSPACE or record is None:
            _check_dirty(
                a,
                who,
                eval_run.data.tags.get("git_dirty"),
                _dirty_paths(eval_run.data.tags.get("git_dirty_paths")),
                lock,
            )
    elif ev is not None:
        a.add(
            f"metrics/eval/{name}.json",
            "MLflow evaluate run",
            "skipped",
            "no evaluate run for these weights" + ("" if model_sha else " at this commit"),
        )
    return a


def _check_artifact(client: Any, run_id: str, model_sha: str, subject: str) -> Check:
    """The run's logged model artifact hashes like the folder on disk."""
    from transferlab.core.io import path_sha256

    against = f"MLflow run {run_id[:8]} artifact 'model'"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "model", tmp)
            got = path_sha256(local)
    except Exception as exc:  # noqa: BLE001 - the artifact store may be gone; say so
        return Check(subject, against, "skipped", f"artifact not readable ({type(exc).__name__})")
    if got == model_sha:
        return Check(subject, against, "ok", "the logged weights equal the folder")
    return Check(subject, against, "mismatch", f"logged {got[:12]} != folder {model_sha[:12]}")


def audit(root: str | Path = ".", target: str = "champion", *, uri: str | None = None) -> AuditReport:
    """Audit `target`: 'champion', 'models/<strategy>', a strategy, an MLflow run id, or a git rev.

    Args:
        root: any folder inside the repository.
        target: what to audit (a git rev audits every strategy its dvc.lock records).
        uri: the MLflow tracking URI (default: MLFLOW_TRACKING_URI, then params.yaml's tracking.uri).

    Returns:
        The AuditReport; `.ok` is False when any check is a mismatch or flagged.

    Raises:
        AuditError / RevisionError: the target cannot be resolved; the message says what to do.
    """
    root = rv.repo_root(root)
    client, note = open_client(tracking_uri(root, uri))
    names, rev, run_id = resolve_target(root, target, client)
    report = AuditReport(target)
    for name in names:
        report.audits.append(_audit_strategy(root, name, rev, run_id, client, note))
    return report


def evaluate_command_args(root: str | Path, strategy: str) -> dict[str, str]:
    """The path arguments of `evaluate@<strategy>`'s command as the working tree's dvc.lock records it
    (`--prepared`, `--model`, `--pretrained-dir`, ...; dvc.yaml owns these paths, the audit only reads them).

    Raises:
        AuditError: dvc.lock has no `evaluate@<strategy>` stage (run `dvc repro` first).
    """
    import shlex

    stage = rv.read_lock(Path(root), rv.WORKSPACE).get(f"evaluate@{strategy}")
    if stage is None:
        raise AuditError(f"dvc.lock has no evaluate@{strategy}: run `dvc repro evaluate@{strategy}` first")
    words = shlex.split(stage.cmd)
    return {
        w.removeprefix("--"): v
        for w, v in zip(words, words[1:], strict=False)
        if w.startswith("--") and not v.startswith("--")
    }


def reevaluate(root: str | Path, strategy: str, params_path: str = "params.yaml", prepared: str | None = None) -> dict:
    """Reload every seed's saved model of `strategy` and recompute its test metrics: evaluate@'s own
    computation (`evaluation.predictions.evaluate_model`) on the paths its dvc.lock command names, with the
    params it reads (`seed`, `train.num_threads`, `train.device`).

    Args:
        root: the repository root.
        strategy: the strategy whose `models/<strategy>` folder is re-evaluated.
        params_path: the params file, relative to `root`.
        prepared: the prepared data folder (relative to `root`); default: evaluate@'s `--prepared`.

    Returns:
        The metrics as evaluate@ writes them to `metrics/eval/<strategy>.json`.

    Raises:
        AuditError: no evaluate@ stage in dvc.lock.
        FileNotFoundError: the model or the prepared data are missing (`dvc pull` / `dvc repro`).
    """
    from transferlab.config import load_params
    from transferlab.core.device import resolve_device
    from transferlab.core.seeding import seed_everything
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.predictions import evaluate_model

    root = Path(root)
    args = evaluate_command_args(root, strategy)
    params = load_params(root / params_path)
    seed_everything(params.seed, params.train.num_threads)
    data = load_prepared(root / (prepared or args["prepared"]))
    ev = evaluate_model(
        root / args["model"],
        data,
        seed=params.seed,
        pretrained_dir=root / args.get("pretrained-dir", "models/pretrain"),  # the stage's default
        device=resolve_device(params.train.device),
    )
    return ev.metrics


def check_reevaluation(a: StrategyAudit, recomputed: dict, recorded: dict | None) -> None:
    """Add the comparison of recomputed test metrics with the recorded metrics file to `a`."""
    subject = f"metrics/eval/{a.strategy}.json"
    if recorded is None:
        a.add(subject, "re-evaluation", "mismatch", "no recorded metrics to compare with")
        return
    flat_new = rv.flatten(recomputed)
    flat_old = rv.flatten({k: recorded.get(k) for k in recomputed})
    bad = [
        f"{k}: recorded {flat_old.get(k)} vs recomputed {v}"
        for k, v in flat_new.items()
        if not _same(flat_old.get(k), v)
    ]
    a.add(
        subject,
        "re-evaluation of the saved model",
        "mismatch" if bad else "ok",
        "; ".join(bad[:4]) if bad else f"{len(flat_new)} values reproduced",
    )


# --- rendering -------------------------------------------------------------------------------------


def to_text(report: AuditReport, markdown: bool = False) -> str:
    out = []
    for a in report.audits:
        head = f"audit of {a.strategy} at {a.rev} ({a.commit[:10]})"
        out.append(f"### {head}" if markdown else head)
        chain = " -> ".join(f"{k}: {v if isinstance(v, str) else ', '.join(v)}" for k, v in a.chain.items())
        out += ["", f"chain: {chain}", ""]
        rows = [
            (c.status.upper() if c.status in FAILING else c.status, c.subject, c.against, c.detail) for c in a.checks
        ]
        if markdown:
            out += ["| status | subject | against | detail |", "|---|---|---|---|"]
            out += [f"| {s} | `{subj}` | {ag} | {d} |" for s, subj, ag, d in rows]
        else:
            w1 = max([len(r[1]) for r in rows] + [7])
            w2 = max([len(r[2]) for r in rows] + [7])
            out += [f"  {s:<8} {subj:<{w1}}  {ag:<{w2}}  {d}" for s, subj, ag, d in rows]
        out.append("")
    fails = report.failures
    verdict = (
        "VERDICT: OK — every checked link agrees"
        if not fails
        else f"VERDICT: FAILED — {len(fails)} mismatch(es)/flag(s): "
        + "; ".join(f"{c.subject} vs {c.against}" for c in fails[:6])
    )
    out.append(f"**{verdict}**" if markdown else verdict)
    return "\n".join(out) + "\n"

"""Fault injection: `kill -9` inside each kind of stage of a real `dvc repro`, then recovery, on the tiny project
of tests/tiny_repo.py. Prints (and with --out writes) the table of docs/faults.md.

For every target stage X, seeded:
1. `dvc repro --force --single-item X` is started in its own process group; once X's MLflow run exists (the
   stage is past its imports and params checks, inside its work), the whole group (DVC and the stage's python)
   gets SIGKILL after a seeded random delay of 0-`--max-delay` s.
2. What the kill left: X's outputs (DVC removes them before running a stage) and X's MLflow run (RUNNING:
   nothing in a SIGKILLed process can end it).
3. Recovery: `git checkout -- .` + `dvc checkout` (the previous results, nothing computed), then `dvc repro`
   (what is still missing is computed again).
4. Every file under metrics/, predictions/, models/, data/ and plots/ is compared with an uninterrupted run's
   (sha256), and MLflow must hold no RUNNING run (the next stage to start marks the killed one KILLED; a
   checkout starts none, so the script calls `transferlab.provenance.tracking.mark_orphaned_runs` as a stage would).

Usage: python tests/faults.py [--seed 0] [--max-delay 3] [--stages prepare,train@lora,...] [--out docs/faults.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tiny_repo import build, sh  # noqa: E402

STAGES = [
    "prepare",
    "pretrain",
    "features@efficientnet_lite0",
    "score",
    "agreement",
    "train@finetune_top",
    "evaluate@lora",
    "baseline",
    "compare",
    "diagnose",
    "report",
]
COMPARED = ("metrics", "predictions", "models", "data", "plots")


def snapshot(repo: Path) -> dict[str, str]:
    out = {}
    for top in COMPARED:
        for p in sorted((repo / top).rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                out[str(p.relative_to(repo))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def running_runs(repo: Path) -> list[tuple[str, str]]:
    if not (repo / "mlflow.db").is_file():
        return []
    db = sqlite3.connect(repo / "mlflow.db", timeout=30)
    try:
        return db.execute("select run_uuid, name from runs where status = 'RUNNING'").fetchall()
    finally:
        db.close()


def statuses(repo: Path, run_ids: list[str]) -> list[str]:
    db = sqlite3.connect(repo / "mlflow.db")
    try:
        return [db.execute("select status from runs where run_uuid = ?", (r,)).fetchone()[0] for r in run_ids]
    finally:
        db.close()


def kill_inside(repo: Path, stage: str, delay: float) -> dict:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TRANSFERLAB_LOG": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    started = None
    for line in proc.stdout:
        if f"Running stage '{stage}'" in line:
            break
    # Inside the stage's work: once its MLflow run exists (imports and params validation are behind it).
    while proc.poll() is None and started is None:
        if any(name == stage for _, name in running_runs(repo)):
            started = time.perf_counter()
        time.sleep(0.05)
    if started is None:
        proc.wait()
        return {"killed": False, "note": "the stage finished before it could be killed"}
    while time.perf_counter() - started < delay and proc.poll() is None:
        time.sleep(0.05)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"killed": not finished, "after_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=3.0, help="kill within this many seconds of the stage start")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", help="write the Markdown table here (docs/faults.md)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    from transferlab.params import TrackingParams

    with tempfile.TemporaryDirectory() as tmp:
        repo = build(Path(tmp) / "tiny")
        t0 = time.perf_counter()
        sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
        print(f"uninterrupted dvc repro: {time.perf_counter() - t0:.0f} s", flush=True)
        reference = snapshot(repo)
        # As in the project: the metrics files (cache: false) are committed to git, the rest is in DVC's cache.
        sh("git", "add", "-A", cwd=repo)
        sh("git", "-c", "user.name=faults", "-c", "user.email=faults@localhost", "commit", "-qm", "reference", cwd=repo)
        rows = []
        for stage in (s for s in args.stages.split(",") if s):
            delay = round(rng.uniform(0, args.max_delay), 2)
            kill = kill_inside(repo, stage, delay)
            left = running_runs(repo)
            missing = sorted(set(reference) - set(snapshot(repo)))
            # Getting the previous results back, without computing anything: git (metrics files) + DVC's cache.
            sh("git", "checkout", "--", ".", cwd=repo)
            sh(sys.executable, "-m", "dvc", "checkout", cwd=repo, check=False)
            restored = snapshot(repo)
            not_restored = sorted(k for k in reference if restored.get(k) != reference[k])
            status_after_checkout = sh(sys.executable, "-m", "dvc", "status", cwd=repo).strip()
            # A stage that starts marks the killed run; a checkout starts none, so do what the next stage does.
            os.chdir(repo)
            import mlflow

            from transferlab.provenance.tracking import mark_orphaned_runs

            mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
            exp = mlflow.get_experiment_by_name(TrackingParams().experiment)
            marked = mark_orphaned_runs(exp.experiment_id, stage="faults.py")
            os.chdir(ROOT)
            # And the rerun: dvc repro computes whatever is still missing.
            sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
            after = snapshot(repo)
            changed = sorted(k for k in reference if after.get(k) != reference[k])
            status = sh(sys.executable, "-m", "dvc", "status", cwd=repo).strip()
            row = {
                "stage": stage,
                "killed_after_s": kill.get("after_s"),
                "killed": kill["killed"],
                "outputs_missing_after_kill": len(missing),
                "runs_running_after_kill": len(left),
                "not_restored_by_checkout": len(not_restored),
                "clean_after_checkout": "up to date" in status_after_checkout.lower(),
                "files_differing_after_rerun": len(changed),
                "runs_still_running": len(running_runs(repo)),
                "killed_runs_now": ",".join(statuses(repo, [r for r, _ in left])) or "-",
                "marked": len(marked),
                "dvc_status_clean": "up to date" in status.lower(),
            }
            print(row, flush=True)
            rows.append(row)
    lines = [
        "| stage killed | killed after (s, inside its MLflow run) | outputs gone after the kill | MLflow runs "
        "RUNNING after the kill | files not back after `git checkout` + `dvc checkout` | `dvc status` clean then "
        "| files differing from an uninterrupted run after `dvc repro` | RUNNING runs left | the killed run is now "
        "| `dvc status` clean at the end |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['killed_after_s'] if r['killed'] else 'finished first'} | "
            f"{r['outputs_missing_after_kill']} | {r['runs_running_after_kill']} | {r['not_restored_by_checkout']} | "
            f"{'yes' if r['clean_after_checkout'] else 'no'} | {r['files_differing_after_rerun']} | "
            f"{r['runs_still_running']} | {r['killed_runs_now']} | {'yes' if r['dvc_status_clean'] else 'no'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        text = Path(args.out).read_text() if Path(args.out).is_file() else ""
        start, end = "<!-- faults table -->", "<!-- /faults table -->"
        if start in text:
            text = text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end) :]
        else:
            text += f"\n{start}\n{table}\n{end}\n"
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

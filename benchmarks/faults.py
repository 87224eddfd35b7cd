"""Fault injection: `kill -9` inside each kind of stage of a real `dvc repro`, then recovery, on the tiny project
of tests/tiny_repo.py. Prints (and with --out writes) the table of docs/faults.md.

For every target stage X, seeded:
1. `dvc repro --force --single-item X` is started in its own process group; once DVC says "Running stage 'X'",
   the whole group (DVC and the stage's python) gets SIGKILL after a seeded random delay of 0-`--max-delay` s.
2. What the kill left: X's outputs (DVC removes them before running a stage), X's MLflow run (RUNNING:
   nothing in a SIGKILLed process can end it), the DVC cache (`dvc status --cloud`-free check: `dvc checkout`).
3. Recovery, alternately: (a) `dvc checkout`, the previous results back from DVC's cache, or (b) `dvc repro`,
   which reruns X (and what depends on a changed output: nothing, X being deterministic).
4. Every file under metrics/, predictions/, models/ and data/ is compared with an uninterrupted run's (sha256),
   and MLflow must hold no RUNNING run (the next stage to start marks the killed one KILLED; after a
   checkout, which starts no stage, `transferlab.tracking.mark_orphaned_runs` is what does it).

Usage: python benchmarks/faults.py [--seed 0] [--max-delay 3] [--stages prepare,train@lora,...] [--out docs/faults.md]
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
    db = sqlite3.connect(repo / "mlflow.db")
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
            started = time.perf_counter()
            break
    if started is None:
        proc.wait()
        return {"killed": False, "note": "the stage never started"}
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
        rows = []
        for i, stage in enumerate(s for s in args.stages.split(",") if s):
            delay = round(rng.uniform(0, args.max_delay), 2)
            kill = kill_inside(repo, stage, delay)
            left = running_runs(repo)
            missing = sorted(set(reference) - set(snapshot(repo)))
            how = "dvc checkout" if i % 2 == 0 else "dvc repro"
            if how == "dvc checkout":
                sh(sys.executable, "-m", "dvc", "checkout", cwd=repo)
                os.chdir(repo)
                import mlflow

                from transferlab.tracking import mark_orphaned_runs

                mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
                exp = mlflow.get_experiment_by_name(TrackingParams().experiment)
                mark_orphaned_runs(exp.experiment_id, stage="faults.py after dvc checkout")
                os.chdir(ROOT)
            else:
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
                "recovery": how,
                "files_differing_from_uninterrupted": len(changed),
                "runs_still_running": len(running_runs(repo)),
                "killed_runs_now": ",".join(statuses(repo, [r for r, _ in left])) or "-",
                "dvc_status_clean": "up to date" in status.lower(),
            }
            print(row, flush=True)
            rows.append(row)
    lines = [
        "| stage killed | after (s) | outputs gone after the kill | MLflow runs RUNNING after the kill | recovery "
        "| files differing from an uninterrupted run | RUNNING runs left | the killed run is now | dvc status clean |",
        "|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['killed_after_s'] if r['killed'] else 'finished first'} | "
            f"{r['outputs_missing_after_kill']} | {r['runs_running_after_kill']} | {r['recovery']} | "
            f"{r['files_differing_from_uninterrupted']} | {r['runs_still_running']} | {r['killed_runs_now']} | "
            f"{'yes' if r['dvc_status_clean'] else 'no'} |"
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

"""Tuning on Ray Tune (`tune.backend: ray`): two trials at once on one study with none lost or duplicated,
ASHA stopping a trial that trails, caught and uncaught objective errors, a one-worker study that repeats
itself and the optuna backend's, the real tune@linear_probe stage on the tiny fixtures, and the params checks.

One local Ray with 2 CPUs serves the whole module (starting one takes seconds); `tune_ray` uses a Ray the
process already runs and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_repo import write_stage_inputs

from transferlab.config import parse_params
from transferlab.params import ParamsError
from transferlab.tuning.optuna_backend import tune
from transferlab.tuning.ray_backend import tune_ray
from transferlab.tuning.space import SearchSpace, TuningError

ray = pytest.importorskip("ray", reason="tune.backend: ray needs ray[tune] (make setup)")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LR = SearchSpace.from_dict({"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
X = SearchSpace.from_dict({"x": {"low": 0.0, "high": 1.0}})


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the module; yields the seconds it took to start."""
    import ray.cloudpickle

    # Trials unpickle the objectives in Ray's worker processes, which cannot import this test module (it is
    # not a package on their sys.path): its functions travel by value instead.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    started_s = time.perf_counter() - t0
    yield started_s
    ray.shutdown()


def _claim(folder: Path) -> int:
    """This call's place in the order calls started, claimed atomically across processes (O_EXCL)."""
    folder.mkdir(exist_ok=True)
    i = 0
    while True:
        try:
            os.close(os.open(folder / f"{i:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return i
        except FileExistsError:
            i += 1


def _run(objective, space, tmp_path, **kw):
    defaults = dict(
        n_trials=4,
        seed=0,
        study_name="study",
        base_config={"kind": "lora"},
        storage_path=tmp_path / "ray_results",
        epochs=3,
        workers=2,
    )
    return tune_ray(objective, space, **{**defaults, **kw})


def test_two_concurrent_trials_none_lost_none_duplicated_asha_prunes(local_ray, tmp_path):
    """Ten trials, two at once: each ran exactly once, in two worker processes at overlapping times, and
    ASHA stopped at least one. The setup makes the last trial to start a certain victim: a trial's value
    after every epoch is minus its start order, so the last one to start trails every trial that reported
    epoch 1 before it (at least one: with two at once, eight had ended when it started)."""
    calls = tmp_path / "calls"
    calls.mkdir()
    order = tmp_path / "order"

    def objective(config, report):
        k = _claim(order)
        record = {"pid": os.getpid(), "lr": config["lr"], "kind": config["kind"], "start": time.time(), "reports": []}
        try:
            for epoch in (1, 2):  # the third epoch's value is the returned one, as with ReportingStrategy
                time.sleep(0.2)
                record["reports"].append([epoch, -float(k)])
                report(epoch, -float(k))  # does not return when ASHA stops the trial
            record["returned"] = True
            return -((np.log10(config["lr"]) + 2) ** 2)  # best at lr = 0.01
        finally:
            record["end"] = time.time()
            (calls / f"{k:04d}.json").write_text(json.dumps(record))

    logged = []
    t0 = time.perf_counter()
    result = _run(objective, LR, tmp_path, n_trials=10, on_trial_end=logged.append)
    seconds = time.perf_counter() - t0

    trials = result["trials"]
    records = [json.loads(p.read_text()) for p in sorted(calls.iterdir())]
    # None lost, none duplicated: ten calls, one per trial, each with that trial's suggestion.
    assert [t["number"] for t in trials] == list(range(10))
    assert len(records) == 10 and sorted(r["lr"] for r in records) == sorted(t["params"]["lr"] for t in trials)
    assert len({r["lr"] for r in records}) == 10 and all(r["kind"] == "lora" for r in records)
    # Two at once: two worker processes (not this one), and calls that overlapped in time.
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2 and os.getpid() not in pids
    overlaps = [
        (a, b) for a in records for b in records if a is not b and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlaps
    # ASHA: the last call to start was stopped after its first epoch; a stopped trial never returned.
    by_lr = {r["lr"]: r for r in records}
    states = {t["number"]: t["state"] for t in trials}
    assert by_lr[records[-1]["lr"]]["reports"] == [[1, -9.0]] and "returned" not in records[-1]
    assert [t["state"] for t in trials if t["params"]["lr"] == records[-1]["lr"]] == ["PRUNED"]
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states.values()
    for t in trials:
        rec = by_lr[t["params"]["lr"]]
        assert (t["state"] == "COMPLETE") == ("returned" in rec)
        if t["state"] == "PRUNED":  # like Optuna: a pruned trial keeps its last reported value
            assert t["value"] == rec["reports"][-1][1]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert result["best_value"] == best["value"] and result["best_params"] == best["params"]
    # The on_trial_end records, from this process once all ended: every trial, in order, with its reports.
    assert [r["number"] for r in logged] == list(range(10))
    assert [{k: r[k] for k in ("number", "params", "value", "state")} for r in logged] == trials
    for r in logged:
        assert r["intermediate_values"] == {e: v for e, v in by_lr[r["params"]["lr"]]["reports"]}
    assert ray.is_initialized()  # a Ray this process started is left running
    assert (tmp_path / "ray_results" / "study").is_dir()
    print(f"Ray start {local_ray:.1f} s; 10 trials, 2 at once: {seconds:.1f} s")


def test_caught_errors_fail_one_trial_uncaught_ones_stop_the_study(local_ray, tmp_path):
    def objective(config, report):
        if config["x"] > 0.5:
            raise FloatingPointError("diverged")
        report(1, config["x"])
        return config["x"]

    res = _run(objective, X, tmp_path, n_trials=6, seed=1, pruner=False, catch=(FloatingPointError,))
    states = [t["state"] for t in res["trials"]]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 6
    assert all(t["value"] is None for t in res["trials"] if t["state"] == "FAIL")
    assert res["best_value"] <= 0.5

    def always(config, report):
        raise FloatingPointError("diverged")

    with pytest.raises(TuningError, match="none of 3 trials completed"):
        _run(always, X, tmp_path, n_trials=3, catch=(FloatingPointError,))
    # Not in `catch`: the study stops and the trial's own error reaches the caller, traceback included.
    records = []
    with pytest.raises(FloatingPointError, match="diverged") as err:
        _run(always, X, tmp_path, n_trials=3, catch=(), on_trial_end=records.append)
    assert "in always" in str(err.value)
    # What ran before the study stopped is still handed over (the stage logs it to MLflow).
    assert records and all(t["state"] == "FAIL" and t["value"] is None for t in records)


def test_one_worker_is_reproducible_and_suggests_what_the_optuna_backend_does(local_ray, tmp_path):
    """One trial at a time, the same seed: the same trials twice, and the very trials of the optuna backend's
    sequential study (the same seeded TPE sampler, asked in the same order), over a float log range, an int
    range with a step and a categorical."""
    space = SearchSpace.from_dict(
        {
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "k": {"low": 1, "high": 9, "step": 2},
            "rank": {"choices": [2, 4, 8]},
        }
    )

    def objective(config, report):
        return -((np.log10(config["lr"]) + 2) ** 2) - abs(config["rank"] - 4) - config["k"] / 10

    kw = dict(n_trials=8, seed=3, pruner=False, study_name="repro", base_config={})
    first = _run(objective, space, tmp_path, workers=1, **kw)
    second = _run(objective, space, tmp_path, workers=1, **kw)
    assert [t["params"] for t in second["trials"]] == [t["params"] for t in first["trials"]]
    assert second["best_params"] == first["best_params"]
    on_optuna = tune(objective, space, storage_url=f"sqlite:///{tmp_path}/optuna.db", **kw)
    assert [t["params"] for t in on_optuna["trials"]] == [t["params"] for t in first["trials"]]
    assert on_optuna["best_value"] == first["best_value"]
    # The earlier run's results were deleted: one folder of trial results per trial of the last run.
    trial_dirs = [p for p in (tmp_path / "ray_results" / "repro").iterdir() if p.is_dir()]
    assert len(trial_dirs) == 8


HEAD = """
import logging, sys, ray
info = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
print(info.address_info["gcs_address"], flush=True)
sys.stdin.readline()  # the test says when: the cluster is then still up, with its 2 CPUs
print(ray.cluster_resources().get("CPU"), flush=True)
ray.shutdown()
"""
DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from transferlab.tuning.ray_backend import tune_ray
from transferlab.tuning.space import SearchSpace
def objective(config, report):
    return config["x"]
res = tune_ray(objective, SearchSpace.from_dict({"x": {"low": 0.0, "high": 1.0}}), n_trials=3, seed=0,
    study_name="attached", base_config={}, storage_path=sys.argv[1], epochs=3, workers=2, pruner=False)
print(json.dumps([t["state"] for t in res["trials"]]))
"""


def test_attaches_to_the_ray_in_ray_address_and_leaves_it_running(tmp_path):
    """A Ray started by another process stands for a cluster: with RAY_ADDRESS set (and no address in
    params) the study runs on it, and the driver only disconnects at the end: the cluster stays up."""
    import subprocess

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        address = head.stdout.readline().strip()
        assert address, "the head process printed no address"
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path / "ray_results")],
            # A local ray.init turns Ray's token authentication on (token in ~/.ray/auth_token); a driver
            # given an explicit address uses it only when told to.
            env={**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"Ray: attached to {address}" in proc.stderr and "started a local Ray" not in proc.stderr
        assert sorted(json.loads(proc.stdout.splitlines()[-1])) == ["COMPLETE"] * 3
        out, _ = head.communicate("\n", timeout=60)
        assert float(out.strip()) == 2.0  # the cluster outlived the driver that used it
        assert head.returncode == 0
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()


def test_a_grace_period_that_stops_nothing_is_refused_before_ray_starts(tmp_path):
    with pytest.raises(TuningError, match="tune.asha_grace_epochs"):
        _run(lambda c, r: 0.0, X, tmp_path, epochs=2, grace_epochs=2)


# --- the stage, for real --------------------------------------------------------------------------------


def _params(**tune_section):
    return {
        "sources": {"tiny": {"kind": "random_init", "arch": "test_efficientnet"}},
        "train": {"source": "tiny"},
        "strategies": {"scratch": {}, "linear_probe": {"lr": 0.003}},
        "diagnose": {"forgetting_source": None},
        "tune": tune_section,
    }


def test_tune_stage_on_ray_end_to_end(local_ray, tiny_source, tiny_data, tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_stage_inputs(tmp_path, tiny_data["images"], tiny_data["labels"], tiny_data["class_names"], tiny_source)
    raw = _params(
        strategies=["linear_probe"],
        backend="ray",
        n_trials=3,
        epochs=2,
        workers=2,
        space={"linear_probe": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}},
    )
    raw["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": "t"}
    raw["train"] |= {"batch_size": 8, "augment": "none", "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    argv = "tune --strategy linear_probe --prepared prepared --features features --selection selection.json"
    argv += " --out tuned/linear_probe.yaml --metrics metrics/linear_probe.json"
    monkeypatch.setattr(sys, "argv", argv.split())
    from stages import tune as stage

    stage.main()

    metrics = json.loads((tmp_path / "metrics/linear_probe.json").read_text())
    assert metrics["n_trials"] == 3 and metrics["n_complete"] >= 1 and 0 <= metrics["best_value"] <= 1
    assert metrics["n_complete"] + metrics["n_pruned"] + metrics["n_failed"] == 3
    assert set(metrics["best_params"]) == {"lr"} and 1e-3 <= metrics["best_params"]["lr"] <= 1.0
    fragment = yaml.safe_load((tmp_path / "tuned/linear_probe.yaml").read_text())
    assert fragment == {"strategies": {"linear_probe": {"lr": metrics["best_params"]["lr"]}}}
    assert (tmp_path / ".ray_results" / "tune@linear_probe").is_dir()  # the stage's default results folder
    assert not (tmp_path / "optuna.db").exists()  # tune.storage is Optuna's: unused on Ray

    import mlflow

    # The absolute URI the stage resolved: MLflow caches a store per URI string, and a relative one would
    # reach this test's database from a later test in another folder.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune@linear_probe"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["tune.backend"] == "ray" and parents[0].data.params["resolved.backend"] == "ray"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1", "trial-2"]
    assert all("lr" in r.data.params and r.data.tags["optuna_state"] in ("COMPLETE", "PRUNED") for r in trials)
    complete = [r for r in trials if r.data.tags["optuna_state"] == "COMPLETE"]
    assert max(r.data.metrics["val_accuracy"] for r in complete) == pytest.approx(metrics["best_value"], abs=1e-6)


# --- params ---------------------------------------------------------------------------------------------


def test_tune_backend_params():
    base = dict(strategies=["linear_probe"], space={"linear_probe": {"lr": {"low": 1e-4, "high": 1.0}}})
    assert parse_params(_params(**base)).tune.backend == "optuna"  # the default, unchanged
    p = parse_params(_params(**base, backend="ray", workers=4, ray_address="ray://head:10001"))
    assert (p.tune.backend, p.tune.workers, p.tune.ray_address) == ("ray", 4, "ray://head:10001")
    assert (p.tune.asha_grace_epochs, p.tune.asha_reduction_factor) == (1, 2)
    with pytest.raises(ParamsError, match=r"tune.backend: .*'optuna' or 'ray'.*got 'dask'"):
        parse_params(_params(**base, backend="dask"))
    # SQLite is refused for parallel Optuna workers only: Ray keeps its study in the driver.
    with pytest.raises(ParamsError, match="tune.workers: 2 workers need tune.storage"):
        parse_params(_params(**base, workers=2))
    with pytest.raises(ParamsError, match=r"tune.asha_grace_epochs: 3 is not below tune.epochs \(3\)"):
        parse_params(_params(**base, backend="ray", asha_grace_epochs=3))
    assert parse_params(_params(**base, backend="ray", asha_grace_epochs=3, pruning=False)).tune.pruning is False
    with pytest.raises(ParamsError, match="tune.asha_reduction_factor"):
        parse_params(_params(**base, backend="ray", asha_reduction_factor=1))


def test_backend_ray_without_ray_installed_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    base = dict(strategies=["linear_probe"], space={"linear_probe": {"lr": {"low": 1e-4, "high": 1.0}}})
    with pytest.raises(ParamsError, match=r"tune.backend: 'ray' needs Ray Tune.*pip install 'ray\[tune\]'.*make setup"):
        parse_params(_params(**base, backend="ray"))
    # Without tuned strategies no stage needs Ray: the params stay valid.
    assert parse_params(_params(backend="ray")).tune.backend == "ray"

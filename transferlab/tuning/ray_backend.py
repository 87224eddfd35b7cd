"""The Ray Tune backend of `tune@<strategy>`: Ray's OptunaSearch with the same seeded TPE sampler as the
Optuna backend, and ASHA (or FIFO) scheduling, trials at once on a local Ray or on the cluster named by
`tune.ray_address` / `RAY_ADDRESS` (disconnected from, never stopped). Trials are logged by the driver, so
nodes that cannot reach the tracking store still leave a record. Ray is imported inside functions.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.tuning.optuna_backend import _startup_trials
from transferlab.tuning.space import Objective, SearchSpace, TuningError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# --- Ray Tune -------------------------------------------------------------------------------------------

# Keys of the results a Ray trial reports (`tune.report`). The optimised metric is in every result, also a
# failed trial's (as NaN): Ray refuses a result without the metric its searcher and scheduler expect.
RAY_METRIC = "value"
RAY_TIME = "epoch"  # ASHA's time attribute: the epoch a value was measured after
_NUMBER = "_trial_number"  # put into every trial's config by the searcher: Optuna's number of the trial


def _ray_trainable(
    config: dict[str, Any],
    *,
    objective_fn: Objective,
    base_config: dict[str, Any],
    catch: tuple[type[Exception], ...],
) -> None:
    """One Ray trial (runs in a Ray worker): `objective_fn` on the base config merged with the trial's values.

    Every report carries the history of intermediate values so far, so the driver reads a trial's whole
    record from its last result. The last result of a trial that ran to its end has `final: True`; one
    that ASHA stopped lacks it (`tune.report` does not return once the trial is stopped).
    """
    from ray import tune as ray_tune

    history: list[list[float]] = []

    def report(epoch: int, value: float) -> None:
        history.append([int(epoch), float(value)])
        ray_tune.report({RAY_METRIC: float(value), RAY_TIME: int(epoch), "final": False, "history": list(history)})

    params = {k: v for k, v in config.items() if k != _NUMBER}
    try:
        value = float(objective_fn({**base_config, **params}, report))
        error = "the objective returned NaN" if math.isnan(value) else None
    except catch as exc:
        value, error = math.nan, f"{type(exc).__name__}: {exc}"
    last_epoch = history[-1][0] if history else 0
    ray_tune.report(
        {
            RAY_METRIC: math.nan if error else value,
            # After the last reported epoch: the value a trial returns comes after its reports.
            RAY_TIME: last_epoch if error else last_epoch + 1,
            "final": True,
            "history": list(history),
            **({"trial_error": error} if error else {}),
        }
    )


def _ray_searcher(space: SearchSpace, seed: int, n_trials: int) -> Any:
    """Ray's OptunaSearch with the same seeded TPE sampler as `tune`, defined by run with `SearchSpace.suggest`
    (so ranges, log scales, steps and choices are exactly Optuna's distributions, as in the optuna backend).

    Ray's searcher tells its study a stopped trial's last intermediate value as a COMPLETE trial, and a
    NaN as an error it only logs; this subclass tells Optuna what happened instead: PRUNED for a trial ASHA
    stopped, FAIL for one whose objective failed (caught) or returned NaN, as Optuna's own study would.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class _Search(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if error or (result is not None and result.get("trial_error")):
                result, error = None, True  # FAIL (Ray's searcher would tell an intermediate value as COMPLETE)
            elif result is not None and not result.get("final"):
                result = None  # stopped by the scheduler: PRUNED
            super().on_trial_complete(trial_id, result, error)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup_trials(n_trials))
    return _Search(_DefineByRun(space), metric=RAY_METRIC, mode="max", sampler=sampler)


@dataclass(frozen=True)
class _DefineByRun:
    """OptunaSearch's define-by-run space: the space's suggestions, and the Optuna trial's number (which
    numbers Ray's trials in the order they were suggested). A module-level class, not a closure: Ray saves
    the searcher's state with plain pickle."""

    space: SearchSpace

    def __call__(self, trial: Any) -> dict[str, Any]:
        self.space.suggest(trial)
        return {_NUMBER: trial.number}


def _ray_record(result: Any) -> dict[str, Any]:
    """The `on_trial_end` record (number, params, value, state, intermediate_values) of one Ray result."""
    m = result.metrics or {}
    config = dict(result.config or {})
    number = config.pop(_NUMBER, None)
    intermediate = {int(e): float(v) for e, v in m.get("history", [])}
    if result.error is not None or RAY_METRIC not in m or m.get("trial_error"):
        state, value = "FAIL", None
    elif m.get("final"):
        state, value = "COMPLETE", float(m[RAY_METRIC])
    else:  # stopped by ASHA; like Optuna, a pruned trial keeps its last reported value
        state, value = "PRUNED", float(m[RAY_METRIC])
    return {"number": number, "params": config, "value": value, "state": state, "intermediate_values": intermediate}


def _connect_ray(address: str | None, num_cpus: int) -> bool:
    """Attach to the Ray given (an address, else RAY_ADDRESS) or start a local one with `num_cpus` CPUs.

    Returns:
        True when this call connected (the caller calls `ray.shutdown()`: it stops a local Ray this call
        started, and only disconnects from a cluster), False when this process already ran a Ray (left
        as it is).
    """
    import ray

    if ray.is_initialized():
        log.info("Ray: using the Ray this process already runs")
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    common = dict(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **common)
        log.info("Ray: attached to %s in %.1f s", address, time.perf_counter() - t0)
        return True
    # Trials' output (training logs) stays in Ray's session logs (/tmp/ray/session_latest/logs): the stage
    # logs the trials itself once they end, and a failed trial's error comes back with its traceback.
    ray.init(num_cpus=num_cpus, log_to_driver=False, **common)
    log.info("Ray: started a local Ray with %d CPUs in %.1f s", num_cpus, time.perf_counter() - t0)
    return True


def tune_ray(
    objective_fn: Objective,
    space: SearchSpace,
    *,
    n_trials: int,
    seed: int,
    study_name: str,
    base_config: dict[str, Any],
    storage_path: str | Path,
    epochs: int,
    pruner: bool = True,
    catch: tuple[type[Exception], ...] = (),
    on_trial_end: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 1,
    address: str | None = None,
    grace_epochs: int = 1,
    reduction_factor: int = 2,
    cpus_per_trial: int = 1,
    gpus_per_trial: float = 0,
) -> dict[str, Any]:
    """Maximise `objective_fn` over `space` on Ray Tune: `workers` trials at once, suggested by Optuna's seeded
    TPE sampler (Ray's OptunaSearch), the trailing ones stopped by ASHA.

    The objective is called as in `tune`, `objective_fn(config, report)`, but in a Ray worker process (it is
    pickled with cloudpickle: what it captures must pickle, and the modules it uses must import there);
    `report(epoch, value)` sends an intermediate value to Ray, and does not return once ASHA stops the trial.

    Args:
        objective_fn: returns the value to maximise (the best validation accuracy).
        space: the search space.
        n_trials: trials to run.
        seed: the sampler's seed. With `workers=1` the trials run one after the other and the study is
            reproducible; with more, which trial gets which suggestion depends on timing.
        study_name: the experiment's name; its results are written to `storage_path/study_name`, deleted
            first when it is a local folder, so that a re-run starts clean.
        base_config: the strategy's current params entry.
        storage_path: where Ray writes each trial's results: a local folder (relative to the working
            directory), or a URI Ray's storage takes (e.g. s3://...) that every node of a cluster reaches.
        epochs: the longest a trial trains: ASHA's max_t.
        pruner: ASHA (asynchronous successive halving) on the reported values; False runs every trial to
            its end (FIFO).
        catch: exceptions that fail one trial (state FAIL) and let the study go on.
        on_trial_end: called with each trial's record (number, params, value, state, intermediate values)
            in this process, by trial number, once all have ended: e.g. to log them to MLflow from here, which
            also works when the trials ran on machines that cannot reach the tracking store.
        workers: trials running at once (Ray's max_concurrent_trials).
        address: the Ray cluster to attach to ('ray://host:10001', 'auto', ...), disconnected from at the
            end (the cluster runs on); None: the RAY_ADDRESS environment variable if set, else a local Ray
            started for this call (with workers x cpus_per_trial CPUs) and shut down at its end. A Ray this
            process already runs is used as it is, and left running.
        grace_epochs: ASHA's grace period: no trial is stopped before this epoch.
        reduction_factor: ASHA's rungs are at grace_epochs x reduction_factor^k epochs; at each, a trial
            below the top 1/reduction_factor of those that reached it is stopped.
        cpus_per_trial: CPUs Ray reserves for each trial (Ray sets OMP_NUM_THREADS to it in the worker).
        gpus_per_trial: GPUs Ray reserves for each trial (a fraction shares one GPU between trials); Ray makes
            only those visible to the trial (CUDA_VISIBLE_DEVICES), so the objective should use 'cuda', not
            'cuda:N'. 0: the trial sees no GPU.

    Returns:
        `{"best_value", "best_params", "trials": [{"number", "params", "value", "state"}, ...]}`; numbers are
        the Optuna sampler's trial numbers (the order of suggestion).

    Raises:
        TuningError: no trial completed, or a trial of the budget is missing from Ray's results.
        Whatever `objective_fn` raises outside `catch`: the experiment stops at the first such error, which
            is raised here (a Ray error class that is also an instance of the original exception's class,
            its message holding the trial's traceback).
    """
    if n_trials < 1 or workers < 1:
        raise ValueError(f"n_trials and workers must be >= 1 (got {n_trials} and {workers})")
    if pruner and grace_epochs >= epochs:
        raise TuningError(
            f"ASHA's grace period ({grace_epochs} epochs) is not below the epochs per trial ({epochs}): it could "
            "stop nothing; lower tune.asha_grace_epochs, raise tune.epochs, or set tune.pruning: false"
        )
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = str(storage_path)
    if "://" not in storage:
        storage = str(Path(storage).resolve())
        old = Path(storage) / study_name
        if old.exists():
            shutil.rmtree(old)
            log.info("deleted the earlier Ray results %s: this run starts clean", old)
    scheduler = (
        ASHAScheduler(
            time_attr=RAY_TIME,
            metric=RAY_METRIC,
            mode="max",
            max_t=epochs,
            grace_period=grace_epochs,
            reduction_factor=reduction_factor,
            # A trial ends itself; ASHA never stops one for reaching max_t (whose last report then would be
            # an intermediate value, read as PRUNED).
            stop_last_trials=False,
        )
        if pruner
        else FIFOScheduler()
    )
    trainable = ray_tune.with_resources(
        # with_parameters: the objective (and the data it captures) goes to Ray's object store once, not
        # once per trial.
        ray_tune.with_parameters(_ray_trainable, objective_fn=objective_fn, base_config=base_config, catch=catch),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    connected = _connect_ray(address, num_cpus=workers * cpus_per_trial)
    try:
        tuner = ray_tune.Tuner(
            trainable,
            tune_config=ray_tune.TuneConfig(
                search_alg=_ray_searcher(space, seed, n_trials),
                scheduler=scheduler,
                num_samples=n_trials,
                max_concurrent_trials=workers,
                # A worker process serves trial after trial (torch imported once); each trial re-seeds.
                reuse_actors=True,
            ),
            run_config=ray_tune.RunConfig(
                storage_path=storage,
                name=study_name,
                verbose=0,
                # An error outside `catch` ends the experiment at once, as in the optuna backend.
                failure_config=ray_tune.FailureConfig(max_failures=0, fail_fast=True),
            ),
        )
        t0 = time.perf_counter()
        grid = tuner.fit()
        log.info("Ray Tune: %d trials in %.1f s", len(grid), time.perf_counter() - t0)
        results = list(grid)
    finally:
        if connected:  # stops the local Ray this call started; from a cluster, only disconnects
            import ray

            ray.shutdown()
    errors = sorted(
        (((r.config or {}).get(_NUMBER, -1), r.error) for r in results if r.error is not None), key=lambda e: e[0]
    )
    records = sorted((_ray_record(r) for r in results), key=lambda t: (t["number"] is None, t["number"] or 0))
    if errors:
        # The trials that ran are still recorded, as the optuna backend logs each trial when it ends; those the
        # stop cancelled before they reported anything are not trials that ran.
        ran = {(r.config or {}).get(_NUMBER) for r in results if r.error is not None or RAY_METRIC in (r.metrics or {})}
        if on_trial_end is not None:
            for t in records:
                if t["number"] in ran:
                    on_trial_end(t)
        number, error = errors[0]
        log.error("trial %s of '%s' failed with an error outside tune's catch; the study stops", number, study_name)
        raise error
    numbers = [t["number"] for t in records]
    if numbers != list(range(n_trials)):
        raise TuningError(
            f"study '{study_name}': Ray returned trials {numbers}, expected 0..{n_trials - 1} (lost or duplicated "
            f"trials); see {storage}/{study_name}"
        )
    for r in results:  # counted and said, never swallowed: caught errors fail their trial only
        if (r.metrics or {}).get("trial_error") or not r.metrics:
            why = (r.metrics or {}).get("trial_error", "no result reported")
            log.warning("trial %s of '%s' failed: %s", (r.config or {}).get(_NUMBER), study_name, why)
    if on_trial_end is not None:
        for t in records:
            on_trial_end(t)
    trials = [{k: t[k] for k in ("number", "params", "value", "state")} for t in records]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    if not done:
        states = sorted({t["state"] for t in trials})
        raise TuningError(
            f"study '{study_name}': none of {len(trials)} trials completed (states: {states}); narrow the search "
            "space (e.g. lower the top of the lr range), add trials, or set tune.pruning: false"
        )
    best = max(done, key=lambda t: (t["value"], -t["number"]))  # the first of equal values, as Optuna
    return {"best_value": best["value"], "best_params": dict(best["params"]), "trials": trials}

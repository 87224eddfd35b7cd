"""The Optuna backend of `tune@<strategy>`: TPE with median pruning, sequential or in forked workers that
share one study (journal file on one machine, PostgreSQL across machines; SQLite locks under concurrent
writers). Optuna is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.params import JOURNAL, PARALLEL_STORAGES
from transferlab.tuning.space import Objective, SearchSpace, TuningError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def _startup_trials(n_trials: int) -> int:
    """TPE's random trials before it models the space. TPE samples at random for its first n_startup_trials
    (10 by default): with fewer trials than that it would be a plain random search, so half of the budget
    (at least one trial) explores, the rest exploits."""
    return max(1, min(10, n_trials // 2))


def _trial_record(t: Any) -> dict[str, Any]:
    return {"number": t.number, "params": dict(t.params), "value": t.value, "state": t.state.name}


def open_storage(url: str) -> Any:
    """An Optuna storage: 'journal:///path' is a JournalStorage on a file (parallel workers on one machine,
    Optuna's advice for multi-process optimisation); any other URL goes to Optuna as it is (sqlite:///...
    for one worker, postgresql+psycopg2://... for workers on several machines)."""
    if url.startswith(JOURNAL):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix(JOURNAL))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return url


def tune(
    objective_fn: Objective,
    space: SearchSpace,
    *,
    n_trials: int,
    seed: int,
    storage_url: str,
    study_name: str,
    base_config: dict[str, Any],
    pruner: bool = True,
    catch: tuple[type[Exception], ...] = (),
    on_trial_end: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Maximise `objective_fn` over `space` with a seeded TPE sampler, one trial after the other, or in
    `workers` processes sharing the study through the storage.

    Each trial's suggested values are merged into `base_config` and passed as
    `objective_fn(config, report)`; `report(epoch, val_accuracy)` records an intermediate value and raises
    `optuna.TrialPruned` when the median pruner stops the trial.

    Args:
        objective_fn: returns the value to maximise (the best validation accuracy).
        space: the search space.
        n_trials: trials to run.
        seed: the sampler's seed; with sequential trials the study is reproducible.
        storage_url: Optuna storage, e.g. 'sqlite:///optuna.db'. An existing study of this name there is
            deleted first, so that a re-run starts clean.
        study_name: the study's name in the storage.
        base_config: the strategy's current params entry.
        pruner: median pruning of trials below the median of earlier ones at the same epoch (after five
            complete trials and the first reported epoch); False never prunes.
        catch: exceptions that fail one trial and let the study go on (e.g. a diverging learning rate).
        on_trial_end: called with each finished trial's record (number, params, value, state,
            intermediate values), e.g. to log it to MLflow; with workers, by this process once they finish.
        workers: processes (forked) that optimise the same study at once, `n_trials` shared out; needs a
            storage made for it (journal:///file or postgresql+psycopg2://...; SQLite locks: optuna#820). Each worker's
            sampler is seeded (seed + worker), but which trial gets which suggestion depends on timing: a
            parallel study is not reproducible trial for trial, a sequential one is.

    Returns:
        `{"best_value", "best_params", "trials": [{"number", "params", "value", "state"}, ...]}`.

    Raises:
        TuningError: no trial completed.
        Whatever `objective_fn` raises outside `catch` (the study keeps the trial as FAIL).
    """
    import optuna

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1 (got {n_trials})")
    if workers > 1 and not storage_url.startswith(PARALLEL_STORAGES):
        raise TuningError(
            f"{workers} workers need a storage for parallel optimisation, not {storage_url}: tune.storage "
            "journal:///optuna.journal (one machine) or postgresql+psycopg2://user@host/db (several)"
        )
    storage = open_storage(storage_url)
    try:
        optuna.delete_study(study_name=study_name, storage=storage)
        log.info("deleted the earlier study '%s' in %s: this run starts clean", study_name, storage_url)
    except KeyError:
        pass
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup_trials(n_trials))
    study = optuna.create_study(
        direction="maximize",
        sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=1) if pruner else optuna.pruners.NopPruner(),
        storage=storage,
        study_name=study_name,
        load_if_exists=False,
    )

    def objective(trial: optuna.Trial) -> float:
        config = {**base_config, **space.suggest(trial)}

        def report(epoch: int, value: float) -> None:
            trial.report(float(value), int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val accuracy {value:.4f})")

        return float(objective_fn(config, report))

    def callback(_study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if on_trial_end is not None:
            on_trial_end({**_trial_record(t), "intermediate_values": dict(t.intermediate_values)})

    if workers <= 1:
        study.optimize(objective, n_trials=n_trials, n_jobs=1, catch=catch, callbacks=[callback], gc_after_trial=False)
    else:
        _optimize_in_workers(objective, study_name, storage_url, seed, n_trials, workers, catch, pruner)
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
        for t in sorted(study.trials, key=lambda t: t.number):
            callback(study, t)
    trials = [_trial_record(t) for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        states = sorted({t["state"] for t in trials})
        raise TuningError(
            f"study '{study_name}': none of {len(trials)} trials completed (states: {states}); narrow the search "
            "space (e.g. lower the top of the lr range), add trials, or set tune.pruning: false"
        )
    best = study.best_trial
    return {"best_value": best.value, "best_params": dict(best.params), "trials": trials}


def _optimize_in_workers(
    objective: Callable,
    study_name: str,
    storage_url: str,
    seed: int,
    n_trials: int,
    workers: int,
    catch: tuple[type[Exception], ...],
    pruner: bool,
) -> None:
    """Fork `workers` processes, each optimising the shared study for its share of `n_trials`.

    Raises:
        TuningError: a worker exited with an error (its trials are in the storage; the others ran on).
    """
    import multiprocessing

    import optuna

    def work(index: int, share: int) -> None:
        study = optuna.load_study(
            study_name=study_name,
            storage=open_storage(storage_url),  # a fresh connection per process
            sampler=optuna.samplers.TPESampler(seed=seed + index, n_startup_trials=_startup_trials(n_trials)),
            pruner=optuna.pruners.MedianPruner(n_warmup_steps=1) if pruner else optuna.pruners.NopPruner(),
        )
        study.optimize(objective, n_trials=share, n_jobs=1, catch=catch, gc_after_trial=False)

    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=work, args=(i, s), name=f"tune-worker-{i}") for i, s in enumerate(shares) if s]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise TuningError(f"worker(s) {failed} of study '{study_name}' failed: see their errors above")

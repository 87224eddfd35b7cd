"""Optional hyperparameter tuning of one strategy with Optuna (stage `tune@<strategy>`).

A search space comes from params (`tune.space.<strategy>`): each key is a hyperparameter of the strategy's
config with a float or int range (`{low, high, log?, step?}`, the type taken from low/high) or a list of
`choices`. `tune` runs the trials one after the other with a seeded TPE sampler, so the same seed, space and
objective give the same trials; the study lives in its own Optuna storage (deleted and recreated on every
run, so a re-run starts clean instead of continuing an older study).

The objective is the validation accuracy: the test split is never seen while tuning, so the evaluation of
the tuned recipe afterwards stays an honest estimate.

Pruning needs the validation accuracy after every epoch, but `training.fit` takes no callback and keeps its
history to itself. `ReportingStrategy` wraps the trained strategy instead: `fit` calls its `on_epoch_start`
at the start of every epoch, when the model holds exactly the weights the previous epoch ended with, and
the wrapper evaluates them on the validation split itself (one extra validation pass per epoch, the same
numbers `fit` logged: eval mode, no augmentation, no draw from the training generator, so the training run is
unchanged) and reports it; `fit` puts the model back in train mode right after through `set_train_mode`.
The last epoch is not reported (no hook runs after it); its value is the trial's result anyway.

Two engines run a study (`tune.backend`): `tune` on Optuna (sequential and reproducible, or `workers` forked
processes sharing a journal/PostgreSQL storage), and `tune_ray` on Ray Tune (concurrent trials on a local
Ray or a cluster, Optuna's TPE sampler as the search algorithm, ASHA stopping the trials that trail). Both
take the same objective and search space and return the same summary; docs/tuning.md says when to use which.

Optuna, Ray and torch are imported only by the functions that need them, so parsing and validating params
(`check_tune_spaces`) works without them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Report = Callable[[int, float], None]
Objective = Callable[[dict[str, Any], Report], float]
_RANGE_KEYS = {"low", "high", "log", "step"}
_CHOICE_TYPES = (type(None), bool, int, float, str)


class TuningError(RuntimeError):
    """Tuning produced no usable result (every trial failed or was pruned); the message says what to change."""


@dataclass(frozen=True)
class Hyperparameter:
    """One dimension of a search space: a float/int range, or categorical choices."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial suggests for this hyperparameter."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """Values that cover the space's bounds: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _parse_one(key: str, raw: Any, where: str) -> Hyperparameter:
    at = f"{where}.{key}" if where else key
    if not isinstance(raw, dict):
        raise ValueError(f"{at}: expected a mapping {{low, high[, log, step]}} or {{choices: [...]}} (got {raw!r})")
    if "choices" in raw:
        extra = sorted(set(raw) - {"choices"})
        if extra:
            raise ValueError(f"{at}: a categorical entry takes only 'choices' (unexpected: {extra})")
        choices = raw["choices"]
        if not isinstance(choices, list | tuple) or not choices:
            raise ValueError(f"{at}.choices: expected a non-empty list (got {choices!r})")
        bad = [c for c in choices if not isinstance(c, _CHOICE_TYPES)]
        if bad:
            raise ValueError(f"{at}.choices: values must be numbers, strings, booleans or null (got {bad!r})")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{at}.choices: duplicate values in {choices!r}")
        return Hyperparameter(key, "categorical", choices=tuple(choices))
    unknown = sorted(set(raw) - _RANGE_KEYS)
    if unknown:
        raise ValueError(f"{at}: unknown key(s) {unknown} (a range takes {sorted(_RANGE_KEYS)}; or use 'choices')")
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"{at}: a range needs both 'low' and 'high' (got {raw!r})")
    low, high, log_, step = raw["low"], raw["high"], raw.get("log", False), raw.get("step")
    if not (_is_number(low) and _is_number(high)):
        raise ValueError(f"{at}: low and high must be finite numbers (got low={low!r}, high={high!r})")
    if not low < high:
        raise ValueError(f"{at}: low must be below high (got low={low!r}, high={high!r})")
    if not isinstance(log_, bool):
        raise ValueError(f"{at}.log: expected true or false (got {log_!r})")
    if log_ and low <= 0:
        raise ValueError(f"{at}: a log range needs low > 0 (got low={low!r})")
    kind = "int" if _is_int(low) and _is_int(high) else "float"
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not _is_int(step)):
            raise ValueError(f"{at}.step: expected a positive {kind} (got {step!r})")
        if log_:
            raise ValueError(f"{at}: 'step' and 'log: true' cannot be combined (Optuna refuses both)")
    if kind == "float":
        low, high = float(low), float(high)
    return Hyperparameter(key, kind, low, high, log_, step)


@dataclass(frozen=True)
class SearchSpace:
    """The hyperparameters one strategy's study samples, in params order."""

    params: tuple[Hyperparameter, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "") -> SearchSpace:
        """Parse `{name: {low, high[, log, step]} | {choices: [...]}}`.

        Ranges are int when both low and high are ints, else float.

        Args:
            raw: the mapping (one strategy's `tune.space` entry).
            where: prefix for error messages, e.g. 'tune.space.lora'.

        Raises:
            ValueError: empty space, or a bad entry; the message names the key.
        """
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{where or 'search space'}: needs at least one hyperparameter (got {raw!r})")
        if "kind" in raw:
            raise ValueError(f"{where}.kind: the strategy kind cannot be tuned; add one entry per kind instead")
        return cls(tuple(_parse_one(str(k), v, where) for k, v in raw.items()))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def low_end(self) -> dict[str, Any]:
        """Every range at its low end, every categorical at its first choice."""
        return {p.name: p.extremes()[0] for p in self.params}

    def corners(self) -> Iterator[dict[str, Any]]:
        """Configs that together touch every bound and every choice (the low end, then one value changed
        at a time), for validating the space against a strategy's config before any trial runs."""
        base = self.low_end()
        yield base
        for p in self.params:
            for v in p.extremes()[1:]:
                yield {**base, p.name: v}


def validate_space(name: str, base_config: dict[str, Any] | None, space: SearchSpace) -> None:
    """Check that `strategies.<name>` merged with every corner of the space is a valid strategy config.

    Raises:
        ValueError: unknown hyperparameter or out-of-range bound, naming `tune.space.<name>`.
    """
    from transferlab.strategies import strategy_config

    for corner in space.corners():
        try:
            strategy_config(name, {**(base_config or {}), **corner})
        except (KeyError, ValueError) as exc:
            raise ValueError(f"tune.space.{name}: {exc}") from None


def check_tune_spaces(
    tuned: list[str], spaces: dict[str, dict[str, Any]], strategies: dict[str, dict[str, Any]]
) -> None:
    """Params-level checks: every tuned strategy has a parsable space that fits its config. Spaces of
    strategies that are not tuned are kept as ready-made examples and only checked once tuned.

    Raises:
        ValueError: naming `tune.space.<name>[.<key>]`.
    """
    for name in tuned:
        if name not in spaces:
            raise ValueError(f"tune.space.{name}: '{name}' is listed in tune.strategies but has no search space")
        validate_space(name, strategies[name], SearchSpace.from_dict(spaces[name], where=f"tune.space.{name}"))


class ReportingStrategy:
    """A strategy wrapper that reports the validation accuracy of every finished epoch but the last.

    Every attribute is the wrapped strategy's; only `on_epoch_start` differs: for epoch >= 2 it evaluates
    the model on the validation split, calls `report(epoch - 1, accuracy)` (which may raise
    `optuna.TrialPruned`, ending `fit`) and then runs the wrapped strategy's own hook.

    Args:
        strategy: the real strategy.
        report: `report(epoch, val_accuracy)`.
        val_x: the validation inputs of the trained module: uint8 images (N, H, W, 3) when `mean` and `std`
            are given, else an array fed as it is (the features cache of `uses_features` strategies).
        val_labels: int labels.
        mean, std: the source's preprocessing (images only).
        batch_size: evaluation batch (256, as in `fit`, so the numbers match its history).
    """

    def __init__(
        self,
        strategy: Any,
        report: Report,
        val_x: np.ndarray,
        val_labels: np.ndarray,
        mean: tuple | None = None,
        std: tuple | None = None,
        batch_size: int = 256,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (images) or neither (features)")
        import torch

        self._strategy = strategy
        self._report = report
        self._val_x = val_x
        self._val_y = torch.as_tensor(val_labels, dtype=torch.long)
        self._mean, self._std = mean, std
        self._batch_size = batch_size
        self.reported: list[tuple[int, float]] = []

    def __getattr__(self, item: str) -> Any:
        # Only called for attributes this wrapper lacks: everything but on_epoch_start and its own state.
        if item.startswith("_"):
            raise AttributeError(item)
        return getattr(self._strategy, item)

    def __repr__(self) -> str:
        return f"ReportingStrategy({self._strategy!r})"

    def _inputs(self, idx: np.ndarray) -> torch.Tensor:
        import torch

        if self._mean is not None:
            from transferlab.backbones import to_input

            return to_input(self._val_x[idx], self._mean, self._std)
        return torch.from_numpy(np.ascontiguousarray(self._val_x[idx], dtype=np.float32))

    def val_accuracy(self, model: torch.nn.Module) -> float:
        """Accuracy of `model` (put in eval mode) on the validation split, as `fit` computes it."""
        from transferlab.training import predict_logits

        logits = predict_logits(model, self._inputs, len(self._val_y), self._batch_size)
        return float((logits.argmax(1) == self._val_y).float().mean())

    def on_epoch_start(self, model: torch.nn.Module, epoch: int, cfg: Any, optimizer: Any) -> None:
        if epoch >= 2:
            acc = round(self.val_accuracy(model), 6)  # rounded like fit's history rows
            self.reported.append((epoch - 1, acc))
            self._report(epoch - 1, acc)
        self._strategy.on_epoch_start(model, epoch, cfg, optimizer)


def _startup_trials(n_trials: int) -> int:
    """TPE's random trials before it models the space. TPE samples at random for its first n_startup_trials
    (10 by default): with fewer trials than that it would be a plain random search, so half of the budget
    (at least one trial) explores, the rest exploits."""
    return max(1, min(10, n_trials // 2))


def _trial_record(t: Any) -> dict[str, Any]:
    return {"number": t.number, "params": dict(t.params), "value": t.value, "state": t.state.name}


JOURNAL = "journal:///"
PARALLEL_STORAGES = (JOURNAL, "postgresql")


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

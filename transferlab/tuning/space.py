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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

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
    """Params-level checks of the whole `tune.space` section: every tuned strategy has a space, and every
    space, tuned this run or kept as a ready-made example, parses and fits its strategy's config (the
    `strategies.<name>` entry when there is one, else the registered strategy of that name).

    Raises:
        ValueError: naming `tune.space.<name>[.<key>]`.
    """
    for name in tuned:
        if name not in spaces:
            raise ValueError(f"tune.space.{name}: '{name}' is listed in tune.strategies but has no search space")
    for name in sorted(spaces):
        base = strategies.get(name)
        validate_space(name, base, SearchSpace.from_dict(spaces[name], where=f"tune.space.{name}"))

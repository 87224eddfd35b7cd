"""Hyperparameter tuning: search-space parsing, a seeded and reproducible Optuna study in SQLite, pruning,
the epoch-reporting strategy wrapper, and one real tune@linear_probe stage on the tiny fixtures."""

from __future__ import annotations

import json
import math
import sys

import optuna
import pytest
import yaml
from conftest import two_worker_study
from tiny_repo import write_stage_inputs

from transferlab.config import parse_params
from transferlab.core.seeding import seed_everything
from transferlab.models.inference import extract
from transferlab.params import ParamsError
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.protocol import TrainRecipe, train_strategy
from transferlab.tuning.objective import ReportingStrategy
from transferlab.tuning.optuna_backend import tune
from transferlab.tuning.space import SearchSpace, TuningError, validate_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"lr": {"low": 1e-5, "high": 1e-1, "log": True}, "rank": {"choices": [2, 4, 8, 16]}, "k": {"low": 1, "high": 4}}


def _storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/optuna.db"


# --- SearchSpace ---------------------------------------------------------------------------------------


def test_search_space_parses_float_int_and_categorical():
    space = SearchSpace.from_dict(SPACE)
    lr, rank, k = space.params
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-1, True)
    assert (rank.kind, rank.choices) == ("categorical", (2, 4, 8, 16))
    assert (k.kind, k.low, k.high) == ("int", 1, 4)
    assert space.names == ["lr", "rank", "k"]
    assert space.low_end() == {"lr": 1e-5, "rank": 2, "k": 1}
    corners = list(space.corners())
    assert {c["lr"] for c in corners} == {1e-5, 1e-1} and {c["rank"] for c in corners} == {2, 4, 8, 16}
    # A float bound makes the range float.
    assert SearchSpace.from_dict({"alpha": {"low": 1, "high": 2.5}}).params[0].kind == "float"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"lr": 0.01}, r"lr: expected a mapping"),
        ({"lr": {"low": 0.1, "high": 0.01}}, r"lr: low must be below high"),
        ({"lr": {"low": 0, "high": 1, "log": True}}, r"lr: a log range needs low > 0"),
        ({"lr": {"low": 1e-3, "high": 1, "lg": True}}, r"lr: unknown key\(s\) \['lg'\]"),
        ({"lr": {"low": 1e-3}}, r"lr: a range needs both 'low' and 'high'"),
        ({"lr": {"low": "a", "high": 1}}, r"lr: low and high must be finite numbers"),
        ({"flag": {"low": False, "high": True}}, r"flag: low and high must be finite numbers"),
        ({"lr": {"low": 1e-3, "high": 1, "log": "yes"}}, r"lr.log: expected true or false"),
        ({"k": {"low": 1, "high": 4, "step": 0.5}}, r"k.step: expected a positive int"),
        ({"lr": {"low": 1e-3, "high": 1, "log": True, "step": 0.1}}, r"lr: 'step' and 'log: true'"),
        ({"rank": {"choices": []}}, r"rank.choices: expected a non-empty list"),
        ({"rank": {"choices": [1, [2]]}}, r"rank.choices: values must be"),
        ({"rank": {"choices": [1, 1]}}, r"rank.choices: duplicate"),
        ({"rank": {"choices": [1, 2], "low": 1}}, r"rank: a categorical entry takes only 'choices'"),
        ({"kind": {"choices": ["lora"]}}, r"kind: the strategy kind cannot be tuned"),
        ({}, r"needs at least one hyperparameter"),
    ],
)
def test_search_space_errors_name_the_key(raw, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(raw, where="tune.space.lora")


def test_validate_space_catches_unknown_and_out_of_range_hyperparameters():
    validate_space("lora", {"rank": 8, "lr": 3e-3}, SearchSpace.from_dict({"rank": {"choices": [2, 4]}}))
    with pytest.raises(ValueError, match=r"tune.space.lora: strategies.lora.rnak: unknown key"):
        validate_space("lora", {}, SearchSpace.from_dict({"rnak": {"choices": [2, 4]}}))
    with pytest.raises(ValueError, match=r"tune.space.linear_probe: strategies.linear_probe.lr"):
        validate_space("linear_probe", {}, SearchSpace.from_dict({"lr": {"low": 1e-3, "high": 20.0}}))  # le=10


# --- tune -----------------------------------------------------------------------------------------------


def _quadratic(config, report):
    """Maximal at lr = 0.01, reported over three fake epochs that approach the final value."""
    value = -((config["lr"] - 0.01) ** 2)
    for epoch in (1, 2, 3):
        report(epoch, value * (1 + 1 / epoch))
    return value


def test_tune_finds_the_optimum_reproducibly_and_stores_the_study(tmp_path):
    space = SearchSpace.from_dict({"lr": {"low": 1e-5, "high": 1e-1, "log": True}})
    kwargs = dict(n_trials=15, seed=3, storage_url=_storage(tmp_path), study_name="toy", base_config={"rank": 8})
    seen = []
    first = tune(_quadratic, space, **kwargs, on_trial_end=seen.append)
    assert 0.001 <= first["best_params"]["lr"] <= 0.1
    assert first["best_value"] == max(t["value"] for t in first["trials"] if t["state"] == "COMPLETE")
    assert [t["number"] for t in first["trials"]] == list(range(15))
    assert set(first["trials"][0]) == {"number", "params", "value", "state"}
    assert [s["number"] for s in seen] == list(range(15)) and "intermediate_values" in seen[0]

    # The same seed again: the old study is deleted and recreated, and every trial is the same.
    second = tune(_quadratic, space, **kwargs)
    assert second["best_params"] == first["best_params"]
    assert [t["params"] for t in second["trials"]] == [t["params"] for t in first["trials"]]
    stored = optuna.load_study(study_name="toy", storage=_storage(tmp_path))
    assert len(stored.trials) == 15  # not 30: the re-run started clean
    assert stored.best_params == first["best_params"]


def test_the_objective_gets_the_base_config_merged_with_the_suggestions(tmp_path):
    got = []

    def objective(config, report):
        got.append(config)
        return config["k"]

    space = SearchSpace.from_dict({"k": {"low": 1, "high": 4}, "rank": {"choices": [2, 4]}})
    tune(objective, space, n_trials=3, seed=0, storage_url=_storage(tmp_path), study_name="m", base_config={"lr": 1})
    assert all(set(c) == {"lr", "k", "rank"} and c["lr"] == 1 for c in got)
    assert all(isinstance(c["k"], int) and 1 <= c["k"] <= 4 and c["rank"] in (2, 4) for c in got)


def test_trials_bad_early_are_pruned(tmp_path):
    def objective(config, report):
        x = config["x"]
        for epoch in range(1, 6):
            report(epoch, x * epoch / 5)  # a low x is visibly worse from the first epoch on
        return x

    space = SearchSpace.from_dict({"x": {"low": 0.0, "high": 1.0}})
    res = tune(objective, space, n_trials=12, seed=0, storage_url=_storage(tmp_path), study_name="p", base_config={})
    states = [t["state"] for t in res["trials"]]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 5
    # Optuna keeps a pruned trial's last reported value; it never becomes the best.
    assert all(t["value"] < res["best_value"] for t in res["trials"] if t["state"] == "PRUNED")
    # With pruning off, the same study completes every trial.
    res = tune(
        objective,
        space,
        n_trials=5,
        seed=0,
        storage_url=_storage(tmp_path),
        study_name="p",
        base_config={},
        pruner=False,
    )
    assert {t["state"] for t in res["trials"]} == {"COMPLETE"}


def test_caught_errors_fail_one_trial_and_no_success_is_an_error(tmp_path):
    def objective(config, report):
        if config["x"] > 0.5:
            raise FloatingPointError("diverged")
        return config["x"]

    space = SearchSpace.from_dict({"x": {"low": 0.0, "high": 1.0}})
    kw = dict(n_trials=6, seed=1, storage_url=_storage(tmp_path), base_config={}, catch=(FloatingPointError,))
    res = tune(objective, space, study_name="c", **kw)
    assert "FAIL" in {t["state"] for t in res["trials"]} and res["best_value"] <= 0.5

    def always(config, report):
        raise FloatingPointError("diverged")

    with pytest.raises(TuningError, match="none of 6 trials completed"):
        tune(always, space, study_name="c2", **kw)
    with pytest.raises(FloatingPointError):  # not in `catch`: the stage fails
        tune(always, space, study_name="c3", **{**kw, "catch": ()})


# --- ReportingStrategy ----------------------------------------------------------------------------------


def _fit(strategy, cfg, tiny_source, tiny_data, epochs=2, features=None):
    import copy

    return train_strategy(
        strategy,
        cfg,
        copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=epochs, batch_size=8, patience=epochs, weight_decay=0.0, augment="crop_flip"),
        seed=0,
        generator=seed_everything(0),
        features=features,
        label="t",
    )


def test_reporting_strategy_delegates_and_reports_what_fit_logged(tiny_source, tiny_data):
    cfg = strategy_config("finetune_top", {"k": 1, "lr": 0.01})
    real = get_strategy(cfg.kind)
    reports = []
    wrapped = ReportingStrategy(
        real,
        lambda e, v: reports.append((e, v)),
        tiny_data["images"]["val"],
        tiny_data["labels"]["val"],
        tiny_source.mean,
        tiny_source.std,
    )
    assert wrapped.name == "finetune_top" and wrapped.Config is real.Config
    assert wrapped.uses_features is False and wrapped.param_groups == real.param_groups
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute

    plain = _fit(real, cfg, tiny_source, tiny_data)
    reported = _fit(wrapped, cfg, tiny_source, tiny_data)
    # The extra validation pass changes nothing in training, and reports the history's numbers.
    assert reported.history == plain.history
    expected = [(row["epoch"], row["val_accuracy"]) for row in plain.history[:-1]]
    assert reports == expected == wrapped.reported


def test_a_pruning_report_stops_training_on_features(tiny_source, tiny_data):
    cfg = strategy_config("linear_probe", {"lr": 0.01})
    features = {
        s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std, with_logits=False)[0]
        for s in ("train", "val")
    }
    reports = []

    def report(epoch, value):
        reports.append((epoch, value))
        if epoch == 2:
            raise optuna.TrialPruned(f"epoch {epoch}")

    # Without mean/std the wrapper feeds the features cache to the head, as fit does for linear_probe.
    wrapped = ReportingStrategy(get_strategy("linear_probe"), report, features["val"], tiny_data["labels"]["val"])
    with pytest.raises(optuna.TrialPruned, match="epoch 2"):
        _fit(wrapped, cfg, tiny_source, tiny_data, epochs=5, features=features)
    full = _fit(get_strategy("linear_probe"), cfg, tiny_source, tiny_data, epochs=5, features=features)
    assert reports == [(r["epoch"], r["val_accuracy"]) for r in full.history[:2]]
    with pytest.raises(ValueError, match="both mean and std"):
        ReportingStrategy(get_strategy("scratch"), report, features["val"], [0], mean=(0.5, 0.5, 0.5))


# --- params ---------------------------------------------------------------------------------------------


def _params(**tune_section):
    return {
        "sources": {"tiny": {"kind": "random_init", "arch": "test_efficientnet"}},
        "train": {"source": "tiny"},
        "strategies": {"scratch": {}, "linear_probe": {"lr": 0.003}},
        "diagnose": {"forgetting_source": None},
        "tune": tune_section,
    }


def test_a_postgresql_storage_without_a_driver_names_the_one_installed(monkeypatch):
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the lock does not install: a params error
    that gives the psycopg2 URL, not a ModuleNotFoundError from inside the first trial."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(ParamsError, match=r"tune.storage: .*write postgresql\+psycopg2://me@db.lab/optuna"):
        parse_params(_params(storage="postgresql://me@db.lab/optuna"))
    assert parse_params(_params(storage="postgresql+psycopg2://me@db.lab/optuna", workers=2)).tune.workers == 2


def test_tune_params_defaults_and_cross_checks():
    p = parse_params(_params())
    assert (p.tune.strategies, p.tune.n_trials, p.tune.epochs, p.tune.storage) == ([], 8, 3, "sqlite:///optuna.db")
    ok = parse_params(_params(strategies=["linear_probe"], space={"linear_probe": {"lr": {"low": 1e-4, "high": 1.0}}}))
    assert ok.tune.strategies == ["linear_probe"]
    with pytest.raises(ParamsError, match=r"tune.strategies: \['lora'\] not key.*valid: \['linear_probe', 'scratch'\]"):
        parse_params(_params(strategies=["lora"]))
    with pytest.raises(ParamsError, match=r"tune.space.linear_probe: .* has no search space"):
        parse_params(_params(strategies=["linear_probe"]))
    with pytest.raises(ParamsError, match=r"tune.space.linear_probe.lr: low must be below high"):
        parse_params(_params(strategies=["linear_probe"], space={"linear_probe": {"lr": {"low": 1.0, "high": 0.1}}}))
    with pytest.raises(ParamsError, match=r"strategies.linear_probe.rank: unknown key"):
        parse_params(_params(strategies=["linear_probe"], space={"linear_probe": {"rank": {"choices": [2, 4]}}}))
    # A space for a strategy that is not tuned this run is still checked whole: a typo in it fails now, not
    # on the day the strategy is added to tune.strategies.
    assert parse_params(_params(space={"lora": {"lr": {"low": 1e-4, "high": 1.0}}})).tune.space
    with pytest.raises(ParamsError, match=r"tune.space.lin_probe: .*unknown strategy kind 'lin_probe'"):
        parse_params(_params(space={"lin_probe": {"lr": {"low": 1e-4, "high": 1.0}}}))
    with pytest.raises(ParamsError, match=r"tune.space.lora: .*rnak"):
        parse_params(_params(space={"lora": {"rnak": {"choices": [2, 4]}}}))
    with pytest.raises(ParamsError, match=r"tune.storage: .*MLflow's database"):
        parse_params(_params(storage="sqlite:///mlflow.db"))
    with pytest.raises(ParamsError, match=r"tune.n_trials"):
        parse_params(_params(n_trials=0))


# --- the stage, for real --------------------------------------------------------------------------------


def test_tune_stage_linear_probe_end_to_end(tiny_source, tiny_data, tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_stage_inputs(tmp_path, tiny_data["images"], tiny_data["labels"], tiny_data["class_names"], tiny_source)
    raw = _params(
        strategies=["linear_probe"],
        n_trials=2,
        epochs=1,
        storage="sqlite:///optuna.db",
        space={"linear_probe": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}},
    )
    raw["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": "t"}
    raw["train"] |= {"batch_size": 8, "augment": "none"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    argv = "tune --strategy linear_probe --prepared prepared --features features --selection selection.json"
    argv += " --out tuned/linear_probe.yaml --metrics metrics/linear_probe.json"
    monkeypatch.setattr(sys, "argv", argv.split())
    from stages import tune as stage

    stage.main()

    metrics = json.loads((tmp_path / "metrics/linear_probe.json").read_text())
    assert metrics["n_trials"] == 2 and metrics["n_pruned"] == 0 and 0 <= metrics["best_value"] <= 1
    assert set(metrics["best_params"]) == {"lr"} and 1e-3 <= metrics["best_params"]["lr"] <= 1.0
    fragment = yaml.safe_load((tmp_path / "tuned/linear_probe.yaml").read_text())
    assert fragment == {"strategies": {"linear_probe": {"lr": metrics["best_params"]["lr"]}}}
    assert "--set-param strategies.linear_probe.lr=" in (tmp_path / "tuned/linear_probe.yaml").read_text()
    study = optuna.load_study(study_name="tune@linear_probe", storage="sqlite:///optuna.db")
    assert len(study.trials) == 2 and math.isclose(study.best_value, metrics["best_value"], abs_tol=1e-6)

    import mlflow

    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune@linear_probe"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1"]
    assert all("val_accuracy" in r.data.metrics and "lr" in r.data.params for r in trials)


def test_two_parallel_workers_share_one_study_on_a_journal_file(tmp_path):
    """Two forked workers on one JournalStorage study: every trial of the budget ran once (none lost, none
    duplicated), both workers took part, and the best trial reported is the best of all of them."""
    logged = []
    result = two_worker_study(f"journal:///{tmp_path}/optuna.journal", tmp_path / "calls", on_trial_end=logged.append)
    # every trial reaches MLflow, from this process
    assert sorted(t["number"] for t in logged) == sorted(t["number"] for t in result["trials"])


def test_parallel_workers_refuse_sqlite(tmp_path):
    space = SearchSpace.from_dict({"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    with pytest.raises(TuningError, match="journal:///optuna.journal.*postgresql"):
        tune(
            lambda c, r: 0.0,
            space,
            n_trials=2,
            seed=0,
            storage_url=f"sqlite:///{tmp_path}/o.db",
            study_name="s",
            base_config={"kind": "lora"},
            workers=2,
        )


def test_tune_workers_with_sqlite_is_a_params_error():
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["tune"].update(workers=2)
    with pytest.raises(ParamsError, match="tune.workers: 2 workers need tune.storage journal:///optuna.journal"):
        parse_params(raw)
    raw["tune"].update(storage="journal:///optuna.journal")
    assert parse_params(raw).tune.workers == 2

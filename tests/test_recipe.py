"""One recipe: train@, tune@, agreement and the diagnosis remedies train with the same `TrainRecipe`, made by
`build_recipe` from the same params, captured where each caller hands it to the training layer."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import numpy as np
import pytest
import torch
import yaml
from tiny_repo import TINY_SPEC, write_stage_inputs

from transferlab.config import parse_params
from transferlab.params import SourceSpec
from transferlab.strategies import strategy_config
from transferlab.training.recipe import TrainRecipe, build_recipe

# Every schedule field away from `fit`'s own defaults (lr_patience None, lr_factor 0.3, min_delta 1e-3,
# min_lr_ratio 0.01, channels_last False; the convergence rule's window None, fit_accuracy 0.9,
# plateau_min_lr_ratio 0.1) and the first training seed away from params `seed` (42): a caller
# that drops a field or picks another seed shows up as a difference.
TRAIN = {
    "source": "tiny",
    "device": "cpu",
    "epochs": 5,
    "batch_size": 16,
    "patience": 4,
    "lr_patience": 3,
    "lr_factor": 0.5,
    "min_lr_ratio": 0.05,
    "min_delta": 0.01,
    "convergence_window": 4,
    "fit_accuracy": 0.8,
    "plateau_min_lr_ratio": 0.2,
    "weight_decay": 0.02,
    "augment": "crop",
    "channels_last": True,
    "lr_grid": [0.5, 2.0],
    "lr_search_epochs": 2,
    "lr_grid_extend": 2,
    "seeds": [3, 4],
}
EXPECTED = TrainRecipe(
    epochs=5,
    batch_size=16,
    patience=4,
    weight_decay=0.02,
    augment="crop",
    lr_patience=3,
    lr_factor=0.5,
    min_lr_ratio=0.05,
    min_delta=0.01,
    convergence_window=4,
    fit_accuracy=0.8,
    plateau_min_lr_ratio=0.2,
    channels_last=True,
    lr_grid=(0.5, 2.0),
    lr_search_epochs=2,
    lr_grid_extend=2,
    seeds=(3, 4),
    num_threads=0,
    device=torch.device("cpu"),
)


def _raw(**sections) -> dict:
    raw = {
        "sources": {"tiny": dict(TINY_SPEC)},
        "train": dict(TRAIN),
        # linear_probe's own cap (30 by default) set to train.epochs: the remedy's finetune_full has none.
        "strategies": {"scratch": {}, "linear_probe": {"lr": 0.003, "epochs": 5}, "finetune_full": {"lr": 0.001}},
        # tune.epochs equal to the cap: the budget override then changes nothing, so the recipes compare whole.
        "tune": {
            "strategies": ["linear_probe"],
            "epochs": 5,
            "n_trials": 1,
            "space": {"linear_probe": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}},
        },
        "agreement": {"finetune_epochs": 0},
        "diagnose": {"forgetting_source": None, "remedy_epochs": None},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


class _Captured(Exception):
    """Raised where a caller hands its recipe to the training layer: nothing trains."""


def _capture(into: dict, key: str):
    """A stand-in for a training-layer function whose 7th positional argument is the recipe."""

    def fake(*args, **kwargs):
        into[key] = args[6] if len(args) > 6 else kwargs["recipe"]
        raise _Captured

    return fake


def _run_stage(module, argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv.split()])
    with pytest.raises(_Captured):
        module.main()


@pytest.fixture
def project(tmp_path, tiny_source, tiny_data, monkeypatch):
    """A stage's working folder: params.yaml, prepared splits, the tiny source's features cache (train, val,
    test) and selection.json; MLflow replaced by a no-op run."""
    from transferlab.models.inference import extract
    from transferlab.provenance import tracking

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_raw()))
    write_stage_inputs(tmp_path, tiny_data["images"], tiny_data["labels"], tiny_data["class_names"], tiny_source)
    test_feats, _ = extract(tiny_source.model, tiny_data["images"]["test"], tiny_source.mean, tiny_source.std)
    np.save(tmp_path / "features/tiny/test_features.npy", test_feats)
    (tmp_path / "score.json").write_text("{}")
    monkeypatch.setattr(tracking, "stage_run", lambda *a, **k: contextlib.nullcontext(None))
    return tmp_path


def test_every_caller_trains_with_the_same_recipe(project, monkeypatch):
    """train@, tune@, agreement and a diagnosis remedy, from the same params: equal field for field.

    On the code before `build_recipe` this fails on the tune@ path: its objective called `train_strategy`
    with epochs, batch size, patience, weight decay and augmentation only, and `seed=params.seed`, so a
    recipe captured there held `fit`'s defaults (lr_patience None, lr_factor 0.3, min_delta 1e-3,
    min_lr_ratio 0.01, channels_last False) and seed 42 instead of params' 3, 0.5, 0.01, 0.05, True and the
    first training seed 3: five schedule fields and the seed differ from train@'s.
    """
    import stages.agreement
    import stages.train
    import stages.tune
    from transferlab.data.splits import load_prepared
    from transferlab.diagnosis.checks import DiagnosisContext
    from transferlab.training import protocol, run

    recipes: dict[str, TrainRecipe] = {}
    common = "--prepared prepared --features features --pretrained-dir models/pretrain"

    def train_stage(name, strategy, cfg, recipe, *rest):
        recipes["train"] = recipe
        raise _Captured

    monkeypatch.setattr(run, "train_stage", train_stage)
    _run_stage(
        stages.train,
        f"--strategy linear_probe {common} --selection selection.json --out m --metrics t.json --history h "
        "--perf p.json --run-info r.json",
        monkeypatch,
    )

    monkeypatch.setattr(protocol, "train_strategy", _capture(recipes, "tune"))

    def one_trial(objective, entry, *args, **kwargs):
        return objective(dict(entry), lambda epoch, value: None)

    monkeypatch.setattr(stages.tune, "tune_strategy", one_trial)
    _run_stage(
        stages.tune,
        f"--strategy linear_probe {common} --selection selection.json --out t.yaml --metrics t.json",
        monkeypatch,
    )

    monkeypatch.setattr(protocol, "train_protocol", _capture(recipes, "agreement"))
    _run_stage(
        stages.agreement,
        f"{common} --score score.json --metrics a.json --plot a.csv --predictions a_pred.csv --figure a.png",
        monkeypatch,
    )

    params = parse_params(_raw())
    data = load_prepared(project / "prepared")
    ctx = DiagnosisContext(
        params=params,
        data=data,
        selected="tiny",
        selected_spec=SourceSpec(**TINY_SPEC),
        features_dir=project / "features",
        pretrained_dir=project / "models/pretrain",
        models_dir=project / "models",
        history_dir=project / "plots",
        train_metrics_dir=None,
        sample_ids=np.arange(len(data.labels["test"])),
        y=data.labels["test"],
        preds_by_seed={},
        device=torch.device("cpu"),
    )
    monkeypatch.setattr(protocol, "train_strategy", _capture(recipes, "diagnosis remedy"))
    with pytest.raises(_Captured):
        ctx.finetune_like("finetune_full", 0.001)

    assert set(recipes) == {"train", "tune", "agreement", "diagnosis remedy"}
    for caller, recipe in recipes.items():
        assert dataclasses.asdict(recipe) == dataclasses.asdict(EXPECTED), caller


def test_the_documented_overrides_change_the_epochs_only():
    params = parse_params(
        _raw(
            tune={"epochs": 2},
            agreement={"finetune_epochs": 1},
            diagnose={"remedy_epochs": 3},
            strategies={"finetune_full": {"lr": 0.001, "epochs": 7}},
        )
    )
    from transferlab.diagnosis.checks import DiagnosisContext
    from transferlab.scoring.agreement import agreement_recipes
    from transferlab.tuning.objective import TrialObjective

    probe = strategy_config("linear_probe", params.strategies["linear_probe"])
    ft = strategy_config("finetune_full", params.strategies["finetune_full"])
    assert build_recipe(params.train, ft).epochs == 7  # a strategy's own epochs is its cap
    objective = TrialObjective("linear_probe", None, params.train, params.tune.epochs, ("lr",), *([None] * 5))
    assert objective.recipe({"lr": 0.01}) == dataclasses.replace(build_recipe(params.train, probe), epochs=2)
    tuned_epochs = dataclasses.replace(objective, space_names=("lr", "epochs"))
    assert tuned_epochs.recipe({"lr": 0.01, "epochs": 4}).epochs == 4  # a trial's own epoch budget
    short = agreement_recipes(params)["short_finetune"][1]
    assert short == dataclasses.replace(build_recipe(params.train, probe), epochs=1)
    nothing = dict.fromkeys(("data", "selected_spec", "features_dir", "pretrained_dir", "models_dir", "history_dir"))
    nothing |= dict.fromkeys(("train_metrics_dir", "sample_ids", "y"))
    ctx = DiagnosisContext(params=params, selected="tiny", preds_by_seed={}, **nothing)
    assert ctx.recipe("finetune_full", ft).epochs == 3  # diagnose.remedy_epochs caps it
    assert build_recipe(params.train, ft, max_epochs=9).epochs == 7  # a cap above changes nothing
    remedy = ctx.recipe("finetune_full", ft)
    assert remedy.short_run(2) == dataclasses.replace(remedy, epochs=2, patience=2)  # a fixed budget


def test_a_strategy_schedule_and_search_budget_reach_its_recipe_only():
    """Scratch's own schedule fields (cosine, warm-up, search budget) shape its recipe through `build_recipe`;
    a strategy that declares none keeps train's plateau schedule and search budget."""
    scratch = {"lr": 0.003, "schedule": "cosine", "epochs": 9, "warmup_epochs": 3, "lr_search_epochs": 6}
    params = parse_params(_raw(strategies={"scratch": scratch}))
    own = build_recipe(params.train, strategy_config("scratch", params.strategies["scratch"]))
    assert (own.schedule, own.epochs, own.warmup_epochs, own.lr_search_epochs) == ("cosine", 9, 3, 6)
    assert dataclasses.replace(own, schedule="plateau", epochs=5, warmup_epochs=1, lr_search_epochs=2) == (
        dataclasses.replace(EXPECTED, device=None)
    )
    assert own.record()["schedule"] == "cosine" and own.record()["fit_accuracy"] == 0.8
    probe = build_recipe(params.train, strategy_config("linear_probe", params.strategies["linear_probe"]))
    assert (probe.schedule, probe.warmup_epochs, probe.lr_search_epochs) == ("plateau", 1, 2)
    plain = build_recipe(params.train, strategy_config("scratch", {}))
    assert (plain.schedule, plain.lr_search_epochs) == ("plateau", 2)
    with pytest.raises(ValueError, match=r"strategies.scratch.schedule"):
        strategy_config("scratch", {"schedule": "linear"})


def test_a_recipe_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match=r"batch_size must be >= 1 \(got 0\).*augment must be one of"):
        TrainRecipe(epochs=1, batch_size=0, patience=1, weight_decay=0.0, augment="flip")
    with pytest.raises(ValueError, match=r"schedule must be one of .*convergence_window must be >= 3"):
        TrainRecipe(epochs=1, batch_size=1, patience=1, weight_decay=0.0, schedule="step", convergence_window=2)
    with pytest.raises(ValueError, match=r"lr_grid must hold positive multipliers"):
        TrainRecipe(epochs=1, batch_size=1, patience=1, weight_decay=0.0, lr_grid=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"build_recipe: epochs must be >= 1 \(got 0\)"):
        build_recipe(parse_params(_raw()).train, strategy_config("linear_probe", {}), epochs=0)
    recipe = TrainRecipe(epochs=1, batch_size=1, patience=1, weight_decay=0.0, lr_grid=[1.0], seeds=[0])
    assert recipe.lr_grid == (1.0,) and recipe.seeds == (0,) and hash(recipe)  # a value: tuples, hashable

"""The convergence rule (`transferlab.training.rules.CONVERGENCE_RULE`) and the robust learning-rate choice
(`transferlab.training.rules.LR_CHOICE_RULE`), on hand-made curves and search tables: each test names the
run it stands for and fails if the rule takes a schedule's doing for a plateau, or noise for a better rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from transferlab.core.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.loop import assess_convergence, fit, tensor_batches, trend
from transferlab.training.protocol import choose_rate
from transferlab.training.recipe import TrainRecipe
from transferlab.training.rules import CONVERGENCE_RULE, LR_CHOICE_RULE

RULE = {"window": 5, "fit_accuracy": 0.9, "plateau_min_lr_ratio": 0.1}


def _history(val_acc, *, lr=None, train_acc=0.7, val_loss=None, train_loss=None) -> list[dict]:
    """Per-epoch rows as `fit` records them; `lr` defaults to a constant 3e-3, the losses to a flat 1.0."""
    n = len(val_acc)
    lr = [3e-3] * n if lr is None else lr
    val_loss = [1.0] * n if val_loss is None else val_loss
    train_loss = [1.0] * n if train_loss is None else train_loss
    train_acc = [train_acc] * n if np.isscalar(train_acc) else train_acc
    return [
        {
            "epoch": i + 1,
            "lr": lr[i],
            "train_loss": train_loss[i],
            "train_accuracy": train_acc[i],
            "val_loss": val_loss[i],
            "val_accuracy": val_acc[i],
        }
        for i in range(n)
    ]


def test_trend_is_the_textbook_ols_slope_and_standard_error():
    y = [0.50, 0.53, 0.52, 0.56, 0.58, 0.57]
    slope, se = trend(y)
    x = np.arange(len(y))
    b, a = np.polyfit(x, y, 1)
    resid = np.asarray(y) - (a + b * x)
    expected_se = math.sqrt(resid @ resid / (len(y) - 2) / ((x - x.mean()) ** 2).sum())
    assert slope == pytest.approx(b) and se == pytest.approx(expected_se)
    assert trend([0.6, 0.6, 0.6]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 3"):
        trend([0.1, 0.2])


def test_a_rising_validation_curve_is_not_converged():
    """Scratch's seed 1 under the old schedule: still rising when the patience rule stopped it."""
    val = [0.55 + 0.01 * i + (0.004 if i % 2 else -0.004) for i in range(12)]
    out = assess_convergence(_history(val, train_acc=0.95), **RULE)
    assert not out["converged"] and out["verdict"] == "under-trained"
    assert out["reason"].startswith("still improving") and out["val_accuracy_slope"] > 0
    # Fitting the training set does not excuse a curve that still rises.
    assert out["fits_training_set"]


def test_a_rate_cut_to_the_floor_while_rising_is_under_trained():
    """Reduce-on-plateau cut the rate to 1% of its start, yet the validation accuracy still climbs."""
    lr = [3e-3] * 4 + [9e-4] * 3 + [2.7e-4] * 3 + [3e-5] * 5
    val = [0.40 + 0.012 * i for i in range(15)]
    out = assess_convergence(_history(val, lr=lr), **RULE)
    assert not out["converged"] and "still improving" in out["reason"]
    assert out["lr_ratio_at_stop"] == pytest.approx(0.01)


def test_a_plateau_made_by_the_schedule_is_under_trained():
    """Flat only because the rate is ~0 (cut to the floor, or annealed by a cosine), the model under-fit
    (train accuracy 0.7) and not over-fitting: a plateau of the schedule's making, not the model's."""
    rng = np.random.default_rng(0)
    val = list(0.62 + rng.normal(0, 0.005, 10))
    for lr in ([3e-3] * 5 + [3e-5] * 5, [3e-3 * 0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(10)]):
        out = assess_convergence(_history(val, lr=lr, train_acc=0.7), **RULE)
        assert not out["converged"] and out["verdict"] == "under-trained"
        assert out["reason"].startswith("plateau made by the schedule"), out["reason"]
        assert out["lr_ratio_at_stop"] < 0.1 and not out["fits_training_set"] and not out["overfitting_onset"]


def test_the_same_low_rate_plateau_is_converged_when_the_model_fits_or_over_fits():
    """A cosine run ends at a rate near 0 by design: a fitted model, or one whose validation loss turned up
    while its training loss fell, has reached what the rate can give."""
    lr = [3e-3 * 0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(10)]
    val = [0.80, 0.81, 0.80, 0.81, 0.80, 0.81, 0.80, 0.81, 0.80, 0.81]
    fitted = assess_convergence(_history(val, lr=lr, train_acc=0.97), **RULE)
    assert fitted["converged"] and "fits its training set" in fitted["reason"]
    rising_val_loss = [0.60 + 0.03 * i for i in range(10)]
    falling_train_loss = [0.80 - 0.04 * i for i in range(10)]
    over = assess_convergence(
        _history(val, lr=lr, train_acc=0.8, val_loss=rising_val_loss, train_loss=falling_train_loss), **RULE
    )
    assert over["converged"] and over["overfitting_onset"] and "over-fitting onset" in over["reason"]


def test_fit_is_judged_on_the_training_accuracy_given_not_the_augmented_one():
    """An augmented batch's accuracy (the history's, 0.85) understates the fit that `fit` measures on the
    training images at the stop (0.95): the latter decides, and both are recorded."""
    lr = [3e-3] * 5 + [3e-5] * 5
    val = [0.80, 0.81] * 5
    history = _history(val, lr=lr, train_acc=0.85)
    assert not assess_convergence(history, **RULE)["converged"]
    out = assess_convergence(history, train_accuracy=0.95, **RULE)
    assert out["converged"] and out["train_accuracy_at_stop"] == 0.95 and out["train_accuracy_last_epoch"] == 0.85


def test_a_flat_curve_at_a_healthy_rate_is_converged():
    val = [0.70, 0.71, 0.70, 0.71, 0.70, 0.71, 0.70, 0.71]
    out = assess_convergence(_history(val, lr=[3e-3] * 4 + [9e-4] * 4, train_acc=0.75), **RULE)
    assert out["converged"] and out["verdict"] == "converged"
    assert out["lr_ratio_at_stop"] == pytest.approx(0.3) and "at a rate 0.3 of its peak" in out["reason"]
    # The same curve with its validation loss still falling clearly is still learning.
    falling = [1.0 - 0.05 * i for i in range(8)]
    assert not assess_convergence(_history(val, val_loss=falling, train_acc=0.75), **RULE)["converged"]


def test_a_noisy_but_flat_curve_is_converged():
    """Validation accuracy of n = 300 examples around a constant 0.7 (binomial noise, SD 2.6 points): the
    trend test must not read the noise as a rise. Over 200 such curves it may do so about 5% of the time (its
    level); a rule that took noise for progress would do it about half of the time."""
    rng = np.random.default_rng(1)
    healthy = {"lr": [3e-3] * 5, "train_acc": 0.75}
    first = assess_convergence(_history(list(rng.binomial(300, 0.7, 5) / 300), **healthy), **RULE)
    assert first["converged"], first["reason"]
    verdicts = [
        assess_convergence(
            _history(list(rng.binomial(300, 0.7, 5) / 300), val_loss=list(0.8 + rng.normal(0, 0.03, 5)), **healthy),
            **RULE,
        )["converged"]
        for _ in range(200)
    ]
    assert np.mean(verdicts) >= 0.85


def test_too_few_epochs_for_the_window_is_under_trained():
    out = assess_convergence(_history([0.5, 0.6], train_acc=1.0), **RULE)
    assert not out["converged"] and "fewer than the trend window" in out["reason"]
    with pytest.raises(ValueError, match="window must be >= 3"):
        assess_convergence(_history([0.5] * 4), window=2, fit_accuracy=0.9, plateau_min_lr_ratio=0.1)


def test_the_rule_is_stated_once_for_the_report():
    for words in ("OLS slope", "b - t*SE <= 0", "train.fit_accuracy", "train.plateau_min_lr_ratio", "under-trained"):
        assert words in CONVERGENCE_RULE
    for words in ("binomial standard error", "nearest the configured rate", "log distance"):
        assert words in LR_CHOICE_RULE


def _fit(schedule: str, epochs: int, lr: float = 0.05):
    """A linear head on separable blobs (3 classes), trained by `fit` with `schedule`."""
    centres = np.random.default_rng(123).normal(0, 1, (3, 8)) * 3.0
    rng = np.random.default_rng(0)
    x = np.concatenate([centres[c] + rng.normal(0, 1, (30, 8)) for c in range(3)]).astype(np.float32)
    y = np.repeat(np.arange(3), 30)
    seed_everything(0)
    recipe = TrainRecipe(epochs=epochs, batch_size=16, patience=4, weight_decay=0.0, schedule=schedule, warmup_epochs=2)
    return fit(
        nn.Linear(8, 3),
        get_strategy("linear_probe"),
        strategy_config("linear_probe", {"lr": lr}),
        tensor_batches(x),
        y,
        tensor_batches(x),
        y,
        recipe,
        generator=torch.Generator().manual_seed(0),
    )


def test_a_cosine_run_warms_up_spends_its_budget_and_anneals_to_the_floor():
    res = _fit("cosine", epochs=12)
    lrs = [r["lr"] for r in res.history]
    assert len(res.history) == 12 and res.convergence["stopped_by"] == "budget"  # no early stop
    # Two warm-up epochs of 6 steps (the rate recorded is the last step's: step 11 of 12), then the peak.
    assert lrs[0] < lrs[1] < 0.05 and lrs[1] == pytest.approx(0.05 * (0.1 + 0.9 * 11 / 12), rel=1e-3)
    assert lrs[2] == pytest.approx(0.05, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # then it only decays ...
    assert lrs[-1] < 0.05 * 0.05 and lrs[-1] >= 0.05 * 0.01  # ... to just above the floor (min_lr_ratio)
    # The easy problem is fitted: a flat curve at a rate near zero is then converged.
    assert res.converged and res.convergence["fits_training_set"]
    assert res.convergence["lr_ratio_at_stop"] < 0.1
    # "Fits" is judged on the training images without augmentation, with the weights at the stop: here the
    # validation split is the training set, so it is the last epoch's validation accuracy, exactly.
    assert res.convergence["train_accuracy_at_stop"] == round(res.history[-1]["val_accuracy"], 6)


def test_lr_choice_takes_the_rate_nearest_the_configured_one_among_those_within_noise():
    """n = 300 validation examples at a best of 0.60: one binomial SE is 2.8 points. x3 is best by 2 points
    (noise), so the configured rate (x1) wins; the old rule (highest accuracy) took x3."""
    rows = [
        {"lr_multiplier": 0.3, "lr": 0.0009, "val_accuracy": 0.50, "val_loss": 1.5, "val_size": 300},
        {"lr_multiplier": 1.0, "lr": 0.003, "val_accuracy": 0.58, "val_loss": 1.2, "val_size": 300},
        {"lr_multiplier": 3.0, "lr": 0.009, "val_accuracy": 0.60, "val_loss": 1.1, "val_size": 300},
    ]
    best, within, record = choose_rate(rows)
    assert best is rows[1] and within == rows[1:]
    assert record["candidates"] == [0.003, 0.009] and record["chosen_lr"] == 0.003
    assert record["noise_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 300), abs=1e-6)
    assert record["rule"] == LR_CHOICE_RULE
    # Without the configured rate among the candidates: the nearest in log distance (x3: |ln 3| < |ln 0.3|).
    rows[1]["val_accuracy"] = 0.40
    rows[0]["val_accuracy"] = 0.59
    assert choose_rate(rows)[0] is rows[2]


def test_lr_choice_takes_the_best_rate_when_it_is_clearly_better():
    rows = [
        {"lr_multiplier": 0.3, "lr": 0.0009, "val_accuracy": 0.40, "val_loss": 1.6, "val_size": 300},
        {"lr_multiplier": 1.0, "lr": 0.003, "val_accuracy": 0.50, "val_loss": 1.4, "val_size": 300},
        {"lr_multiplier": 3.0, "lr": 0.009, "val_accuracy": 0.60, "val_loss": 1.1, "val_size": 300},
        {"lr_multiplier": 10.0, "lr": 0.03, "val_accuracy": None, "val_loss": None, "diverged": "nan"},
    ]
    best, within, record = choose_rate(rows)
    assert best is rows[2] and within == [rows[2]] and record["candidates"] == [0.009]
    # A failed short run does not get elected by a lucky accuracy, however near the configured rate.
    rows[1].update(val_accuracy=0.59, failed="loss stuck at ln C")
    assert choose_rate(rows)[0] is rows[2]

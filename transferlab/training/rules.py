"""The protocol's rules in the words the report quotes, torch-free so that compare and report read them cheaply:
the convergence rule (`loop.assess_convergence` implements it), the learning-rate choice (`protocol.choose_rate`),
training compute (`models.costs.train_flops_per_image`) and the one definition of the best epoch (`best_row`):
the checkpoint `fit` keeps, the point of equal compute and the over-fitting check's epoch are the same epoch."""

from __future__ import annotations

# The convergence rule, in the words the report quotes; `assess_convergence` implements it.
CONVERGENCE_RULE = (
    "A run is converged when its validation accuracy has stopped rising and the schedule did not make that "
    "plateau. Over its last W epochs (train.convergence_window, default train.patience, at least 3), the OLS "
    "slope b of validation accuracy on the epoch, with its standard error SE, must satisfy b - t*SE <= 0 "
    "(t: the one-sided 95% Student t quantile with W - 2 degrees of freedom: no significant rise). And one "
    "of: (a) the model fits its training set: its accuracy on the training images (no augmentation) at the "
    "stop >= train.fit_accuracy; "
    "(b) over-fitting has begun: over the same window the validation loss rises (b - t*SE > 0) while the "
    "training loss falls (b + t*SE < 0); (c) the validation loss is not falling either (b + t*SE >= 0) and "
    "the learning rate at the stop is at least train.plateau_min_lr_ratio of the run's peak rate. Any other "
    "run is under-trained: still improving, or flat only because its rate was cut or annealed towards zero "
    "while it neither fits nor over-fits."
)

# How the learning rate is chosen, in the words the report quotes; `choose_rate` implements it.
LR_CHOICE_RULE = (
    "Each rate of the grid (train.lr_grid x the strategy's lr) trains for the search budget on the first seed. "
    "Among the rates whose short run neither diverged nor failed, the best validation accuracy a* sets the "
    "noise: one binomial standard error, sqrt(a* (1 - a*) / n), n the validation examples. Every rate within it "
    "(validation accuracy >= a* - SE) is as good as the best; of those, the one nearest the configured rate in "
    "log distance |ln(multiplier)| wins (then the higher accuracy, the lower validation loss). A winner on an "
    "edge of the grid extends the grid by its own step."
)

# Training compute, in the words the report quotes; `train_flops_per_image` implements it.
TRAINING_COMPUTE_RULE = (
    "Training compute counts the same passes for every strategy: per training image seen, one forward pass "
    "of the trained network, plus a backward pass that costs 1x a layer's forward FLOPs for the gradient of "
    "its input (only above the lowest trainable layer: nothing flows below it) and 1x for the gradient of its "
    "weights (trainable layers only). Frozen parts are charged forward only; a head trained on the cached "
    "features of a frozen backbone pays the backbone's forward pass once per cached image. FLOPs are torch's "
    "count (a multiply-add = 2; convolutions and matrix products). The learning-rate search is counted "
    "separately and reported beside it. A strategy whose trainable set grows while it trains "
    "(gradual_unfreeze) is charged at its starting set: a lower bound."
)

# The best epoch, in the words the report quotes: the one definition of "best epoch" (the checkpoint kept,
# the x of equal compute, the over-fitting check's epoch); `best_epoch_key` and `best_row` implement it.
BEST_EPOCH_RULE = (
    "The best epoch is the checkpoint kept: the epoch with the highest validation accuracy, an exact tie "
    "broken by the lower validation loss, then by the earlier epoch."
)


def best_epoch_key(val_accuracy: float, val_loss: float) -> tuple[float, float]:
    """The order of `BEST_EPOCH_RULE`: a later epoch replaces the best only when its key is strictly larger."""
    return (float(val_accuracy), -float(val_loss))


def best_row(history: list[dict]) -> dict:
    """The best epoch's row of a history (rows with `val_accuracy` and `val_loss`, in epoch order), by
    `BEST_EPOCH_RULE`: the same epoch whose weights `fit` kept."""
    if not history:
        raise ValueError("history is empty: no best epoch")
    best = history[0]
    for row in history[1:]:
        if best_epoch_key(row["val_accuracy"], row["val_loss"]) > best_epoch_key(
            best["val_accuracy"], best["val_loss"]
        ):
            best = row
    return best

"""The one definition of the best epoch, torch-free so that compare and diagnose read it cheaply: the
checkpoint `fit` keeps, the point of equal compute, and the over-fitting check's epoch are the same epoch."""

from __future__ import annotations

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

"""TODO docstring: tuning.objective."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.tuning.space import Report

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


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
            from transferlab.models.inference import to_input

            return to_input(self._val_x[idx], self._mean, self._std)
        return torch.from_numpy(np.ascontiguousarray(self._val_x[idx], dtype=np.float32))

    def val_accuracy(self, model: torch.nn.Module) -> float:
        """Accuracy of `model` (put in eval mode) on the validation split, as `fit` computes it."""
        from transferlab.models.inference import predict_logits

        logits = predict_logits(model, self._inputs, len(self._val_y), self._batch_size)
        return float((logits.argmax(1) == self._val_y).float().mean())

    def on_epoch_start(self, model: torch.nn.Module, epoch: int, cfg: Any, optimizer: Any) -> None:
        if epoch >= 2:
            acc = round(self.val_accuracy(model), 6)  # rounded like fit's history rows
            self.reported.append((epoch - 1, acc))
            self._report(epoch - 1, acc)
        self._strategy.on_epoch_start(model, epoch, cfg, optimizer)

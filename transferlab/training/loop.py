"""The training loop every strategy shares, so that every number means the same thing.

* `fit`: one run of a `TrainRecipe` (`transferlab.training.recipe`): seeded batches, light augmentation,
  a one-epoch linear warm-up, then reduce-on-plateau of the learning rate on the validation loss (a schedule
  defined over the epochs actually run), early stopping once neither the validation loss nor the validation
  accuracy has improved for `patience` epochs, the best epoch's weights kept (by validation accuracy, ties
  by validation loss). Whether a plateau was reached before the epoch cap is recorded with its evidence
  (`TrainResult.convergence`); a model that hit the cap is "under-trained" and no verdict is drawn from it.
* `training_failure`: accuracy near chance, a loss that never fell below ln(C), or a divergence is a
  finding ("training failed"), with the measured loss curve, gradient norm and learning rate.
* The learning rate chosen on validation and the runs per seed are `transferlab.training.protocol`'s.

Devices (`recipe.device`, default the CPU): batches are built on the CPU (the seeded generator that
shuffles and augments stays there, so a CPU and a GPU run draw the same batches) and moved with
`.to(device, non_blocking=True)`; the model and the labels live on the device; on CUDA the forward pass
runs under autocast (`transferlab.core.device`). `train_strategy` hands its model back on the CPU, ready to
save. On the CPU every step is exactly the plain float32 loop.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transferlab.core import distributed
from transferlab.core.device import as_device, autocast_context, make_grad_scaler
from transferlab.models.inference import predict_logits, to_input
from transferlab.models.sources import SourceModel
from transferlab.strategies import Strategy, StrategyConfig

if TYPE_CHECKING:
    from transferlab.training.recipe import TrainRecipe

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the message names the strategy, the step and the fix."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    best_val_loss: float = float("inf")
    stopped_early: bool = False
    train_seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    images_seen: int = 0
    # {"converged", "stopped_by": "plateau" | "cap", "epoch_cap", "epochs_without_improvement", ...}
    convergence: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return bool(self.convergence.get("converged", False))


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random shift (pad by 1/8 of the side, reflect, crop back) and, with 'crop_flip', horizontal flips."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if mode == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def _on_device(
    inputs: Callable[[np.ndarray, bool], torch.Tensor], device: torch.device
) -> Callable[[np.ndarray, bool], torch.Tensor]:
    """`inputs` with each batch moved to `device` (built on the CPU by the seeded generator, then moved)."""
    if device.type == "cpu":
        return inputs
    return lambda idx, train: inputs(idx, train).to(device, non_blocking=True)


def fit(
    model: nn.Module,
    strategy: Strategy,
    cfg: StrategyConfig,
    train_inputs: Callable[[np.ndarray, bool], torch.Tensor],
    train_labels: np.ndarray,
    val_inputs: Callable[[np.ndarray, bool], torch.Tensor],
    val_labels: np.ndarray,
    recipe: TrainRecipe,
    *,
    generator: torch.Generator,
    label: str = "",
    state: Any = None,
) -> TrainResult:
    """Train `model` to a validation plateau (or the epoch cap); the best epoch's weights are restored.

    Args:
        model: the module whose output is the logits (the whole network, or just the head for
            strategies that train on cached features).
        strategy, cfg: the strategy (its optimizer param groups, epoch hook, BatchNorm policy, loss) and config.
        train_inputs, val_inputs: `fn(indices, train)` -> input batch (augmented when train is True).
        train_labels, val_labels: int labels.
        recipe: what this function reads of the run's `TrainRecipe`: `epochs` (the cap; a run that reaches it
            without a plateau is marked under-trained), `batch_size`, `weight_decay`, `patience` (epochs
            without a validation improvement, loss lower by more than `min_delta`, an absolute amount, or
            accuracy higher, before stopping: absolute, because on a separable problem the loss keeps
            shrinking by a constant fraction long after nothing changes), `lr_patience` / `lr_factor` /
            `min_lr_ratio` (reduce-on-plateau of the rate, never below that fraction of its start),
            `warmup` and `device` (default: the CPU, plain float32; on CUDA the forward pass and the loss
            run under autocast, see `transferlab.core.device`; the generator stays on the CPU).
        generator: seeded generator for shuffling and augmentation.
        label: name for progress bars and errors.
        state: the strategy's per-run state (`Strategy.start_run`), passed to its `loss` and `move_to`.

    Returns:
        TrainResult with the best model (left on the device), the per-epoch history (with the rate and the
        mean gradient norm), the images seen and the convergence evidence.

    Raises:
        DivergenceError: the loss became NaN/inf.
    """
    device = as_device(recipe.device)
    model.to(device)  # before the optimizer: it holds the parameters where they live
    strategy.move_to(model, device, state)
    train_inputs, val_inputs = _on_device(train_inputs, device), _on_device(val_inputs, device)
    # Labels stay indexable by the CPU permutation; each batch's labels are moved with the batch.
    y_train = torch.as_tensor(train_labels, dtype=torch.long)
    y_val = torch.as_tensor(val_labels, dtype=torch.long)
    steps = _Steps(model, strategy, cfg, recipe, device, state, label, train_inputs, y_train, generator)
    result = TrainResult(model=model)
    best = _BestEpoch(recipe.min_delta)
    start = time.perf_counter()
    strategy.before_training(model, cfg, train_inputs, steps.n)
    steps.track_gradients()
    # Several processes (torchrun, `train.processes`) show no progress bar: each would draw its own.
    quiet = None if steps.dist_ctx is None else True
    bar = tqdm(range(1, recipe.epochs + 1), desc=f"train {label}", disable=quiet, leave=False)
    for epoch in bar:
        train = steps.train_epoch(epoch)
        result.images_seen += steps.n
        val_loss, val_acc = _validate(model, val_inputs, y_val, device)
        row = {
            "epoch": epoch,
            "lr": train["lr"],
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": round(val_loss, 6),
            "val_accuracy": round(val_acc, 6),
            "grad_norm": train["grad_norm"],
        }
        result.history.append(row)
        bar.set_postfix(val_acc=f"{val_acc:.3f}")
        log.info("%s epoch %d: %s", label, epoch, row)
        best.update(epoch, val_loss, val_acc, model)
        if best.since_improve >= recipe.patience:
            result.stopped_early = epoch < recipe.epochs
            break
        steps.end_epoch(val_loss)
    result.train_seconds = time.perf_counter() - start
    model.load_state_dict(best.state)
    model.eval()
    result.best_epoch = best.epoch
    result.best_val_accuracy, result.best_val_loss = best.key
    result.convergence = _convergence(result.history, best, recipe, steps.lr_reductions)
    return result


class _Steps:
    """The optimisation of one `fit` call: the optimizer, the rate schedule (one-epoch warm-up, then
    reduce-on-plateau of the validation loss) and the training steps of an epoch, on one process or as one
    of several (DistributedDataParallel)."""

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        cfg: StrategyConfig,
        recipe: TrainRecipe,
        device: torch.device,
        state: Any,
        label: str,
        train_inputs: Callable[[np.ndarray, bool], torch.Tensor],
        y_train: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        self.model, self.strategy, self.cfg, self.recipe = model, strategy, cfg, recipe
        self.device, self.state, self.label = device, state, label
        self.train_inputs, self.y_train, self.generator = train_inputs, y_train, generator
        self.n = len(y_train)
        self.steps_per_epoch = math.ceil(self.n / recipe.batch_size)
        self.scaler = make_grad_scaler(device)  # a pass-through except for float16 autocast on CUDA
        self.optimizer = torch.optim.AdamW(strategy.param_groups(model, cfg), weight_decay=recipe.weight_decay)
        lr_patience = max(1, recipe.patience // 2) if recipe.lr_patience is None else recipe.lr_patience
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # A floor under the schedule: a noisy validation loss would otherwise cut the rate towards zero and
        # end training on a "plateau" the schedule made, with the model still under-fit.
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="min",
            factor=recipe.lr_factor,
            patience=lr_patience,
            threshold=recipe.min_delta,
            threshold_mode="abs",
            min_lr=[b * recipe.min_lr_ratio for b in self.base_lrs],
        )
        self.lr_reductions = 0
        self.trainable: list[nn.Parameter] = []
        # Several processes (torchrun, `train.processes`): each trains on its part of every batch through DDP.
        self.dist_ctx = distributed.current()
        self.net, self._wrapped_for = model, None

    def track_gradients(self) -> None:
        """The parameters whose gradients the history's `grad_norm` sums: those trainable once the strategy's
        `before_training` hook has run."""
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set in a seeded order: {lr (the last group's, after the warm-up), loss,
        accuracy, grad_norm (the root mean square over steps)}, rounded as the history records them."""
        self.strategy.on_epoch_start(self.model, epoch, self.cfg, self.optimizer)
        self.strategy.set_train_mode(self.model)
        self._wrap_for_processes()
        warmup = self.recipe.warmup and epoch == 1
        order = torch.randperm(self.n, generator=self.generator).numpy()
        loss_sum, correct, grad_sq_sum = 0.0, 0, 0.0
        for step in range(self.steps_per_epoch):
            if warmup:
                self._set_rates(0.1 + 0.9 * step / self.steps_per_epoch)
            idx = order[step * self.recipe.batch_size : (step + 1) * self.recipe.batch_size]
            done = self._step(idx, epoch, step)
            if done is None:  # a last batch too small to split over the processes: every process skips it
                continue
            value, n_correct, grad_sq = done
            loss_sum += value * len(idx)
            correct += n_correct
            grad_sq_sum += grad_sq
        if warmup:
            self._set_rates(1.0)
        if self.dist_ctx is not None:
            correct = int(distributed.all_sum([correct], self.device)[0])
            distributed.sync_buffers(self.model)  # rank 0's BatchNorm statistics everywhere: one validation result
        return {
            "lr": float(f"{self.optimizer.param_groups[-1]['lr']:.6g}"),
            "loss": round(loss_sum / self.n, 6),
            "accuracy": round(correct / self.n, 6),
            "grad_norm": round(math.sqrt(grad_sq_sum / self.steps_per_epoch), 6),
        }

    def end_epoch(self, val_loss: float) -> None:
        """Reduce-on-plateau of the rate on the epoch's validation loss (counted when it cut a rate)."""
        before = [g["lr"] for g in self.optimizer.param_groups]
        self.plateau.step(val_loss)
        after = self.optimizer.param_groups
        self.lr_reductions += int(any(g["lr"] < b for g, b in zip(after, before, strict=True)))

    def _set_rates(self, fraction: float) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * fraction

    def _wrap_for_processes(self) -> None:
        """Under torchrun, (re)wrap the model in DDP when what trains changed (first epoch, gradual unfreezing)."""
        if self.dist_ctx is None:
            return
        now = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if now != self._wrapped_for:
            self.net = self.model  # the old wrapper's gradient hooks go with it
            self.net, self._wrapped_for = distributed.wrap(self.model, self.device), now

    def _step(self, idx: np.ndarray, epoch: int, step: int) -> tuple[float, int, float] | None:
        """One optimisation step on the batch `idx`: (the batch's loss, correct predictions, squared gradient
        norm), or None when this process skips a batch too small to split."""
        inputs = self.train_inputs(idx, True)
        targets = self.y_train[idx].to(self.device, non_blocking=True)
        ctx = self.dist_ctx
        if ctx is not None:
            if len(idx) < ctx.world_size:
                return None
            mine = distributed.part(len(idx), ctx)
            inputs, targets = inputs[mine], targets[mine]
        with autocast_context(self.device):
            logits = self.net(inputs)
            loss = self.strategy.loss(logits, targets, inputs, self.cfg, self.state)
            extra = self.strategy.penalty(self.model, self.cfg)
            if ctx is not None:
                # DDP averages gradients over processes: weighting each part's mean loss by its share of the
                # batch makes that average the gradient of the whole batch's mean loss.
                part_loss = loss
                loss = loss * (len(targets) * ctx.world_size / len(idx))
            if extra is not None:
                loss = loss + extra
        if ctx is None:
            value = loss
        else:  # the whole batch's loss, the same number in every process (all stop together)
            total = distributed.all_sum([part_loss.item() * len(targets)], self.device)[0] / len(idx)
            value = torch.tensor(total + (extra.item() if extra is not None else 0.0))
        if not torch.isfinite(value):
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            raise DivergenceError(
                f"{self.label}: loss is {value.item()} at epoch {epoch}, step {step + 1} (learning rates {lrs}). "
                f"Lower strategies.{self.label}.lr (now {self.cfg.lr}) and run again; other strategies' results "
                "are kept."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # true gradients for the norm below (no-op unless float16 on CUDA)
        grad_sq = 0.0
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads:
            sq = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum())
            # float16 overflow: the scaler skips this step and lowers its scale; keep the norm finite.
            if math.isfinite(sq) or not self.scaler.is_enabled():
                grad_sq = sq
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value.item(), int((logits.argmax(1) == targets).sum()), grad_sq


def _validate(
    model: nn.Module, val_inputs: Callable[[np.ndarray, bool], torch.Tensor], y_val: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """(validation loss, validation accuracy) of `model` in eval mode, without augmentation."""
    val_logits = predict_logits(model, lambda i: val_inputs(i, False), len(y_val), device=device)
    return float(F.cross_entropy(val_logits, y_val)), float((val_logits.argmax(1) == y_val).float().mean())


@dataclass
class _BestEpoch:
    """Early stopping on validation: the best epoch (by accuracy, ties by loss) and its weights, and the
    epochs since the last improvement (loss lower by more than `min_delta`, or accuracy higher)."""

    min_delta: float
    key: tuple[float, float] = (-1.0, float("inf"))  # (val accuracy, val loss) of the best epoch
    epoch: int = 0
    state: dict | None = None
    best_loss: float = float("inf")
    since_improve: int = 0

    def update(self, epoch: int, val_loss: float, val_acc: float, model: nn.Module) -> None:
        improved = False
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, improved = val_loss, True
        if (val_acc, -val_loss) > (self.key[0], -self.key[1]):
            improved = improved or val_acc > self.key[0]
            self.key, self.epoch = (val_acc, val_loss), epoch
            self.state = copy.deepcopy(model.state_dict())
        self.since_improve = 0 if improved else self.since_improve + 1


def _convergence(history: list[dict], best: _BestEpoch, recipe: TrainRecipe, lr_reductions: int) -> dict:
    """Whether the run reached a plateau before the cap, with the evidence (`TrainResult.convergence`)."""
    converged = best.since_improve >= recipe.patience
    return {
        "converged": converged,
        "stopped_by": "plateau" if converged else "cap",
        "epoch_cap": recipe.epochs,
        "epochs_run": len(history),
        "best_epoch": best.epoch,
        "patience": recipe.patience,
        "epochs_without_improvement": best.since_improve,
        "lr_reductions": lr_reductions,
        "final_lr": history[-1]["lr"],
        # The evidence: how much the last `patience` epochs gained over the best before them.
        "val_accuracy_gain_last_epochs": _recent_gain(history, recipe.patience),
    }


def _recent_gain(history: list[dict], window: int) -> float | None:
    """Best val accuracy of the last `window` epochs minus the best before them (<= 0 on a plateau)."""
    if len(history) <= window:
        return None
    before = max(r["val_accuracy"] for r in history[:-window])
    recent = max(r["val_accuracy"] for r in history[-window:])
    return round(recent - before, 6)


def training_failure(history: list[dict], num_classes: int, best_val_accuracy: float) -> str | None:
    """Why a finished training run counts as failed, or None.

    Failed: the best validation accuracy stays within 10% of the way from chance (1/C) to perfect, or the
    training loss never fell below 90% of ln(C) (the loss of a uniform guess).
    """
    chance = 1.0 / num_classes
    near_chance = best_val_accuracy <= chance + 0.1 * (1 - chance)
    min_loss = min(r["train_loss"] for r in history)
    flat = min_loss >= 0.9 * math.log(num_classes)
    if not (near_chance or flat):
        return None
    parts = []
    if near_chance:
        parts.append(f"best val accuracy {best_val_accuracy:.3f} is near chance ({chance:.3f})")
    if flat:
        parts.append(f"training loss never fell below 90% of ln(C) = {math.log(num_classes):.3f} (min {min_loss:.3f})")
    first, last = history[0], history[-1]
    parts.append(
        f"loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, grad norm {first.get('grad_norm')} -> "
        f"{last.get('grad_norm')}, lr {first.get('lr')} -> {last.get('lr')}"
    )
    return "; ".join(parts)


def image_batches(
    images: np.ndarray, source: SourceModel | dict, augment: str, gen: torch.Generator, channels_last: bool = False
) -> Callable[[np.ndarray, bool], torch.Tensor]:
    """`fn(indices, train)` -> normalised (and, when training, augmented) image batch, in channels-last
    memory order when asked (the layout the CPU's convolution kernels run fastest on)."""
    mean, std = (source["mean"], source["std"]) if isinstance(source, dict) else (source.mean, source.std)

    def batch(idx: np.ndarray, train: bool) -> torch.Tensor:
        x = to_input(images[idx], mean, std)
        if not x.is_floating_point():  # token ids of a text dataset: no image augmentation, no memory layout
            return x
        x = augment_batch(x, augment, gen) if train else x
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return batch


def tensor_batches(array: np.ndarray) -> Callable[[np.ndarray, bool], torch.Tensor]:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return lambda idx, train: t[idx]

"""The training loop every strategy shares, so that every number means the same thing.

* `fit`: one run of a `TrainRecipe` (`transferlab.training.recipe`): seeded batches, light augmentation,
  a linear warm-up (`warmup_epochs`), then the recipe's `schedule`: `plateau` (reduce-on-plateau of the
  learning rate on the validation loss, a schedule defined over the epochs actually run, and early stopping
  once neither the validation loss nor the validation accuracy has improved for `patience` epochs) or
  `cosine` (cosine decay over a fixed budget of `epochs`, no early stopping). The best epoch's weights are
  kept (by validation accuracy, ties by validation loss).
* `assess_convergence`: whether the run converged or is under-trained, by a trend test on its last epochs
  that the schedule alone cannot satisfy (`CONVERGENCE_RULE`), with the evidence (`TrainResult.convergence`);
  a verdict against scratch is drawn only from converged runs.
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
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from transferlab.core import distributed
from transferlab.core.device import as_device, autocast_context, make_grad_scaler
from transferlab.models.inference import predict_logits, to_input
from transferlab.models.sources import SourceModel
from transferlab.strategies import Strategy, StrategyConfig
from transferlab.training.rules import best_epoch_key

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
    # Forward + backward FLOPs of one training example (models.costs.TRAINING_COMPUTE_RULE), set by train_strategy.
    train_flops: dict = field(default_factory=dict)
    images_seen: int = 0
    val_size: int = 0  # validation examples: the n of the binomial noise of `best_val_accuracy`
    # `assess_convergence`'s evidence and verdict, with {"stopped_by": "plateau" | "cap" | "budget", ...}
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
    """Train `model` by the recipe's schedule; the best epoch's weights are restored.

    Args:
        model: the module whose output is the logits (the whole network, or just the head for
            strategies that train on cached features).
        strategy, cfg: the strategy (its optimizer param groups, epoch hook, BatchNorm policy, training forward
            pass, loss, extra history columns) and config.
        train_inputs, val_inputs: `fn(indices, train)` -> input batch (augmented when train is True).
        train_labels, val_labels: int labels.
        recipe: what this function reads of the run's `TrainRecipe`: `schedule`, `epochs` (the cap of a
            `plateau` run, the budget of a `cosine` one), `batch_size`, `weight_decay`, `patience` (`plateau`:
            epochs without a validation improvement, loss lower by more than `min_delta`, an absolute amount,
            or accuracy higher, before stopping: absolute, because on a separable problem the loss keeps
            shrinking by a constant fraction long after nothing changes), `lr_patience` / `lr_factor`
            (`plateau`: reduce-on-plateau of the rate), `min_lr_ratio` (the rate never goes below that
            fraction of its start: the floor of both schedules), `warmup` / `warmup_epochs`, the convergence
            rule's `convergence_window`, `fit_accuracy` and `plateau_min_lr_ratio` (`assess_convergence`),
            and `device` (default: the CPU, plain float32; on CUDA the forward pass and the loss run under
            autocast, see `transferlab.core.device`; the generator stays on the CPU).
        generator: seeded generator for shuffling and augmentation.
        label: name for progress bars and errors.
        state: the strategy's per-run state (`Strategy.start_run`), passed to its `train_forward`, `loss`,
            `epoch_metrics` and `move_to`.

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
            **strategy.epoch_metrics(state),  # a strategy's own columns (`history_keys`; DANN: the domain classifier)
        }
        result.history.append(row)
        bar.set_postfix(val_acc=f"{val_acc:.3f}")
        log.info("%s epoch %d: %s", label, epoch, row)
        best.update(epoch, val_loss, val_acc, model)
        # A cosine run spends its whole budget (its rate is still high early on; the best epoch is kept).
        if recipe.schedule == "plateau" and best.since_improve >= recipe.patience:
            result.stopped_early = epoch < recipe.epochs
            break
        steps.end_epoch(epoch, val_loss)
    result.train_seconds = time.perf_counter() - start
    # Whether the model fits its training set, judged on the training images as they are (eval mode, no
    # augmentation) with the weights at the stop: an augmented batch's accuracy, recorded while the weights
    # still move, understates it.
    _, fit_acc = _validate(model, train_inputs, y_train, device)
    model.load_state_dict(best.state)
    model.eval()
    result.best_epoch = best.epoch
    result.best_val_accuracy, result.best_val_loss = best.key
    result.val_size = len(y_val)
    result.convergence = _convergence(result.history, best, recipe, steps.lr_reductions, fit_acc)
    return result


class _Steps:
    """The optimisation of one `fit` call: the optimizer, the rate schedule (a linear warm-up, then
    reduce-on-plateau of the validation loss or a cosine decay over the budget) and the training steps of an
    epoch, on one process or as one of several (DistributedDataParallel)."""

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
        self.total_steps = recipe.epochs * self.steps_per_epoch
        self.warmup_steps = recipe.warmup_epochs * self.steps_per_epoch if recipe.warmup else 0
        if recipe.schedule == "cosine":  # at least half the budget decays (a short run of the lr search)
            self.warmup_steps = min(self.warmup_steps, self.total_steps // 2)
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
        first = (epoch - 1) * self.steps_per_epoch
        warmup = first < self.warmup_steps
        order = torch.randperm(self.n, generator=self.generator).numpy()
        loss_sum, correct, grad_sq_sum = 0.0, 0, 0.0
        for step in range(self.steps_per_epoch):
            fraction = self.rate_fraction(first + step)
            if fraction is not None:
                self._set_rates(fraction)
            idx = order[step * self.recipe.batch_size : (step + 1) * self.recipe.batch_size]
            done = self._step(idx, epoch, step)
            if done is None:  # a last batch too small to split over the processes: every process skips it
                continue
            value, n_correct, grad_sq = done
            loss_sum += value * len(idx)
            correct += n_correct
            grad_sq_sum += grad_sq
        if warmup and first + self.steps_per_epoch >= self.warmup_steps and self.recipe.schedule == "plateau":
            self._set_rates(1.0)  # the warm-up is over: reduce-on-plateau takes the full rate from here
        if self.dist_ctx is not None:
            correct = int(distributed.all_sum([correct], self.device)[0])
            distributed.sync_buffers(self.model)  # rank 0's BatchNorm statistics everywhere: one validation result
        return {
            "lr": float(f"{self.optimizer.param_groups[-1]['lr']:.6g}"),
            "loss": round(loss_sum / self.n, 6),
            "accuracy": round(correct / self.n, 6),
            "grad_norm": round(math.sqrt(grad_sq_sum / self.steps_per_epoch), 6),
        }

    def rate_fraction(self, step: int) -> float | None:
        """The fraction of each group's base rate at global step `step` (0-based), or None where the schedule
        leaves the rate as it is (`plateau` after the warm-up: reduce-on-plateau owns it then).

        Warm-up: linear from 10% to 100% over `warmup_steps`. `cosine`: then
        floor + (1 - floor) * (1 + cos(pi * p)) / 2, p the fraction of the post-warm-up steps done and floor
        `min_lr_ratio`, so the last step runs just above the floor.
        """
        if step < self.warmup_steps:
            return 0.1 + 0.9 * step / self.warmup_steps
        if self.recipe.schedule != "cosine":
            return None
        p = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        floor = self.recipe.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def end_epoch(self, epoch: int, val_loss: float) -> None:
        """`plateau`, once the warm-up is over: reduce-on-plateau of the rate on the epoch's validation loss
        (counted when it cut a rate). `cosine`: nothing (the rate follows the steps)."""
        if self.recipe.schedule != "plateau" or epoch * self.steps_per_epoch < self.warmup_steps:
            return
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
        progress = ((epoch - 1) * self.steps_per_epoch + step) / self.total_steps
        with autocast_context(self.device):
            logits = self.strategy.train_forward(self.net, inputs, self.cfg, self.state, progress)
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
        if best_epoch_key(val_acc, val_loss) > best_epoch_key(*self.key):
            improved = improved or val_acc > self.key[0]
            self.key, self.epoch = (val_acc, val_loss), epoch
            self.state = copy.deepcopy(model.state_dict())
        self.since_improve = 0 if improved else self.since_improve + 1


def _convergence(
    history: list[dict], best: _BestEpoch, recipe: TrainRecipe, lr_reductions: int, train_accuracy: float
) -> dict:
    """The run's convergence record (`TrainResult.convergence`): how it stopped, and `assess_convergence`'s
    verdict and evidence (`train_accuracy`: on the training set at the stop, without augmentation)."""
    if recipe.schedule == "cosine":
        stopped_by = "budget"
    else:
        stopped_by = "plateau" if best.since_improve >= recipe.patience else "cap"
    return {
        "stopped_by": stopped_by,
        "epoch_cap": recipe.epochs,
        "epochs_run": len(history),
        "best_epoch": best.epoch,
        "patience": recipe.patience,
        "epochs_without_improvement": best.since_improve,
        "lr_reductions": lr_reductions,
        "final_lr": history[-1]["lr"],
        # How much the last `patience` epochs gained over the best before them (<= 0 on a plateau).
        "val_accuracy_gain_last_epochs": _recent_gain(history, recipe.patience),
        **assess_convergence(
            history,
            window=recipe.trend_window,
            fit_accuracy=recipe.fit_accuracy,
            plateau_min_lr_ratio=recipe.plateau_min_lr_ratio,
            train_accuracy=train_accuracy,
        ),
    }


# One-sided level of the trend tests of `CONVERGENCE_RULE`.
TREND_CONFIDENCE = 0.95


def trend(values: list[float]) -> tuple[float, float]:
    """(OLS slope per epoch, its standard error) of `values`, one per consecutive epoch (at least 3).

    The standard error is the textbook one, sqrt(residual variance / sum((x - mean x)^2)) with W - 2 degrees of
    freedom; a curve on an exact line (a constant one included) has SE 0.
    """
    y = np.asarray(values, dtype=float)
    if len(y) < 3:
        raise ValueError(f"trend: needs at least 3 values (got {len(y)})")
    x = np.arange(len(y), dtype=float)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean())) / sxx
    resid = y - y.mean() - slope * xc
    return slope, math.sqrt(max(0.0, float(resid @ resid)) / (len(y) - 2) / sxx)


def assess_convergence(
    history: list[dict],
    *,
    window: int,
    fit_accuracy: float,
    plateau_min_lr_ratio: float,
    train_accuracy: float | None = None,
) -> dict[str, Any]:
    """`CONVERGENCE_RULE` applied to a run's per-epoch history: the verdict and its evidence.

    Args:
        history: the rows `fit` records (`lr`, `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy`).
        window: W, the last epochs the trend tests read (at least 3).
        fit_accuracy: the training accuracy at the stop from which the model fits its training set.
        plateau_min_lr_ratio: the least rate at the stop, as a fraction of the run's peak rate, at which a
            flat curve of a model that neither fits nor over-fits still counts as a plateau.
        train_accuracy: the accuracy on the training set at the stop (`fit` measures it without augmentation,
            in eval mode); None: the last epoch's, as the history records it (on augmented batches).

    Returns:
        {"converged": bool, "verdict": "converged" | "under-trained", "reason", "trend_window", "t_critical",
        the slopes and standard errors of val accuracy, val loss and train loss over the window
        ("val_accuracy_slope", "val_accuracy_slope_se", ...), "start_lr" (the peak), "lr_ratio_at_stop",
        "train_accuracy_at_stop" (the one judged), "train_accuracy_last_epoch" (the history's), "fits_training_set",
        "overfitting_onset", "fit_accuracy", "plateau_min_lr_ratio"}; floats rounded to 6 significant digits (the
        record is a DVC metric).

    Raises:
        ValueError: a window below 3.
    """
    if window < 3:
        raise ValueError(f"assess_convergence: window must be >= 3 (got {window})")
    lrs = [r["lr"] for r in history]
    start_lr = max(lrs) if lrs else 0.0
    last_epoch_acc = history[-1]["train_accuracy"] if history else None
    train_acc = last_epoch_acc if train_accuracy is None else round(float(train_accuracy), 6)
    out: dict[str, Any] = {
        "trend_window": window,
        "fit_accuracy": fit_accuracy,
        "plateau_min_lr_ratio": plateau_min_lr_ratio,
        "start_lr": start_lr,
        "lr_ratio_at_stop": _sig(lrs[-1] / start_lr) if start_lr > 0 else None,
        "train_accuracy_at_stop": train_acc,
        "train_accuracy_last_epoch": last_epoch_acc,
    }
    if len(history) < window:
        why = f"only {len(history)} epoch(s) run, fewer than the trend window W = {window}"
        return {"converged": False, "verdict": "under-trained", "reason": why, **out}
    last = history[-window:]
    t = float(stats.t.ppf(TREND_CONFIDENCE, window - 2))
    slopes = {k: trend([r[k] for r in last]) for k in ("val_accuracy", "val_loss", "train_loss")}
    for k, (b, se) in slopes.items():
        out[f"{k}_slope"], out[f"{k}_slope_se"] = _sig(b), _sig(se)
    out["t_critical"] = _sig(t)
    (acc_b, acc_se), (loss_b, loss_se), (tr_b, tr_se) = slopes.values()
    acc_rising = acc_b - t * acc_se > 0
    loss_falling = loss_b + t * loss_se < 0
    fits = train_acc >= fit_accuracy
    onset = loss_b - t * loss_se > 0 and tr_b + t * tr_se < 0
    ratio = lrs[-1] / start_lr if start_lr > 0 else 0.0
    out["fits_training_set"], out["overfitting_onset"] = fits, onset
    acc_txt = (
        f"val accuracy slope {acc_b * 100:+.3g} pp/epoch (SE {acc_se * 100:.3g}, t {t:.3g}) over the last {window} "
        "epochs"
    )
    fit_txt = f"train accuracy at the stop {train_acc:.3f}"
    if acc_rising:
        converged, why = False, f"still improving: {acc_txt}"
    elif fits:
        converged, why = True, f"flat ({acc_txt}); fits its training set ({fit_txt} >= {fit_accuracy:g})"
    elif onset:
        converged, why = True, f"flat ({acc_txt}); over-fitting onset (val loss rising, train loss falling)"
    elif loss_falling:
        converged = False
        why = (
            f"still improving: val loss slope {loss_b:+.3g}/epoch (SE {loss_se:.3g}) over the last {window} "
            f"epochs, and it does not fit its training set ({fit_txt} < {fit_accuracy:g})"
        )
    elif ratio < plateau_min_lr_ratio:
        converged = False
        why = (
            f"plateau made by the schedule: the rate at the stop is {ratio:.3g} of its peak "
            f"(< {plateau_min_lr_ratio:g}), with {fit_txt} < {fit_accuracy:g} and no over-fitting onset"
        )
    else:
        converged = True
        why = f"flat ({acc_txt}; val loss not falling) at a rate {ratio:.3g} of its peak (>= {plateau_min_lr_ratio:g})"
    verdict = "converged" if converged else "under-trained"
    return {"converged": converged, "verdict": verdict, "reason": why, **out}


def _sig(x: float) -> float:
    """`x` to 6 significant digits: the same JSON on every rerun."""
    return float(f"{x:.6g}")


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

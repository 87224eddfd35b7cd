"""The training protocol every strategy shares, so that every number means the same thing.

* `fit`: seeded batches, light augmentation, a one-epoch linear warm-up, then reduce-on-plateau of the
  learning rate on the validation loss (a schedule defined over the epochs actually run), early stopping
  once neither the validation loss nor the validation accuracy has improved for `patience` epochs, the
  best epoch's weights kept (by validation accuracy, ties by validation loss). Whether a plateau was
  reached before the epoch cap is recorded with its evidence (`TrainResult.convergence`); a model that
  hit the cap is "under-trained" and no verdict is drawn from it.
* `training_failure`: accuracy near chance, a loss that never fell below ln(C), or a divergence is a
  finding ("training failed"), with the measured loss curve, gradient norm and learning rate.
* `train_protocol`: the learning rate chosen from a small grid on the validation split (the same grid
  and budget for every strategy, scratch included), then one run to a plateau per training seed.

Devices (`device=`, default the CPU): batches are built on the CPU (the seeded generator that shuffles and
augments stays there, so a CPU and a GPU run draw the same batches) and moved with
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
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    weight_decay: float,
    generator: torch.Generator,
    label: str = "",
    lr_patience: int | None = None,
    lr_factor: float = 0.3,
    min_delta: float = 1e-3,
    warmup: bool = True,
    min_lr_ratio: float = 0.01,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train `model` to a validation plateau (or the epoch cap); the best epoch's weights are restored.

    Args:
        model: the module whose output is the logits (the whole network, or just the head for
            strategies that train on cached features).
        strategy, cfg: the strategy (its optimizer param groups, epoch hook, BatchNorm policy) and config.
        train_inputs, val_inputs: `fn(indices, train)` -> input batch (augmented when train is True).
        train_labels, val_labels: int labels.
        epochs: the epoch cap; a run that reaches it without a plateau is marked under-trained.
        batch_size, weight_decay: the recipe (params `train`, `strategies.<name>`).
        patience: epochs without a validation improvement (loss lower by more than `min_delta`, an
            absolute amount, or accuracy higher) before stopping: the plateau. Absolute, because on a
            separable problem the loss keeps shrinking by a constant fraction long after nothing changes.
        generator: seeded generator for shuffling and augmentation.
        label: name for progress bars and errors.
        lr_patience: epochs without a validation-loss improvement before the rate is multiplied by
            `lr_factor` (default: patience // 2, at least 1).
        warmup: a linear warm-up of the rate over the first epoch's steps (from 10%).
        min_lr_ratio: reduce-on-plateau never cuts a group's rate below this fraction of its start.
        device: where the model, the batches and the labels live (default: the CPU, plain float32). On
            CUDA the forward pass and the loss run under autocast (bfloat16, or float16 with loss scaling;
            see `transferlab.core.device`); the generator stays on the CPU.

    Returns:
        TrainResult with the best model (left on `device`), the per-epoch history (with the rate and the mean gradient
        norm), the images seen and the convergence evidence.

    Raises:
        DivergenceError: the loss became NaN/inf.
    """
    device = as_device(device)
    model.to(device)  # before the optimizer: it holds the parameters where they live
    strategy.move_to(model, device)
    train_inputs, val_inputs = _on_device(train_inputs, device), _on_device(val_inputs, device)
    # Labels stay indexable by the CPU permutation; each batch's labels are moved with the batch.
    y_train = torch.as_tensor(train_labels, dtype=torch.long)
    y_val = torch.as_tensor(val_labels, dtype=torch.long)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    scaler = make_grad_scaler(device)  # a pass-through except for float16 autocast on CUDA
    optimizer = torch.optim.AdamW(strategy.param_groups(model, cfg), weight_decay=weight_decay)
    lr_patience = max(1, patience // 2) if lr_patience is None else lr_patience
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    # A floor under the schedule: a noisy validation loss would otherwise cut the rate towards zero and
    # end training on a "plateau" the schedule made, with the model still under-fit.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=lr_factor,
        patience=lr_patience,
        threshold=min_delta,
        threshold_mode="abs",
        min_lr=[b * min_lr_ratio for b in base_lrs],
    )
    result = TrainResult(model=model)
    best_state, best_key = None, (-1.0, float("inf"))
    best_loss, since_improve, lr_reductions = float("inf"), 0, 0
    start = time.perf_counter()
    strategy.before_training(model, cfg, train_inputs, n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Several processes (torchrun, `train.processes`): each trains on its part of every batch through DDP.
    dist_ctx = distributed.current()
    net, wrapped_for = model, None
    bar = tqdm(range(1, epochs + 1), desc=f"train {label}", disable=None if dist_ctx is None else True, leave=False)
    for epoch in bar:
        strategy.on_epoch_start(model, epoch, cfg, optimizer)
        strategy.set_train_mode(model)
        if dist_ctx is not None:
            now = tuple(id(p) for p in model.parameters() if p.requires_grad)
            if now != wrapped_for:  # first epoch, or a strategy changed what trains (gradual unfreezing)
                net = model  # the old wrapper's gradient hooks go with it
                net, wrapped_for = distributed.wrap(model, device), now
        order = torch.randperm(n, generator=generator).numpy()
        loss_sum, correct, grad_sq_sum = 0.0, 0, 0.0
        for step in range(steps_per_epoch):
            if warmup and epoch == 1:
                for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = base * (0.1 + 0.9 * step / steps_per_epoch)
            idx = order[step * batch_size : (step + 1) * batch_size]
            inputs = train_inputs(idx, True)
            targets = y_train[idx].to(device, non_blocking=True)
            if dist_ctx is not None:
                if len(idx) < dist_ctx.world_size:  # a last batch too small to split: every process skips it
                    continue
                mine = distributed.part(len(idx), dist_ctx)
                inputs, targets = inputs[mine], targets[mine]
            with autocast_context(device):
                logits = net(inputs)
                loss = strategy.loss(logits, targets, inputs, cfg)
                extra = strategy.penalty(model, cfg)
                if dist_ctx is not None:
                    # DDP averages gradients over processes: weighting each part's mean loss by its share
                    # of the batch makes that average the gradient of the whole batch's mean loss.
                    part_loss = loss
                    loss = loss * (len(targets) * dist_ctx.world_size / len(idx))
                if extra is not None:
                    loss = loss + extra
            if dist_ctx is None:
                value = loss
            else:  # the whole batch's loss, the same number in every process (all stop together)
                total = distributed.all_sum([part_loss.item() * len(targets)], device)[0] / len(idx)
                value = torch.tensor(total + (extra.item() if extra is not None else 0.0))
            if not torch.isfinite(value):
                lrs = [g["lr"] for g in optimizer.param_groups]
                raise DivergenceError(
                    f"{label}: loss is {value.item()} at epoch {epoch}, step {step + 1} (learning rates {lrs}). "
                    f"Lower strategies.{label}.lr (now {cfg.lr}) and run again; other strategies' results "
                    "are kept."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # true gradients for the norm below (no-op unless float16 on CUDA)
            grads = [p.grad for p in trainable if p.grad is not None]
            if grads:
                sq = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum())
                # float16 overflow: the scaler skips this step and lowers its scale; keep the norm finite.
                if math.isfinite(sq) or not scaler.is_enabled():
                    grad_sq_sum += sq
            scaler.step(optimizer)
            scaler.update()
            loss_sum += value.item() * len(idx)
            correct += int((logits.argmax(1) == targets).sum())
        if warmup and epoch == 1:
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base
        result.images_seen += n
        if dist_ctx is not None:
            correct = int(distributed.all_sum([correct], device)[0])
            distributed.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: one validation result
        val_logits = predict_logits(model, lambda i: val_inputs(i, False), len(y_val), device=device)
        val_loss = float(F.cross_entropy(val_logits, y_val))
        val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        row = {
            "epoch": epoch,
            "lr": float(f"{optimizer.param_groups[-1]['lr']:.6g}"),
            "train_loss": round(loss_sum / n, 6),
            "train_accuracy": round(correct / n, 6),
            "val_loss": round(val_loss, 6),
            "val_accuracy": round(val_acc, 6),
            "grad_norm": round(math.sqrt(grad_sq_sum / steps_per_epoch), 6),
        }
        result.history.append(row)
        bar.set_postfix(val_acc=f"{val_acc:.3f}")
        log.info("%s epoch %d: %s", label, epoch, row)
        improved = False
        if val_loss < best_loss - min_delta:
            best_loss, improved = val_loss, True
        if (val_acc, -val_loss) > (best_key[0], -best_key[1]):
            improved = improved or val_acc > best_key[0]
            best_key, result.best_epoch = (val_acc, val_loss), epoch
            best_state = copy.deepcopy(model.state_dict())
        since_improve = 0 if improved else since_improve + 1
        if since_improve >= patience:
            result.stopped_early = epoch < epochs
            break
        before = [g["lr"] for g in optimizer.param_groups]
        plateau.step(val_loss)
        lr_reductions += int(any(g["lr"] < b for g, b in zip(optimizer.param_groups, before, strict=True)))
    result.train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    result.best_val_accuracy, result.best_val_loss = best_key
    result.convergence = {
        "converged": since_improve >= patience,
        "stopped_by": "plateau" if since_improve >= patience else "cap",
        "epoch_cap": epochs,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "patience": patience,
        "epochs_without_improvement": since_improve,
        "lr_reductions": lr_reductions,
        "final_lr": result.history[-1]["lr"],
        # The evidence: how much the last `patience` epochs gained over the best before them.
        "val_accuracy_gain_last_epochs": _recent_gain(result.history, patience),
    }
    return result


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

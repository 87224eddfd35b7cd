"""`adabn` (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): the frozen
backbone's BatchNorm statistics re-estimated on the target images, then a new head trained on top.

Before training, every BatchNorm layer's running mean and variance are replaced by the exact population
statistics of that layer's input over the WHOLE (non-augmented) target training set, computed with every
earlier BatchNorm layer already adapted: exactly what the adapted network feeds the layer at inference.
Then only the head trains, with every BatchNorm layer in eval mode so the adapted statistics stay fixed.
The backbone runs every epoch (the features cache holds the source statistics' features, so it cannot be
used).

Why not PyTorch's cumulative average (`momentum=None`) over mini-batches: it averages per-batch variances,
which misses the spread of the batch means (exact only when every batch has the same mean, i.e. never for
class-ordered or small batches), and during that pass each deeper layer sees inputs normalised with
per-batch statistics, not with the adapted ones. See `reestimate_bn_stats` for the two exact ways used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from transferlab.models.batchnorm import ChannelMoments
from transferlab.models.sources import SourceModel, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, freeze_all, register_strategy

if TYPE_CHECKING:  # params validation imports this module for its Config: no torch at import
    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm


def _bn_type() -> type:
    from torch import nn

    return nn.modules.batchnorm._BatchNorm


STATS_BATCH = 128  # images per forward pass in the layer-by-layer fallback
# Above this estimated activation memory, the one full-batch pass gives way to the layer-by-layer passes.
# 2 GiB: the default 1,000 images at 48 px through EfficientNet-Lite0 need about 0.7 GiB.
FULL_BATCH_BYTES = 2 * 1024**3


class AdabnConfig(StrategyConfig):
    # Like linear_probe, only a linear head trains (a convex problem): a large step is safe.
    lr: float = Field(3e-3, gt=0, le=10)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being estimated has seen its input."""


def _tracked_bns(model: nn.Module) -> list[BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _bn_type()) and m.track_running_stats]


def _peak_bytes(model: nn.Module, bns: list[BatchNorm], one: torch.Tensor, n: int) -> int:
    """Estimated activation memory of one no-grad pass over n samples: 3 x the largest BN input."""
    largest = [0]

    def hook(_m: nn.Module, args: tuple) -> None:
        largest[0] = max(largest[0], args[0][0].numel())

    handles = [b.register_forward_pre_hook(hook) for b in bns]
    try:
        model(one)
    finally:
        for h in handles:
            h.remove()
    return 3 * 4 * largest[0] * n


def reestimate_bn_stats(*args, **kwargs) -> str:
    """`_reestimate_bn_stats` without autograd (see there)."""
    import torch

    with torch.no_grad():
        return _reestimate_bn_stats(*args, **kwargs)


def _reestimate_bn_stats(
    model: nn.Module,
    inputs: Callable[[np.ndarray, bool], torch.Tensor],
    n: int,
    batch_size: int = STATS_BATCH,
    max_full_batch_bytes: int = FULL_BATCH_BYTES,
) -> str:
    """Replace every BatchNorm layer's running statistics by the exact target statistics of its input.

    For each layer, running_mean and running_var become the per-channel mean and population variance
    (divisor N = samples x height x width, which is what BatchNorm normalises a batch with) of the layer's
    input over all `n` samples, with every earlier BatchNorm layer already adapted. Two exact ways:

    * `"full_batch"`: one forward pass over all n samples as a single batch with BatchNorm in train mode;
      each layer then normalises with its full-set statistics, so every later layer sees exactly the
      adapted network's activations. Used when its estimated activation memory fits `max_full_batch_bytes`.
    * `"layer_by_layer"`: for each layer in execution order, mini-batch passes (cut short after that layer)
      with the earlier layers in eval mode on their adapted statistics; the layer's moments are merged in
      float64 across batches. Exact at any size, at the cost of about (number of layers / 2) passes.

    The rest of the network runs in eval mode (dropout off); the model's parameters, the momenta and the
    train/eval flags are left as they were. Layers without running statistics are skipped.

    Args:
        model: the network (BatchNorm layers anywhere inside).
        inputs: `fn(indices, augment)`; called with augment=False (clean images).
        n: number of samples; every one is used.
        batch_size: samples per pass in the layer-by-layer way.
        max_full_batch_bytes: memory budget of the single full-batch pass.

    Returns:
        The way used: "full_batch" or "layer_by_layer".
    """
    bns = _tracked_bns(model)
    if not bns or n == 0:
        return "full_batch"
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        mode = (
            "full_batch"
            if _peak_bytes(model, bns, inputs(np.arange(1), False), n) <= max_full_batch_bytes
            else "layer_by_layer"
        )
        if mode == "full_batch":
            moments = {b: ChannelMoments() for b in bns}
            handles = [b.register_forward_pre_hook(lambda m, a: moments[m].update(a[0])) for b in bns]
            try:
                for b in bns:
                    b.train()  # normalise with the full-set batch statistics (biased variance, as stored)
                model(inputs(np.arange(n), False))
            finally:
                for h in handles:
                    h.remove()
            for b in bns:
                b.eval()
                if moments[b].seen:
                    moments[b].store(b)
        else:
            order: list[BatchNorm] = []  # execution order (module order can differ from call order)
            handles = [
                b.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None) for b in bns
            ]
            try:
                model(inputs(np.arange(1), False))
            finally:
                for h in handles:
                    h.remove()
            for b in order:
                acc = ChannelMoments()

                def hook(_m: nn.Module, args: tuple, _acc: ChannelMoments = acc) -> None:
                    _acc.update(args[0])
                    raise _Stop

                handle = b.register_forward_pre_hook(hook)
                try:
                    for start in range(0, n, batch_size):
                        with contextlib.suppress(_Stop):
                            model(inputs(np.arange(start, min(start + batch_size, n)), False))
                finally:
                    handle.remove()
                acc.store(b)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return mode


@register_strategy
class Adabn(Strategy):
    name = "adabn"
    modalities = ("image",)  # BatchNorm statistics: text encoders have LayerNorm
    summary = "frozen backbone with BatchNorm statistics re-estimated on the target, new head trained"
    Config = AdabnConfig

    def build(self, source: SourceModel, num_classes: int, cfg: AdabnConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        if not any(isinstance(m, _bn_type()) for m in model.modules()):
            raise ValueError(f"strategies.adabn: {source.arch} has no BatchNorm layers to adapt")
        freeze_all(model)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        return model

    def before_training(
        self, model: nn.Module, cfg: AdabnConfig, train_inputs: Callable[[np.ndarray, bool], torch.Tensor], n_train: int
    ) -> None:
        reestimate_bn_stats(model, train_inputs, n_train)

    def set_train_mode(self, model: nn.Module) -> None:
        # Every BatchNorm layer in eval mode (also any without affine weights): the adapted statistics stay.
        model.train()
        for m in model.modules():
            if isinstance(m, _bn_type()):
                m.eval()

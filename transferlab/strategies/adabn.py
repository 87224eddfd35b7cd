"""`adabn` (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): the frozen
backbone's BatchNorm statistics re-estimated on the target images, then a new head trained on top.

Before training, every BatchNorm layer's running mean and variance are reset and re-estimated as the
cumulative average over one pass of the frozen backbone over all (non-augmented) target training images,
so each layer normalises target activations with target statistics. Then only the head trains, with every
BatchNorm layer in eval mode so the adapted statistics stay fixed. The backbone runs every epoch (the
features cache holds the source statistics' features, so it cannot be used).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from pydantic import Field
from torch import nn

from transferlab.backbones import SourceModel, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, freeze_all, register_strategy

BatchNorm = nn.modules.batchnorm._BatchNorm
STATS_BATCH = 128  # images per forward pass while re-estimating statistics


class AdabnConfig(StrategyConfig):
    # Like linear_probe, only a linear head trains (a convex problem): a large step is safe.
    lr: float = Field(3e-3, gt=0, le=10)


@torch.no_grad()
def reestimate_bn_stats(
    model: nn.Module, inputs: Callable[[np.ndarray, bool], torch.Tensor], n: int, batch_size: int = STATS_BATCH
) -> None:
    """Reset every BatchNorm layer's running statistics and re-estimate them over `n` samples.

    Uses PyTorch's cumulative average (`momentum=None`): the statistics are the mean over batches of each
    batch's statistics, so the batches are made near-equal in size to weigh every sample alike.
    """
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    try:
        model.eval()
        for m in bns:
            m.momentum = None
            m.reset_running_stats()
            m.train()
        for idx in np.array_split(np.arange(n), max(1, math.ceil(n / batch_size))):
            model(inputs(idx, False))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


@register_strategy
class Adabn(Strategy):
    name = "adabn"
    summary = "frozen backbone with BatchNorm statistics re-estimated on the target, new head trained"
    Config = AdabnConfig

    def build(self, source: SourceModel, num_classes: int, cfg: AdabnConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        if not any(isinstance(m, BatchNorm) for m in model.modules()):
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
            if isinstance(m, BatchNorm):
                m.eval()

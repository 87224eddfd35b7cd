"""`gradual_unfreeze` (ULMFiT, Howard & Ruder 2018): the head alone first, then one block group more per epoch.

Epoch 1 trains only the new head; each later epoch unfreezes the next `groups_per_epoch` block groups from
the top (timm's `group_matcher`: stem, stages, head), until the whole network trains. The random head thus
settles before its gradients reach the pre-trained blocks, and the generic early blocks move last (or never,
in a short run). The optimizer is built once, so it holds every parameter from the start: a frozen one has
no gradient and AdamW leaves it (and its weight decay) alone until `on_epoch_start` unfreezes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, block_groups, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    import torch
    from torch import nn


class GradualUnfreezeConfig(StrategyConfig):
    # ULMFiT unfreezes one layer group per epoch: each newly thawed group adapts while the ones above it
    # are already fitted to the target, without the catastrophic forgetting of unfreezing all at once.
    groups_per_epoch: int = Field(1, ge=1, description="block groups unfrozen (from the top) at each new epoch")
    # The same 10x rule as finetune_full: the unfrozen pre-trained blocks take smaller steps than the head.
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="lr of unfrozen backbone blocks = lr * this")


def trainable_groups(n_backbone_groups: int, epoch: int, groups_per_epoch: int) -> int:
    """How many backbone block groups (counted from the top) train in `epoch` (1-based)."""
    return min(n_backbone_groups, (epoch - 1) * groups_per_epoch)


def set_unfrozen(model: nn.Module, n_top: int) -> list[str]:
    """Make exactly the head and the top `n_top` backbone block groups trainable; returns their names."""
    groups = block_groups(model)
    backbone = groups[:-1]
    chosen = set(groups[-1]) | {n for g in backbone[len(backbone) - n_top :] for n in g}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return sorted(chosen)


@register_strategy
class GradualUnfreeze(Strategy):
    name = "gradual_unfreeze"
    summary = "head first, then one more block group unfrozen per epoch from the top (ULMFiT)"
    Config = GradualUnfreezeConfig

    def build(self, source: SourceModel, num_classes: int, cfg: GradualUnfreezeConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        set_unfrozen(model, 0)
        return model

    def param_groups(self, model: nn.Module, cfg: GradualUnfreezeConfig) -> list[dict]:
        # Every parameter, frozen or not: the optimizer is built once, before the later epochs unfreeze.
        head = set(block_groups(model)[-1])
        named = list(model.named_parameters())
        return [
            {"params": [p for n, p in named if n not in head], "lr": cfg.lr * cfg.backbone_lr_mult},
            {"params": [p for n, p in named if n in head], "lr": cfg.lr},
        ]

    def on_epoch_start(
        self, model: nn.Module, epoch: int, cfg: GradualUnfreezeConfig, optimizer: torch.optim.Optimizer
    ) -> None:
        # Set from the epoch number alone (not incrementally), so the hook is idempotent.
        n_backbone = len(block_groups(model)) - 1
        set_unfrozen(model, trainable_groups(n_backbone, epoch, cfg.groups_per_epoch))

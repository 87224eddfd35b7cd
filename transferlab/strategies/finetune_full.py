"""`finetune_full`: every layer trained; the pre-trained backbone at a lower learning rate than the head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.strategies.base import Strategy, StrategyConfig, head_names, register_strategy

if TYPE_CHECKING:
    from torch import nn


class FinetuneFullConfig(StrategyConfig):
    # A smaller backbone step keeps the pre-trained features from being wrecked by the random head's
    # early gradients (the usual 10x rule).
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="backbone lr = lr * backbone_lr_mult")


@register_strategy
class FinetuneFull(Strategy):
    name = "finetune_full"
    summary = "all layers trained, backbone at a lower learning rate"
    Config = FinetuneFullConfig

    def param_groups(self, model: nn.Module, cfg: FinetuneFullConfig) -> list[dict]:
        heads = set(head_names(model))
        head = [p for n, p in model.named_parameters() if n in heads]
        body = [p for n, p in model.named_parameters() if n not in heads]
        return [{"params": body, "lr": cfg.lr * cfg.backbone_lr_mult}, {"params": head, "lr": cfg.lr}]

"""`finetune_top`: the early blocks frozen, the last `k` block groups and the head trained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, block_groups, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, freeze_all, register_strategy

if TYPE_CHECKING:
    from torch import nn


class FinetuneTopConfig(StrategyConfig):
    # Early blocks hold generic edges and textures that transfer; the top blocks are the most
    # source-specific, so they are the ones worth adapting when labels are few.
    k: int = Field(2, ge=0, description="number of top block groups (timm's group_matcher) to train")
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="lr of unfrozen blocks = lr * this")


def unfreeze_top(model: nn.Module, k: int) -> list[str]:
    """Unfreeze the head and the top `k` block groups; returns the names made trainable."""
    groups = block_groups(model)
    chosen = groups[-1] + [n for g in groups[-1 - k : -1] for n in g] if k else list(groups[-1])
    params = dict(model.named_parameters())
    for n in chosen:
        params[n].requires_grad_(True)
    return chosen


@register_strategy
class FinetuneTop(Strategy):
    name = "finetune_top"
    summary = "early blocks frozen, top k block groups + head trained"
    Config = FinetuneTopConfig

    def build(self, source: SourceModel, num_classes: int, cfg: FinetuneTopConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        n_groups = len(block_groups(model)) - 1
        if cfg.k > n_groups:
            raise ValueError(f"strategies.finetune_top.k={cfg.k} but {source.arch} has {n_groups} block groups")
        freeze_all(model)
        unfreeze_top(model, cfg.k)
        return model

    def param_groups(self, model: nn.Module, cfg: FinetuneTopConfig) -> list[dict]:
        head = set(block_groups(model)[-1])
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in trainable if n not in head], "lr": cfg.lr * cfg.backbone_lr_mult},
            {"params": [p for n, p in trainable if n in head], "lr": cfg.lr},
        ]

"""`discriminative_lr` (layer-wise learning-rate decay): every layer trained, deeper layers at smaller steps.

Block group i counted from the top (timm's `group_matcher`; the new head is i = 0) trains at
`lr * decay**i`, so the head moves fastest and the stem, whose generic edge and texture filters transfer
best, barely moves. One optimizer param group per block group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import block_groups
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    from torch import nn


class DiscriminativeLrConfig(StrategyConfig):
    # Halving per group spans ~2 orders of magnitude over a typical 6-8 group CNN (stem at lr/64 with 6
    # backbone groups): close to ULMFiT's factor 1/2.6 and to finetune_full's 10x backbone cut on average.
    decay: float = Field(0.5, gt=0, le=1, description="lr multiplier per block group, going down from the head")


def layerwise_lrs(n_groups: int, lr: float, decay: float) -> list[float]:
    """Learning rates of the block groups from input to output (the last one is the head's: `lr`)."""
    return [lr * decay ** (n_groups - 1 - i) for i in range(n_groups)]


@register_strategy
class DiscriminativeLr(Strategy):
    name = "discriminative_lr"
    summary = "all layers trained, lr decayed per block group from the head down"
    Config = DiscriminativeLrConfig

    def param_groups(self, model: nn.Module, cfg: DiscriminativeLrConfig) -> list[dict]:
        groups = block_groups(model)
        params = dict(model.named_parameters())
        grouped = {n for g in groups for n in g}
        if missing := sorted(set(params) - grouped):  # would silently never train
            raise ValueError(f"discriminative_lr: parameters in no block group: {missing[:5]}")
        lrs = layerwise_lrs(len(groups), cfg.lr, cfg.decay)
        return [{"params": [params[n] for n in g], "lr": lr} for g, lr in zip(groups, lrs, strict=True)]

"""`scratch`: the same architecture from random weights, every layer trained: the baseline to beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, random_like
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    from torch import nn


class ScratchConfig(StrategyConfig):
    # Random weights need a larger step than fine-tuning; 3e-3 with AdamW is a common CNN default.
    lr: float = Field(3e-3, gt=0, le=10)


@register_strategy
class Scratch(Strategy):
    name = "scratch"
    summary = "same architecture, random init, all layers trained"
    Config = ScratchConfig
    pretrained = False

    def build(self, source: SourceModel, num_classes: int, cfg: StrategyConfig, seed: int) -> nn.Module:
        return random_like(source, num_classes, seed)

"""`linear_probe` (feature extraction): the backbone frozen, only a new linear head trained.

The head trains on the features cache written once by `features@<source>`: no epoch runs the frozen
backbone again. The saved model is the whole network (backbone + head), ready to deploy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, freeze_all, register_strategy

if TYPE_CHECKING:
    from torch import nn


class LinearProbeConfig(StrategyConfig):
    # A linear head on fixed features is a convex problem: a large step and more epochs are cheap.
    lr: float = Field(3e-3, gt=0, le=10)
    epochs: int | None = Field(30, ge=1, description="epochs over the cached features (each takes milliseconds)")


@register_strategy
class LinearProbe(Strategy):
    name = "linear_probe"
    summary = "frozen backbone, linear head trained on cached features"
    Config = LinearProbeConfig
    uses_features = True

    def build(self, source: SourceModel, num_classes: int, cfg: StrategyConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        freeze_all(model)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        return model

"""`scratch`: the same architecture from random weights, every layer trained: the baseline to beat.

Random weights need far more steps than a pre-trained network to fit 500 images, and a schedule that cuts the
rate on every noisy validation epoch ends such a run at a plateau of its own making (the old default stopped
scratch at 69-71% training accuracy with its rate at 1-3% of its start). Scratch's config therefore carries
its own schedule: a warm-up, then a cosine decay over a fixed budget of epochs (`schedule: cosine`, `epochs`),
with rates compared over a search budget long enough to separate them (`lr_search_epochs`), and, optionally,
the zero-init of residual networks trained from scratch (`zero_init_last`, Goyal et al. 2017: each residual
block starts as the identity, the classifier at zero). Augmentation and weight decay are `train`'s, as for
every strategy. The schedule fields are read by `transferlab.training.recipe.build_recipe`; unset, scratch
trains like every other strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from transferlab.models.sources import SourceModel, random_like
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:
    from torch import nn


class ScratchConfig(StrategyConfig):
    # Random weights need a larger step than fine-tuning; 3e-3 with AdamW is a common CNN default.
    lr: float = Field(3e-3, gt=0, le=10)
    # The project's shared schedule unless asked: params.yaml asks for cosine (measured in its comment).
    schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description="plateau: train's reduce-on-plateau and early stopping; cosine: warm-up, then cosine decay "
        "over `epochs` (or train.epochs), every epoch run",
    )
    # Several epochs: the first steps from random weights see gradient norms in the hundreds.
    warmup_epochs: int = Field(1, ge=1, description="epochs of the linear warm-up (from 10% of the rate)")
    lr_search_epochs: int | None = Field(
        None, ge=1, description="epochs per rate of the learning-rate grid; null: train.lr_search_epochs"
    )
    # timm's EfficientNet-Lite from its default init starts at a loss of ~5 (twice ln 10) with gradient norms in
    # the hundreds; zeroed residual branches and head start it at ln 10 with norms near 10 (measured, params.yaml).
    zero_init_last: bool = Field(
        False,
        description="zero the last BatchNorm scale of every residual block and the classifier (each block starts "
        "as the identity, the first logits equal)",
    )


@register_strategy
class Scratch(Strategy):
    name = "scratch"
    summary = "same architecture, random init, all layers trained"
    Config = ScratchConfig
    pretrained = False

    def build(self, source: SourceModel, num_classes: int, cfg: ScratchConfig, seed: int) -> nn.Module:
        model = random_like(source, num_classes, seed)
        if cfg.zero_init_last:
            zero_init_last(model)
        return model


def zero_init_last(model: nn.Module) -> int:
    """Zero the scale of the last BatchNorm of every residual block (its branch then adds nothing: the block
    starts as the identity) and the weights and bias of a linear classifier (the first logits are equal, the
    first loss ln C). Blocks with their own `zero_init_last` (timm's ResNets) use it.

    Returns:
        The residual blocks changed.
    """
    import torch
    from torch import nn

    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if callable(getattr(module, "zero_init_last", None)):
                module.zero_init_last()
                changed += 1
            elif getattr(module, "has_skip", False):  # timm's EfficientNet blocks: bn3 / bn2 is the last
                norms = [m for m in module.children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                if norms:
                    nn.init.zeros_(norms[-1].weight)
                    changed += 1
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
    return changed

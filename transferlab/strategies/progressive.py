"""`progressive` (Rusu et al. 2016, "Progressive Neural Networks"): the source network kept whole and frozen as
one column, a new column of the same architecture trained from random weights beside it, lateral adapters from
every source stage into the new column, and a new head on both columns' features.

Forgetting is zero by construction: the source column's parameters and buffers never change (no gradient, its
BatchNorm layers always in eval mode), so the source task's predictions (`model.source_logits`) are the
source's. The price is capacity and compute: the model holds two networks (the saved artifact too) and runs both
at every forward pass. The network itself (`ProgressiveNet`: adapters, head, the timm interface) lives in
`transferlab.models.columns`; this module only builds, trains and saves it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.core.io import save_torch, write_json
from transferlab.models.sources import SourceModel
from transferlab.strategies.base import Strategy, StrategyConfig, register_strategy

if TYPE_CHECKING:  # params validation imports this module for its Config: no torch at import
    from torch import nn


class ProgressiveConfig(StrategyConfig):
    # Everything that trains (the new column, the adapters, the head) starts from random weights, as scratch does:
    # scratch's rate (strategies.scratch.lr 0.003, the best of 0.0009 / 0.003 / 0.01 in 6-epoch runs on the
    # default data), not finetune_full's 0.001, which is set for pre-trained weights. The protocol's lr grid
    # (x0.3, x1, x3 on validation) searches around it.
    lr: float = Field(
        3e-3, gt=0, le=10, description="learning rate of the new column, the lateral adapters and the head"
    )


@register_strategy
class Progressive(Strategy):
    name = "progressive"
    summary = "frozen source column + new column with lateral adapters (progressive networks): no forgetting"
    Config = ProgressiveConfig
    modalities = ("image",)  # lateral 1x1 convolutions between feature maps

    def build(self, source: SourceModel, num_classes: int, cfg: ProgressiveConfig, seed: int) -> nn.Module:
        """The source network as the frozen column, a new column of its architecture (random weights, seeded by
        `seed`), adapters and head.

        Raises:
            ValueError: a text source, or an architecture without timm's `feature_info`.
        """
        import torch

        from transferlab.models.columns import ProgressiveError, ProgressiveNet, stage_names
        from transferlab.models.sources import _create

        if source.modality != "image":
            raise ValueError(
                f"strategies.progressive: source '{source.name}' is a {source.modality} encoder; progressive "
                "networks join convolutional feature maps (image sources only)"
            )
        stage_names(source.model, source.arch)  # a clear error before the new column is built
        torch.manual_seed(seed)
        try:
            column = _create(source.arch, pretrained=False, num_classes=0, **source.kwargs)
        except Exception as exc:  # a source that is not a timm architecture cannot get a second column
            raise ProgressiveError(
                f"progressive: cannot build a new column of architecture '{source.arch}' ({exc})"
            ) from exc
        return ProgressiveNet(source.model, column, num_classes, arch=source.arch, create_kwargs=source.kwargs)

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode for what trains; the source column in eval mode (`ProgressiveNet.train` sees to it)."""
        model.train()
        model.source.eval()

    def save(self, model: nn.Module, out_dir: Path, meta: dict) -> None:
        """The whole network (the source column included: the artifact then reproduces the model without the
        source's file) and what `load` rebuilds its skeleton from."""
        columns = {
            "arch": model.arch,
            "create_kwargs": model.create_kwargs,
            "source_num_classes": int(getattr(model.source, "num_classes", 0)),
            "num_classes": int(model.num_classes),
        }
        save_torch(out_dir / "model.pt", {"state_dict": model.state_dict(), **meta, "progressive": columns})
        write_json(out_dir / "model_meta.json", {**meta, "progressive": columns})

    def load(self, out_dir: Path, load_source: Callable[[], SourceModel]) -> nn.Module:
        import torch

        from transferlab.models.columns import ProgressiveNet
        from transferlab.models.sources import _create

        ckpt = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
        c = ckpt["progressive"]
        source = _create(c["arch"], pretrained=False, num_classes=c["source_num_classes"], **c["create_kwargs"])
        column = _create(c["arch"], pretrained=False, num_classes=0, **c["create_kwargs"])
        model = ProgressiveNet(source, column, c["num_classes"], arch=c["arch"], create_kwargs=c["create_kwargs"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return model.eval()

"""Progressive neural networks (Rusu et al. 2016, "Progressive Neural Networks"): a frozen source column beside a
new column of the same architecture, joined by lateral adapters, that looks like a timm model to the rest of the
pipeline (`forward`, `forward_features`, `forward_head(x, pre_logits=True)`, `get_classifier`,
`reset_classifier`, `num_features`, `pretrained_cfg`).

- The source column is the source network with its own classifier, never trained: every parameter has
  `requires_grad` False, it runs under `torch.no_grad()`, and `train()` leaves it in eval mode, so its BatchNorm
  running statistics never move. `source_logits` is the source task's prediction, unchanged by construction.
- The new column is the same architecture with random weights (no classifier). At every stage timm's
  `feature_info` names (`layer1..4` of a ResNet, `blocks.N` of an EfficientNet) its stage output gets
  `+ adapter_i(source stage output)`: a 1x1 convolution from the source's channels to the column's, then a
  BatchNorm whose scale starts at zero. The BatchNorm plays the part of the paper's learned scalar alpha (the
  trained source's activations and the random column's differ in scale); starting it at zero makes the column
  start as a plain random network and learn how much of each source stage to take (Goyal et al. 2017's zero-init
  of residual branches). No activation: the sum enters the next stage's convolution, itself followed by
  BatchNorm and an activation, so a non-linearity here would only add a second layer to a one-layer adapter.
- The head is one linear layer on the concatenation of the two columns' pooled features. `W h_new + U h_src` is
  exactly the paper's lateral connection into the output layer, without an extra module, and from the first step
  the head can use the source's features (linear-probe capacity) while the new column is still random; adding
  the two instead would need equal widths and would mix their scales.

The lateral hooks are registered for the duration of one forward pass and removed after it, so a deep copy of
the network (the training layer and the diagnosis copy models) carries no hook bound to the original.

This module imports torch at import time: `transferlab.strategies.progressive` imports it inside its methods.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD = "head"  # the target classifier's name (pretrained_cfg["classifier"]: head_names and peft read it)


class ProgressiveError(ValueError):
    """A source the progressive network cannot be built on; the message names the architecture and why."""


def stage_names(model: nn.Module, arch: str) -> list[str]:
    """The module names of `model`'s stages from timm's `feature_info`.

    Raises:
        ProgressiveError: no `feature_info` (not a timm model with feature extraction), or a name that is not a
            module of `model`.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise ProgressiveError(
            f"progressive: architecture '{arch}' has no timm feature_info (the stage names the lateral adapters "
            "attach to); use a timm convolutional network that has one (resnet*, efficientnet*, mobilenet*, ...)"
        )
    names = [f["module"] for f in info]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ProgressiveError(f"progressive: feature_info of '{arch}' names modules {missing} that it does not have")
    return names


def _channels(model: nn.Module) -> list[int]:
    return [int(f["num_chs"]) for f in model.feature_info]


def _pre_logits_width(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def lateral_adapter(in_chs: int, out_chs: int) -> nn.Sequential:
    """1x1 convolution (source channels -> column channels) + BatchNorm whose scale starts at zero."""
    bn = nn.BatchNorm2d(out_chs)
    nn.init.zeros_(bn.weight)
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), bn)


class ProgressiveNet(nn.Module):
    """A frozen source column, a new column of the same architecture, lateral adapters at every stage, and a
    linear head on the two columns' concatenated pooled features.

    Args:
        source: the source network (with its classifier, if it has one); frozen here.
        column: a freshly initialised network of the same architecture, without a classifier.
        num_classes: target classes of the head (0: no head, `forward` then returns the pre-logits).
        arch: the timm architecture name (errors and `load`).
        create_kwargs: extra `timm.create_model` arguments of both columns (recorded for `load`).

    Raises:
        ProgressiveError: the architecture has no `feature_info`, or the two columns' stages differ.
    """

    def __init__(
        self,
        source: nn.Module,
        column: nn.Module,
        num_classes: int,
        *,
        arch: str,
        create_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.create_kwargs = dict(create_kwargs or {})
        self.stages = stage_names(source, arch)
        if stage_names(column, arch) != self.stages:
            raise ProgressiveError(f"progressive: the new column of '{arch}' has other stages than the source")
        self.source = source
        self.column = column
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.source.eval()
        self.adapters = nn.ModuleList(
            lateral_adapter(i, o) for i, o in zip(_channels(source), _channels(column), strict=True)
        )
        # timm's pre-logits width (`head_hidden_size` where a head has layers after the pooling, MobileNetV3)
        self.num_features = _pre_logits_width(column) + _pre_logits_width(source)
        self.head_hidden_size = self.num_features
        self.num_classes = 0
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        self.pretrained_cfg = {**(getattr(column, "pretrained_cfg", None) or {}), "classifier": HEAD}
        self.default_cfg = self.pretrained_cfg

    # --- the source column: frozen, always in eval mode -------------------------------------------------
    def train(self, mode: bool = True) -> ProgressiveNet:
        """Train mode for the new column, the adapters and the head; the source column stays in eval mode (its
        BatchNorm statistics and dropout are the source's, whatever the caller asks)."""
        super().train(mode)
        self.source.eval()
        return self

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The source network's own output (its source-task logits when it has a classifier), unchanged by
        training: the source column is frozen."""
        with torch.no_grad():
            return self.source(x)

    # --- timm's interface -------------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """A fresh linear head of `num_classes` outputs on the concatenated features (0: Identity)."""
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The two columns' final feature maps concatenated on the channel axis (new column first)."""
        taps: list[torch.Tensor] = []
        src = dict(self.source.named_modules())
        col = dict(self.column.named_modules())

        def record(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            taps.append(out)

        handles = [src[n].register_forward_hook(record) for n in self.stages]
        try:
            with torch.no_grad():  # frozen: no graph, no saved activations
                source_map = self.source.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        if len(taps) != len(self.stages):
            raise ProgressiveError(
                f"progressive: {len(taps)} of the {len(self.stages)} stages of '{self.arch}' ran in the source column"
            )
        handles = [col[n].register_forward_hook(self._inject_hook(i, n, taps)) for i, n in enumerate(self.stages)]
        try:
            column_map = self.column.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        if column_map.dim() != 4 or column_map.shape[1:] != source_map.shape[1:]:
            raise ProgressiveError(
                f"progressive: '{self.arch}' features {tuple(column_map.shape)} / {tuple(source_map.shape)} are not "
                "two feature maps of one size"
            )
        return torch.cat([column_map, source_map], dim=1)

    def _inject_hook(self, i: int, name: str, taps: list[torch.Tensor]):
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ProgressiveError(
                    f"progressive: stage '{name}' of '{self.arch}' outputs {shape}, not an (N, C, H, W) feature map; "
                    "lateral 1x1 convolutions need a convolutional network"
                )
            return out + self.adapters[i](taps[i])

        return hook

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Each column's own pooling (and whatever its head does before the classifier) on its half of `x`,
        concatenated; then the linear head unless `pre_logits`."""
        half = x.shape[1] // 2  # the same architecture twice: equal widths
        column_map, source_map = x[:, :half], x[:, half:]
        h_new = self.column.forward_head(column_map, pre_logits=True)
        with torch.no_grad():
            h_src = self.source.forward_head(source_map, pre_logits=True)
        feats = torch.cat([h_new.flatten(1), h_src.flatten(1)], dim=1)
        return feats if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

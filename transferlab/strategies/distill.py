"""`distill`: knowledge distillation (Hinton, Vinyals, Dean 2015) from a larger fine-tuned teacher into
the selected (smaller) source.

Honest about its cost: the teacher is fine-tuned first (`finetune_full` on the teacher source for
`teacher_epochs`), inside this strategy, so the stage trains two networks. The student then trains on
`alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)` with the teacher in eval mode on the
same (augmented) batch. Only the student is saved: what you deploy is the small model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, load_source, with_new_head
from transferlab.params import SourceSpec
from transferlab.strategies.base import Strategy, StrategyConfig, head_names, register_strategy

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


class DistillConfig(StrategyConfig):
    # Lite2 is the largest packaged ImageNet source: the natural teacher for lite0 offline.
    teacher: SourceSpec = Field(
        SourceSpec(kind="packaged", arch="efficientnet_lite2"), description="the teacher's source (a source spec)"
    )
    teacher_epochs: int = Field(3, ge=1, description="epochs of full fine-tuning of the teacher on the target")
    teacher_lr: float = Field(1e-3, gt=0)
    # T=4 and an even mix are the usual starting point for small-data distillation.
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the soft targets")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label cross-entropy")
    backbone_lr_mult: float = Field(0.3, gt=0, le=1, description="student backbone lr = lr * this")


@register_strategy
class Distill(Strategy):
    name = "distill"
    modalities = ("image",)  # the teacher is an image source
    summary = "student fine-tuned on labels + a fine-tuned larger teacher's soft targets"
    Config = DistillConfig

    def __init__(self) -> None:
        self.teacher: nn.Module | None = None
        self._device: torch.device | None = None  # where the teacher trains; None: the CPU

    def build(self, source: SourceModel, num_classes: int, cfg: DistillConfig, seed: int) -> nn.Module:
        import torch

        from transferlab.strategies import get_strategy, strategy_config

        # Imported here: training imports the strategy registry.
        from transferlab.training.loop import fit, image_batches

        teacher_source = load_source("teacher", cfg.teacher, seed=seed)
        ft = get_strategy("finetune_full")
        ft_cfg = strategy_config("teacher", {"kind": "finetune_full", "lr": cfg.teacher_lr, "backbone_lr_mult": 1.0})
        teacher = ft.build(teacher_source, num_classes, ft_cfg, seed)
        images, labels = self._data
        gen = torch.Generator().manual_seed(seed)
        result = fit(
            teacher,
            ft,
            ft_cfg,
            image_batches(images["train"], teacher_source, "crop_flip", gen),
            labels["train"],
            image_batches(images["val"], teacher_source, "none", gen),
            labels["val"],
            epochs=cfg.teacher_epochs,
            batch_size=32,
            patience=cfg.teacher_epochs,
            weight_decay=1e-4,
            generator=gen,
            label="distill:teacher",
            device=self._device,
        )
        log.info("teacher %s: best val accuracy %.4f", cfg.teacher.arch, result.best_val_accuracy)
        self.teacher_val_accuracy = result.best_val_accuracy
        self.teacher = result.model.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # Teacher and student may normalise differently: convert the student's batch for the teacher.
        # Kept on the teacher's device (the student's: both train on the device `set_data` named).
        device = next(self.teacher.parameters()).device
        self._norm = tuple(
            torch.tensor(v).view(1, 3, 1, 1).to(device)
            for v in (source.mean, source.std, teacher_source.mean, teacher_source.std)
        )
        return with_new_head(source.model, num_classes, seed)

    def set_data(self, images: dict, labels: dict, device: torch.device | None = None) -> None:
        """The target splits the teacher trains on, and the device it trains on (default: the CPU); called
        by `train_strategy` before `build`."""
        self._data = (images, labels)
        self._device = device

    def move_to(self, model: nn.Module, device: torch.device) -> None:
        """The teacher and its normalisation constants follow the student."""
        if self.teacher is not None:
            self.teacher.to(device)
            self._norm = tuple(t.to(device) for t in self._norm)

    def param_groups(self, model: nn.Module, cfg: DistillConfig) -> list[dict]:
        heads = set(head_names(model))
        return [
            {"params": [p for n, p in model.named_parameters() if n not in heads], "lr": cfg.lr * cfg.backbone_lr_mult},
            {"params": [p for n, p in model.named_parameters() if n in heads], "lr": cfg.lr},
        ]

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, cfg: DistillConfig
    ) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        hard = F.cross_entropy(logits, targets)
        if self.teacher is None:
            return hard
        s_mean, s_std, t_mean, t_std = self._norm
        with torch.no_grad():
            teacher_logits = self.teacher((inputs * s_std + s_mean - t_mean) / t_std)
        t = cfg.temperature
        soft = (
            F.kl_div(
                F.log_softmax(logits / t, 1),
                F.log_softmax(teacher_logits / t, 1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
        return cfg.alpha * hard + (1 - cfg.alpha) * soft

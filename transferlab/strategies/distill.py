"""`distill`: knowledge distillation (Hinton, Vinyals, Dean 2015) from a larger fine-tuned teacher into
the selected (smaller) source.

Honest about its cost: the teacher is fine-tuned first (`finetune_full` on the teacher source for
`teacher_epochs`, by the training layer with the run's own recipe: see `teacher_spec`), so the stage trains
two networks. The student then trains on `alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T ||
student_T)` with the teacher in eval mode on the same (augmented) batch. Only the student is saved: what you
deploy is the small model.

Stateless, like every registered strategy: the trained teacher and the normalisation constants of a run
live in the `DistillState` that `start_run` returns, which travels in the call to `loss` and `move_to`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from transferlab.models.sources import SourceModel, with_new_head
from transferlab.params import SourceSpec
from transferlab.strategies.base import (
    Strategy,
    StrategyConfig,
    Teacher,
    TeacherSpec,
    head_names,
    register_strategy,
)

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


@dataclass
class DistillState:
    """One run's teacher and the constants that turn a student batch into a teacher batch."""

    teacher: Callable[[torch.Tensor], torch.Tensor]  # the frozen teacher network (eval mode)
    # (student mean, student std, teacher mean, teacher std), each (1, 3, 1, 1), on the teacher's device
    norm: tuple[torch.Tensor, ...]
    teacher_val_accuracy: float


@register_strategy
class Distill(Strategy):
    name = "distill"
    modalities = ("image",)  # the teacher is an image source
    summary = "student fine-tuned on labels + a fine-tuned larger teacher's soft targets"
    Config = DistillConfig

    def teacher_spec(self, cfg: DistillConfig) -> TeacherSpec:
        """Full fine-tuning of `cfg.teacher` at `teacher_lr` (every layer at that rate) for `teacher_epochs`."""
        return TeacherSpec(
            source=cfg.teacher,
            kind="finetune_full",
            config={"lr": cfg.teacher_lr, "backbone_lr_mult": 1.0},
            epochs=cfg.teacher_epochs,
            label="distill:teacher",
        )

    def start_run(self, source: SourceModel, cfg: DistillConfig, teacher: Teacher | None) -> DistillState:
        """Freeze the run's teacher; teacher and student may normalise differently, so keep the constants that
        convert the student's batch for the teacher (on the teacher's device; `move_to` moves both)."""
        import torch

        if teacher is None:
            raise ValueError("distill: no teacher was trained for this run (the training layer calls teacher_spec)")
        log.info("teacher %s: best val accuracy %.4f", cfg.teacher.arch, teacher.val_accuracy)
        model = teacher.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        norm = tuple(
            torch.tensor(v).view(1, 3, 1, 1).to(device)
            for v in (source.mean, source.std, teacher.source.mean, teacher.source.std)
        )
        return DistillState(teacher=model, norm=norm, teacher_val_accuracy=teacher.val_accuracy)

    def build(self, source: SourceModel, num_classes: int, cfg: DistillConfig, seed: int) -> nn.Module:
        return with_new_head(source.model, num_classes, seed)

    def move_to(self, model: nn.Module, device: torch.device, state: DistillState | None = None) -> None:
        """The run's teacher and its normalisation constants follow the student."""
        if state is not None:
            state.teacher.to(device)
            state.norm = tuple(t.to(device) for t in state.norm)

    def param_groups(self, model: nn.Module, cfg: DistillConfig) -> list[dict]:
        heads = set(head_names(model))
        return [
            {"params": [p for n, p in model.named_parameters() if n not in heads], "lr": cfg.lr * cfg.backbone_lr_mult},
            {"params": [p for n, p in model.named_parameters() if n in heads], "lr": cfg.lr},
        ]

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        cfg: DistillConfig,
        state: DistillState | None = None,
    ) -> torch.Tensor:
        """The hard-label cross-entropy mixed with the teacher's soft targets (the plain cross-entropy when
        there is no run state, e.g. a model evaluated outside training)."""
        import torch
        import torch.nn.functional as F

        hard = F.cross_entropy(logits, targets)
        if state is None:
            return hard
        s_mean, s_std, t_mean, t_std = state.norm
        with torch.no_grad():
            teacher_logits = state.teacher((inputs * s_std + s_mean - t_mean) / t_std)
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

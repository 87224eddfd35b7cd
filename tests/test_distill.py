"""Knowledge distillation: the teacher is really fine-tuned and frozen, the loss mixes hard and soft targets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.protocol import train_strategy

TEACHER = {"kind": "random_init", "arch": "test_resnet"}  # small, so the test stays fast


def test_distill_trains_a_frozen_teacher_and_saves_only_the_student(tiny_source, tiny_data, tmp_path):
    cfg = strategy_config("distill", {"epochs": 1, "teacher": TEACHER, "teacher_epochs": 2})
    strategy = get_strategy("distill")
    result = train_strategy(
        strategy,
        cfg,
        copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        epochs=1,
        batch_size=8,
        patience=1,
        weight_decay=0.0,
        augment="none",
        seed=0,
        generator=seed_everything(0),
    )
    assert strategy.teacher is not None and not any(p.requires_grad for p in strategy.teacher.parameters())
    assert 0.0 <= strategy.teacher_val_accuracy <= 1.0
    assert strategy.teacher.fc.out_features == 3  # the teacher got a target head and was fine-tuned
    student_keys = set(result.model.state_dict())
    assert any(k.startswith("conv_stem") for k in student_keys)  # test_efficientnet, not the resnet teacher
    assert not any(k.startswith("layer1") for k in student_keys)


def test_distill_loss_mixes_hard_and_soft_targets():
    strategy = get_strategy("distill")
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    inputs = torch.zeros(6, 3, 8, 8)
    strategy.teacher = lambda x: logits.clone()  # a teacher that agrees exactly with the student
    one = torch.ones(1, 3, 1, 1)
    strategy._norm = (0 * one, one, 0 * one, one)
    hard = F.cross_entropy(logits, targets)
    only_hard = strategy_config("distill", {"alpha": 1.0})
    assert torch.allclose(strategy.loss(logits, targets, inputs, only_hard), hard)
    only_soft = strategy_config("distill", {"alpha": 0.0})
    assert strategy.loss(logits, targets, inputs, only_soft).abs() < 1e-6  # KL(p || p) = 0
    strategy.teacher = lambda x: -logits  # a teacher that disagrees
    assert strategy.loss(logits, targets, inputs, only_soft) > 0.1
    strategy.teacher = None


def test_distill_config_rejects_bad_values():
    with pytest.raises(ValueError, match="strategies.distill.temperature"):
        strategy_config("distill", {"temperature": 0})

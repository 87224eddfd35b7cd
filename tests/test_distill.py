"""Knowledge distillation: the teacher is really fine-tuned (by the training layer, with the run's recipe) and
frozen, the loss mixes hard and soft targets, and the shared strategy instance keeps no per-run state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.strategies.distill import DistillState
from transferlab.training import protocol
from transferlab.training.protocol import TrainRecipe, train_strategy

TEACHER = {"kind": "random_init", "arch": "test_resnet"}  # small, so the test stays fast
RECIPE = TrainRecipe(epochs=1, batch_size=8, patience=1, weight_decay=0.0)


def _distill(tiny_source, tiny_data, recipe=RECIPE):
    cfg = strategy_config("distill", {"epochs": 1, "teacher": TEACHER, "teacher_epochs": 2})
    return train_strategy(
        get_strategy("distill"),
        cfg,
        copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        recipe,
        seed=0,
        generator=seed_everything(0),
    )


def test_distill_trains_a_frozen_teacher_and_saves_only_the_student(tiny_source, tiny_data, monkeypatch):
    states, teacher_recipes = [], []
    strategy = get_strategy("distill")
    start_run, run_teacher = strategy.start_run, protocol.train_strategy

    def record_state(*args):
        states.append(start_run(*args))
        return states[-1]

    def record_recipe(strategy, cfg, source, images, labels, num_classes, recipe, **kw):
        teacher_recipes.append((strategy.name, recipe))
        return run_teacher(strategy, cfg, source, images, labels, num_classes, recipe, **kw)

    monkeypatch.setattr(strategy, "start_run", record_state)
    monkeypatch.setattr(protocol, "train_strategy", record_recipe)  # the teacher's run (the student's is direct)
    recipe = TrainRecipe(epochs=1, batch_size=6, patience=1, weight_decay=0.01, augment="crop")
    result = _distill(tiny_source, tiny_data, recipe)
    (state,) = states
    assert isinstance(state, DistillState)
    assert not any(p.requires_grad for p in state.teacher.parameters()) and not state.teacher.training
    assert 0.0 <= state.teacher_val_accuracy <= 1.0
    assert state.teacher.fc.out_features == 3  # the teacher got a target head and was fine-tuned
    # The teacher trained with the run's recipe (batch size, weight decay, augmentation), at its own budget.
    assert teacher_recipes == [("finetune_full", recipe.short_run(2))]
    student_keys = set(result.model.state_dict())
    assert any(k.startswith("conv_stem") for k in student_keys)  # test_efficientnet, not the resnet teacher
    assert not any(k.startswith("layer1") for k in student_keys)


def test_distill_keeps_no_state_on_the_registered_instance_and_reruns_identically(tiny_source, tiny_data):
    """Stateless like a scikit-learn estimator: two runs leave the shared instance as it was, and give the
    same student (nothing of the first run's teacher leaks into the second)."""
    strategy = get_strategy("distill")
    before = dict(vars(strategy))
    a = _distill(tiny_source, tiny_data)
    assert vars(strategy) == before
    b = _distill(tiny_source, tiny_data)
    assert vars(strategy) == before
    assert a.history == b.history
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_distill_loss_mixes_hard_and_soft_targets():
    strategy = get_strategy("distill")
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    inputs = torch.zeros(6, 3, 8, 8)
    one = torch.ones(1, 3, 1, 1)
    norm = (0 * one, one, 0 * one, one)
    agrees = DistillState(teacher=lambda x: logits.clone(), norm=norm, teacher_val_accuracy=1.0)
    disagrees = DistillState(teacher=lambda x: -logits, norm=norm, teacher_val_accuracy=0.0)
    hard = F.cross_entropy(logits, targets)
    only_hard = strategy_config("distill", {"alpha": 1.0})
    assert torch.allclose(strategy.loss(logits, targets, inputs, only_hard, agrees), hard)
    only_soft = strategy_config("distill", {"alpha": 0.0})
    assert strategy.loss(logits, targets, inputs, only_soft, agrees).abs() < 1e-6  # KL(p || p) = 0
    assert strategy.loss(logits, targets, inputs, only_soft, disagrees) > 0.1
    assert torch.allclose(strategy.loss(logits, targets, inputs, only_soft), hard)  # no run state: labels only


def test_distill_config_rejects_bad_values():
    with pytest.raises(ValueError, match="strategies.distill.temperature"):
        strategy_config("distill", {"temperature": 0})

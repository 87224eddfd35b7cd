"""Targeted checks of gradual_unfreeze, discriminative_lr, l2sp and adabn: what trains when, at which
learning rate, and what must stay put. (Training, saving and exact reloading are covered for every
registered strategy by tests/test_strategies.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm

from transferlab.core.seeding import seed_everything
from transferlab.models.inference import to_input
from transferlab.models.sources import block_groups
from transferlab.strategies import get_strategy, strategy_config
from transferlab.strategies.adabn import reestimate_bn_stats
from transferlab.training.loop import fit, image_batches
from transferlab.training.protocol import TrainRecipe


def _fit(strategy, cfg, model, source, data, epochs, weight_decay=0.0):
    """The real training loop; patience high so that every requested epoch runs."""
    gen = seed_everything(0)
    return fit(
        model,
        strategy,
        cfg,
        image_batches(data["images"]["train"], source, "crop_flip", gen),
        data["labels"]["train"],
        image_batches(data["images"]["val"], source, "none", gen),
        data["labels"]["val"],
        TrainRecipe(epochs=epochs, batch_size=8, patience=100, weight_decay=weight_decay),
        generator=gen,
        label=strategy.name,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _recording(strategy, snapshots: dict):
    """`strategy` that also stores the weights at each epoch's start (= the end of the epoch before)."""

    class Recording(type(strategy)):
        def on_epoch_start(self, model, epoch, cfg, optimizer):
            snapshots[epoch] = _state(model)
            super().on_epoch_start(model, epoch, cfg, optimizer)

    return Recording()


def _train_batch(source, data):
    x = to_input(data["images"]["train"], source.mean, source.std)
    return x, torch.as_tensor(data["labels"]["train"])


# --- gradual_unfreeze ---------------------------------------------------------------------------------


def test_gradual_unfreeze_thaws_one_group_per_epoch_from_the_top(tiny_source, tiny_data):
    strategy = get_strategy("gradual_unfreeze")
    cfg = strategy_config("gradual_unfreeze", {"lr": 1e-2, "backbone_lr_mult": 1.0})
    model = strategy.build(tiny_source, 3, cfg, 0)
    groups = block_groups(model)
    assert len(groups) >= 4  # stem, >= 2 stages, head: epoch 2 must leave the stem frozen
    start = _state(model)
    snapshots = {}
    # Weight decay on: a frozen parameter must not even be decayed (it gets no grad, AdamW skips it).
    _fit(_recording(strategy, snapshots), cfg, model, tiny_source, tiny_data, epochs=3, weight_decay=0.05)

    head, top = set(groups[-1]), set(groups[-2])
    below = {n for g in groups[:-2] for n in g}
    # Epoch 1: the head alone; every backbone weight and every BatchNorm statistic as built.
    assert _changed(start, snapshots[2]) == head
    # Epoch 2: the top block group too (its weights and, back in train mode, its BN statistics), nothing below.
    after2 = _changed(start, snapshots[3])
    assert head <= after2
    assert after2 - head and {k.rsplit(".", 1)[0] for k in after2 - head} <= {n.rsplit(".", 1)[0] for n in top}
    assert not after2 & below
    assert torch.equal(start["bn1.running_mean"], snapshots[3]["bn1.running_mean"])  # stem BN untouched


def test_gradual_unfreeze_schedule_and_optimizer_holds_every_parameter(tiny_source):
    strategy = get_strategy("gradual_unfreeze")
    cfg = strategy_config("gradual_unfreeze", {"groups_per_epoch": 2})
    model = strategy.build(tiny_source, 3, cfg, 0)
    groups = block_groups(model)
    in_optimizer = [id(p) for g in strategy.param_groups(model, cfg) for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.parameters())  # frozen ones included

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == set(groups[-1])
    strategy.on_epoch_start(model, 2, cfg, None)
    assert trainable() == {n for g in groups[-3:] for n in g}  # head + 2 groups
    strategy.on_epoch_start(model, 2, cfg, None)  # idempotent
    assert trainable() == {n for g in groups[-3:] for n in g}
    strategy.on_epoch_start(model, 99, cfg, None)
    assert trainable() == {n for n, _ in model.named_parameters()}
    strategy.on_epoch_start(model, 1, cfg, None)
    assert trainable() == set(groups[-1])


# --- discriminative_lr --------------------------------------------------------------------------------


def test_discriminative_lr_decays_per_group_from_head_to_stem(tiny_source, tiny_data):
    strategy = get_strategy("discriminative_lr")
    cfg = strategy_config("discriminative_lr", {"lr": 1e-2, "decay": 0.5})
    model = strategy.build(tiny_source, 3, cfg, 0)
    groups = block_groups(model)
    pgs = strategy.param_groups(model, cfg)
    assert len(pgs) == len(groups) >= 4

    lrs = [g["lr"] for g in reversed(pgs)]  # head first
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs == pytest.approx([1e-2 * 0.5**i for i in range(len(lrs))], rel=1e-12)
    assert {id(p) for p in pgs[-1]["params"]} == {id(p) for p in model.get_classifier().parameters()}
    ids = [id(p) for g in pgs for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())

    # The rates are really applied: Adam's first step moves each weight by about its group's lr, so the
    # largest move per group follows the same ratios.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(pgs, weight_decay=0.0)
    x, y = _train_batch(tiny_source, tiny_data)
    model.train()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    moves = [max(float((params[n].detach() - before[n]).abs().max()) for n in g) for g in groups]
    assert moves[::-1] == pytest.approx(lrs, rel=1e-3)


# --- l2sp ---------------------------------------------------------------------------------------------


def test_l2sp_penalty_is_zero_at_the_source_and_grows_after_a_step(tiny_source, tiny_data):
    strategy = get_strategy("l2sp")
    cfg = strategy_config("l2sp", {"beta": 0.0, "lr": 1e-2})
    model = strategy.build(tiny_source, 3, cfg, 0)
    assert strategy.penalty(model, cfg).item() == 0.0

    # beta alone: beta/2 * ||head||^2 (the backbone term is still 0).
    head = model.get_classifier()
    both = strategy_config("l2sp", {"alpha": 1.0, "beta": 0.5})
    expected = 0.25 * float((head.weight.detach() ** 2).sum() + (head.bias.detach() ** 2).sum())
    assert strategy.penalty(model, both).item() == pytest.approx(expected, rel=1e-5)

    optimizer = torch.optim.AdamW(strategy.param_groups(model, cfg))
    x, y = _train_batch(tiny_source, tiny_data)
    model.train()
    (F.cross_entropy(model(x), y) + strategy.penalty(model, cfg)).backward()
    optimizer.step()
    assert strategy.penalty(model, cfg).item() > 0
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # the penalty replaces decay to 0


def test_l2sp_saves_the_plain_network(tiny_source, tmp_path):
    strategy = get_strategy("l2sp")
    cfg = strategy_config("l2sp", {})
    model = strategy.build(tiny_source, 3, cfg, 0)
    plain = timm.create_model(tiny_source.arch, pretrained=False, num_classes=3)
    assert set(model.state_dict()) == set(plain.state_dict())
    reference = model.l2sp_reference
    assert set(reference) == {n for n, _ in model.named_parameters()} - {"classifier.weight", "classifier.bias"}
    assert all(not t.requires_grad for t in reference.values())
    strategy.save(model, tmp_path, {"arch": tiny_source.arch, "num_classes": 3})
    saved = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == set(plain.state_dict())


def test_l2sp_huge_alpha_keeps_the_backbone_near_the_source(tiny_source, tiny_data):
    strategy = get_strategy("l2sp")
    drift = {}
    for alpha in (0.0, 1e4):
        source = copy.deepcopy(tiny_source)
        cfg = strategy_config("l2sp", {"alpha": alpha, "beta": 0.0, "lr": 1e-2, "backbone_lr_mult": 1.0})
        model = strategy.build(source, 3, cfg, 0)
        w0 = {n: t.clone() for n, t in model.l2sp_reference.items()}
        snapshots = {}
        # Weights after epoch 1 (fit itself returns the best epoch's, which may differ between runs).
        _fit(_recording(strategy, snapshots), cfg, model, source, tiny_data, epochs=2)
        drift[alpha] = float(sum(((snapshots[2][n] - w) ** 2).sum() for n, w in w0.items()).sqrt())
    assert 0 < drift[1e4] < 0.5 * drift[0.0]  # measured: ~0.8 vs ~5.6


# --- adabn --------------------------------------------------------------------------------------------


def _bn_inputs_eval(model, images, source, layers):
    """Independent reference: the inputs each named BN layer receives when the ADAPTED model runs in eval
    mode over the whole set (what it computes at inference), as float64 numpy arrays."""
    mods = dict(model.named_modules())
    seen = {n: [] for n in layers}
    handles = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().double().numpy()))
        for n in layers
    ]
    model.eval()
    with torch.no_grad():
        model(to_input(images, source.mean, source.std))
    for h in handles:
        h.remove()
    return {n: np.concatenate(v) for n, v in seen.items()}


@pytest.mark.parametrize("budget,expected_mode", [(2**40, "full_batch"), (0, "layer_by_layer")])
def test_adabn_statistics_are_exact_population_statistics_of_every_layer(tiny_source, tiny_data, budget, expected_mode):
    model = get_strategy("adabn").build(tiny_source, 3, strategy_config("adabn", {}), 0)
    images = tiny_data["images"]["train"]  # stored class by class: a batch of 8 holds one class only
    assert (tiny_data["labels"]["train"][:8] == 0).all()
    inputs = image_batches(images, tiny_source, "crop_flip", seed_everything(0))  # must be asked for clean ones
    bns = [n for n, m in model.named_modules() if isinstance(m, BatchNorm)]
    first, deep = bns[0], bns[-1]
    mode = reestimate_bn_stats(model, inputs, len(images), batch_size=8, max_full_batch_bytes=budget)
    assert mode == expected_mode
    mods = dict(model.named_modules())
    ref = _bn_inputs_eval(model, images, tiny_source, [first, deep])
    for name in (first, deep):
        x = ref[name]
        mean, var = np.mean(x, axis=(0, 2, 3)), np.var(x, axis=(0, 2, 3))
        np.testing.assert_allclose(mods[name].running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mods[name].running_var.numpy(), var, rtol=1e-4, atol=1e-6)
    assert all(m.momentum == 0.1 and not m.training for m in model.modules() if isinstance(m, BatchNorm))


def test_adabn_class_chunked_cumulative_average_is_not_exact(tiny_source, tiny_data):
    """The check above has teeth: PyTorch's cumulative average over class-by-class batches (the old way)
    misses the deep layer's variance by far more than the tolerance."""
    model = get_strategy("adabn").build(tiny_source, 3, strategy_config("adabn", {}), 0)
    images = tiny_data["images"]["train"]
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.momentum = None
            m.reset_running_stats()
            m.train()
        for i in range(0, len(images), 8):
            model(to_input(images[i : i + 8], tiny_source.mean, tiny_source.std))
    deep = [n for n, m in model.named_modules() if isinstance(m, BatchNorm)][-1]
    x = _bn_inputs_eval(model, images, tiny_source, [deep])[deep]
    var = np.var(x, axis=(0, 2, 3))
    assert not np.allclose(dict(model.named_modules())[deep].running_var.numpy(), var, rtol=1e-2)


def test_adabn_training_changes_only_the_head(tiny_source, tiny_data):
    strategy = get_strategy("adabn")
    cfg = strategy_config("adabn", {"epochs": 1})
    model = strategy.build(tiny_source, 3, cfg, 0)
    adapted = copy.deepcopy(model)
    images = tiny_data["images"]["train"]
    strategy.before_training(adapted, cfg, image_batches(images, tiny_source, "none", None), len(images))
    expected = _state(adapted)

    _fit(strategy, cfg, model, tiny_source, tiny_data, epochs=1)
    assert _changed(expected, _state(model)) == {"classifier.weight", "classifier.bias"}
    assert strategy.uses_features is False


def test_new_strategies_are_registered():
    names = ("gradual_unfreeze", "discriminative_lr", "l2sp", "adabn")
    assert all(get_strategy(n).name == n for n in names)
    assert all(np.isfinite(strategy_config(n, {}).lr) for n in names)

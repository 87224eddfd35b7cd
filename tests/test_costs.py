"""Cost profile of a source model: parameters, FLOPs, training-memory estimate and latency."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from transferlab.models import costs


def _timm(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


@pytest.fixture(scope="module")
def effnet() -> nn.Module:
    return _timm("test_efficientnet", 10)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _timm("test_resnet", 10)


def _conv_linear() -> nn.Module:
    # On a 3x32x32 image: conv 3->4, k=3, no padding -> 4x30x30 = 3600 features -> linear 3600->5.
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))


def _snapshot(model: nn.Module) -> tuple[dict, list, list]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model: nn.Module, snap: tuple[dict, list, list]) -> None:
    state, flags, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads


# --- parameters and FLOPs -------------------------------------------------------------------------------------------


def test_count_parameters_by_hand_and_on_timm(effnet: nn.Module) -> None:
    # conv: 4*3*3*3 weights + 4 biases = 112; linear: 3600*5 + 5 = 18005
    assert costs.count_parameters(_conv_linear()) == 112 + 18005
    assert costs.count_parameters(effnet) == sum(p.numel() for p in effnet.parameters())


def test_count_parameters_trainable_only() -> None:
    model = _conv_linear()
    model[0].requires_grad_(False)  # the conv: 112 parameters frozen
    assert costs.count_parameters(model, trainable_only=True) == 18005
    assert costs.count_parameters(model) == 112 + 18005


def test_flops_by_hand_for_plain_modules() -> None:
    # torch counts a multiply-add as 2 FLOPs and skips biases / activations:
    # conv: 2 * Cout * Hout * Wout * Cin * k * k = 2 * 4 * 30 * 30 * 3 * 3 * 3 = 194_400
    # linear: 2 * in * out = 2 * 3600 * 5 = 36_000
    assert costs.flops_per_image(_conv_linear(), 32) == 194_400 + 36_000
    # a linear-only model on a 3x4x4 image: 2 * 48 * 5 = 480
    assert costs.flops_per_image(nn.Sequential(nn.Flatten(), nn.Linear(48, 5)), 4) == 480


@pytest.mark.parametrize("name", ["effnet", "resnet"])
def test_flops_scale_with_area_and_are_deterministic(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    model.train()
    snap = _snapshot(model)
    f32 = costs.flops_per_image(model, 32)
    f64 = costs.flops_per_image(model, 64)
    assert isinstance(f32, int) and f32 > 0
    assert 0.9 * 4 <= f64 / f32 <= 1.1 * 4
    assert costs.flops_per_image(model, 32) == f32
    _assert_unchanged(model, snap)  # still in train mode, weights and BN statistics untouched


def test_flops_work_without_classifier() -> None:
    headless = _timm("test_efficientnet", 0)
    with_head = _timm("test_efficientnet", 10)
    assert 0 < costs.flops_per_image(headless, 32) < costs.flops_per_image(with_head, 32)


# --- training-step memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_train_step_memory_is_deterministic_and_leaves_model_alone(resnet: nn.Module, training: bool) -> None:
    resnet.train(training)
    resnet.fc.weight.requires_grad_(False)  # a partly frozen caller model stays partly frozen
    try:
        snap = _snapshot(resnet)
        rng = torch.get_rng_state()
        a = costs.train_step_memory_bytes(resnet, 32, batch_size=8)
        b = costs.train_step_memory_bytes(resnet, 32, batch_size=8)
        assert a == b
        _assert_unchanged(resnet, snap)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed
    finally:
        resnet.fc.weight.requires_grad_(True)
        resnet.train()


def test_train_step_memory_accounting(effnet: nn.Module) -> None:
    mem = costs.train_step_memory_bytes(effnet, 32, batch_size=8)
    assert set(mem) >= {"params_bytes", "optimizer_state_bytes", "activation_bytes", "total_bytes"}
    assert all(isinstance(v, int) for v in mem.values())
    n = costs.count_parameters(effnet)
    assert mem["params_bytes"] == 4 * n  # float32
    assert mem["optimizer_state_bytes"] == 3 * mem["params_bytes"]  # gradients + 2 Adam moments
    assert mem["input_bytes"] == 8 * 3 * 32 * 32 * 4 + 8 * 8  # float32 images + int64 labels
    assert mem["activation_bytes"] > 0
    parts = ("params_bytes", "optimizer_state_bytes", "activation_bytes", "input_bytes")
    assert mem["total_bytes"] == sum(mem[k] for k in parts)


def test_train_step_memory_activations_grow_linearly_with_batch(effnet: nn.Module) -> None:
    small = costs.train_step_memory_bytes(effnet, 32, batch_size=16)
    big = costs.train_step_memory_bytes(effnet, 32, batch_size=32)
    assert 1.7 <= big["activation_bytes"] / small["activation_bytes"] <= 2.3
    assert big["params_bytes"] == small["params_bytes"]


def test_train_step_memory_adds_a_head_to_a_headless_model() -> None:
    headless = _timm("test_efficientnet", 0)
    snap = _snapshot(headless)
    mem = costs.train_step_memory_bytes(headless, 32, batch_size=4, num_classes=7)
    assert mem["params_bytes"] == 4 * costs.count_parameters(_timm("test_efficientnet", 7))
    assert headless.num_classes == 0
    _assert_unchanged(headless, snap)


# --- latency --------------------------------------------------------------------------------------------------------


def test_latency_is_positive_finite_and_restores_mode() -> None:
    model = _conv_linear().train()
    for batch in (1, 4):
        value = costs.latency_ms(model, 32, batch, repeats=2, warmup=1)
        assert math.isfinite(value) and value > 0
    assert model.training


def test_latency_is_per_image_median_and_honours_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 0.0}

    def fake_perf_counter() -> float:  # every forward pass "takes" 64 ms
        clock["now"] += 0.064
        return clock["now"]

    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=fake_perf_counter))
    model = _conv_linear()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert costs.latency_ms(model, 32, 32, repeats=5, warmup=3) == pytest.approx(64.0 / 32)
    assert len(calls) == 3 + 5
    assert costs.latency_ms(model, 32, 1, repeats=2, warmup=0) == pytest.approx(64.0)


def test_latency_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        costs.latency_ms(_conv_linear(), 32, 0)
    with pytest.raises(ValueError):
        costs.latency_ms(_conv_linear(), 32, 1, repeats=0)
    with pytest.raises(ValueError, match="image_size"):
        costs.latency_ms(_conv_linear(), None, 1)
    with pytest.raises(ValueError, match="example"):
        costs.latency_ms(_conv_linear(), None, 1, example=torch.zeros(0, 3, 32, 32))


def test_latency_times_a_real_example_tiled_to_the_batch() -> None:
    """evaluate@'s setting: the first test images, repeated when fewer than the batch."""
    model = _conv_linear()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    example = torch.arange(3 * 3 * 32 * 32, dtype=torch.float64).reshape(3, 3, 32, 32)
    assert costs.latency_ms(model, None, 5, repeats=1, warmup=1, example=example) > 0
    assert len(seen) == 2 and all(x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 for x in seen)
    assert torch.equal(seen[0][3:], example[:2].float()) and torch.equal(seen[0][:3], example.float())
    ids = torch.randint(0, 100, (4, 7))  # token ids keep their integer type
    assert costs.latency_ms(nn.Embedding(100, 2), None, 2, repeats=1, warmup=0, example=ids) > 0


# --- the profile ----------------------------------------------------------------------------------------------------


def test_cost_profile_keys_and_determinism(effnet: nn.Module) -> None:
    det, timed = costs.cost_profile(effnet, 32, latency_repeats=1)
    assert set(det) == {
        "params",
        "params_millions",
        "flops_per_image",
        "gflops_per_image",
        "train_step_memory_mb",
        "activation_memory_mb",
    }
    assert set(timed) == {"latency_ms_batch1", "latency_ms_batch32"}
    assert det["params"] == costs.count_parameters(effnet)
    assert det["params_millions"] == round(det["params"] / 1e6, 4)
    assert det["flops_per_image"] == costs.flops_per_image(effnet, 32)
    mem = costs.train_step_memory_bytes(effnet, 32)
    assert det["train_step_memory_mb"] == round(mem["total_bytes"] / 2**20, 2)
    assert det["activation_memory_mb"] == round(mem["activation_bytes"] / 2**20, 2)
    assert all(math.isfinite(v) and v > 0 for v in timed.values())
    det2, _ = costs.cost_profile(effnet, 32, latency_repeats=1)
    assert det2 == det


def test_train_flops_charge_frozen_layers_forward_only():
    """Hand-counted on Linear(4, 8) -> ReLU -> Linear(8, 3): forward 2*4*8 + 2*8*3 = 112 FLOPs. All trainable:
    weight gradients 112 + the second layer's input gradient 48 (nothing below the first layer) = 160.
    First layer frozen: the second layer's weight gradient only, 48. Nothing trainable: forward only."""
    from transferlab.models.costs import train_flops_per_image

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.zeros(1, 4)
    assert train_flops_per_image(net, x) == {"forward": 112, "backward": 160, "total": 272}
    net[0].requires_grad_(False)
    assert train_flops_per_image(net, x) == {"forward": 112, "backward": 48, "total": 160}
    net[2].requires_grad_(False)
    assert train_flops_per_image(net, x) == {"forward": 112, "backward": 0, "total": 112}
    assert all(m.training for m in net.modules())  # the caller's flags are restored

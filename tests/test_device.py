"""`train.device`: resolution, the CPU path unchanged bit for bit, the mixed-precision helpers as no-ops on the
CPU, and what `auto` would pick on a machine with CUDA (simulated: this machine has no GPU)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import yaml

from transferlab.config import load_params
from transferlab.core.device import (
    NUMERICS_KEYS,
    DeviceError,
    autocast_context,
    device_info,
    device_tags,
    make_grad_scaler,
    resolve_device,
)
from transferlab.core.seeding import seed_everything
from transferlab.models.inference import predict_images
from transferlab.params import ParamsError
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.loop import fit, image_batches
from transferlab.training.protocol import TrainRecipe, train_strategy

ROOT = Path(__file__).resolve().parents[1]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


@needs_no_gpu
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@needs_no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_fails_naming_the_field_and_the_fix(spec):
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    msg = str(err.value)
    assert "train.device" in msg and f"'{spec}'" in msg and "auto" in msg and "cpu" in msg


def test_auto_takes_cuda_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_a_bad_device_string_fails_params_validation(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["train"]["device"] == "auto"
    for bad in ("gpu", "cuda:x", "CUDA", "mps"):
        raw["train"]["device"] = bad
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match=r"train\.device"):
            load_params(path)
    raw["train"]["device"] = "cuda:3"  # valid as a value; whether the machine has it is checked at run time
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).train.device == "cuda:3"


def test_resolving_a_bad_string_outside_params_also_fails():
    with pytest.raises(DeviceError, match="auto | cpu | cuda"):
        resolve_device("gpu0")


def test_amp_helpers_are_no_ops_on_the_cpu():
    cpu = torch.device("cpu")
    ctx = autocast_context(cpu)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    scaler = make_grad_scaler(cpu)
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0, requires_grad=True)
    assert scaler.scale(loss) is loss
    info = device_info(cpu)
    assert info["device"] == "cpu" and info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert set(info) <= set(NUMERICS_KEYS) and info["cpu_model"]
    assert device_tags(cpu)["device"] == "cpu" and device_tags(cpu)["device.threads"] == str(torch.get_num_threads())


def test_amp_on_cuda_picks_bf16_or_fp16_with_a_scaler(monkeypatch):
    """No GPU here: the choice is checked, not run (a disabled `enabled=False` gives plain fp32)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    from transferlab.core.device import amp_dtype

    assert amp_dtype(cuda) == torch.bfloat16
    assert isinstance(autocast_context(cuda, enabled=False), contextlib.nullcontext)
    assert not make_grad_scaler(cuda).is_enabled()  # bf16 needs no loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(cuda) == torch.float16
    assert not make_grad_scaler(cuda, enabled=False).is_enabled()
    assert amp_dtype(torch.device("cpu")) is None


def _fit_tiny(tiny_source, tiny_data, device=None):
    gen = seed_everything(0)
    strategy = get_strategy("finetune_full")
    cfg = strategy_config("finetune_full", {})
    model = strategy.build(copy.deepcopy(tiny_source), 3, cfg, 0)
    imgs, labels = tiny_data["images"], tiny_data["labels"]
    return fit(
        model,
        strategy,
        cfg,
        image_batches(imgs["train"], tiny_source, "crop_flip", gen),
        labels["train"],
        image_batches(imgs["val"], tiny_source, "none", gen),
        labels["val"],
        TrainRecipe(epochs=2, batch_size=8, patience=2, weight_decay=1e-4, device=device),
        generator=gen,
    )


def test_fit_on_an_explicit_cpu_is_bit_identical_to_fit_without_a_device(tiny_source, tiny_data):
    plain = _fit_tiny(tiny_source, tiny_data)
    on_cpu = _fit_tiny(tiny_source, tiny_data, device=torch.device("cpu"))
    assert plain.history == on_cpu.history
    a, b = plain.model.state_dict(), on_cpu.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logits = predict_images(plain.model, tiny_data["images"]["test"], tiny_source.mean, tiny_source.std)
    assert torch.equal(
        logits,
        predict_images(on_cpu.model, tiny_data["images"]["test"], tiny_source.mean, tiny_source.std, device="cpu"),
    )


@pytest.mark.parametrize("name", ["l2sp", "linear_probe"])
def test_train_strategy_hands_back_a_cpu_model(name, tiny_source, tiny_data):
    from transferlab.models.inference import extract

    features = None
    if get_strategy(name).uses_features:
        features = {
            s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std)[0]
            for s in ("train", "val")
        }
    res = train_strategy(
        get_strategy(name),
        strategy_config(name, {}),
        copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=1, batch_size=8, patience=1, weight_decay=0.0, device=torch.device("cpu")),
        seed=0,
        generator=seed_everything(0),
        features=features,
    )
    assert {p.device.type for p in res.model.parameters()} == {"cpu"}


def test_labels_and_batches_follow_the_model_to_its_device(tiny_source, tiny_data):
    """The meta device stands in for a GPU: every batch and label `fit` builds must arrive there, so a model
    left on the CPU by mistake would fail. Stops at the first loss (meta tensors hold no values)."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            seen.append(x.device.type)
            return x.flatten(1)[:, :3] * self.w

    class Stop(Exception):
        pass

    strategy = get_strategy("scratch")

    def loss(logits, targets, inputs, cfg, state=None):
        seen.append(targets.device.type)
        raise Stop

    gen = torch.Generator().manual_seed(0)
    model = Probe()
    orig = strategy.loss
    strategy.loss = loss
    try:
        with pytest.raises(Stop):
            fit(
                model,
                strategy,
                strategy_config("scratch", {}),
                image_batches(tiny_data["images"]["train"], tiny_source, "crop", gen),
                tiny_data["labels"]["train"],
                image_batches(tiny_data["images"]["val"], tiny_source, "none", gen),
                tiny_data["labels"]["val"],
                TrainRecipe(epochs=1, batch_size=8, patience=1, weight_decay=0.0, device=torch.device("meta")),
                generator=gen,
            )
    finally:
        del strategy.loss
    assert strategy.loss == orig
    assert seen == ["meta", "meta"] and model.w.device.type == "meta"
    # The generator stayed on the CPU: the same draws as a CPU run.
    assert gen.device.type == "cpu"


def test_params_validation_of_device_imports_no_torch():
    """`train.device` is checked with a regular expression: validation stays torch-free."""
    import subprocess
    import sys

    code = (
        "from transferlab.config import load_params\nimport sys\n"
        "p = load_params('params.yaml')\nassert p.train.device == 'auto'\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

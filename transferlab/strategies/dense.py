"""Strategies of the dense tasks (detection, segmentation): which parts of a `models.dense.DenseNet` train, at
which rates, from which weights.

A separate registry from the classification strategies of this package: a dense model is an encoder plus a
decoder and heads (no timm classifier), so `build`/`param_groups` differ. Each strategy declares the tasks it
supports (`tasks`); `dense_strategy_config` validates a `dense.strategies.<name>` entry against the registry
and the task, and names the valid strategies when a classification-only one (e.g. `linear_probe`) is listed.

Like `base.py`, importing this module imports no torch (params validation reads the configs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from torch import nn

DENSE_TASKS = ("detection", "segmentation")


class DenseStrategyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = Field(description="registered dense strategy name")
    lr: float = Field(3e-3, gt=0, le=10, description="learning rate of the decoder and heads (AdamW)")
    epochs: int | None = Field(None, ge=1, description="overrides dense.epochs for this strategy")


class DenseStrategy:
    """What trains in a dense model. Stateless: one shared instance per strategy."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = DENSE_TASKS
    Config: ClassVar[type[DenseStrategyConfig]] = DenseStrategyConfig
    pretrained: ClassVar[bool] = True  # False: the encoder starts from random weights (scratch)

    def epochs(self, cfg: DenseStrategyConfig, default: int) -> int:
        """The cosine schedule's length for this strategy."""
        return cfg.epochs or default

    def adapt(self, model: nn.Module, cfg: DenseStrategyConfig) -> None:
        """Change the architecture before training (LoRA adapters); default: nothing. Also applied when the
        trained model is rebuilt for evaluation, so a saved state dict fits."""

    def param_groups(self, model: nn.Module, cfg: DenseStrategyConfig) -> list[dict]:
        """Set `requires_grad` and return the optimizer's groups (default: everything at `cfg.lr`)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return [{"params": list(model.parameters()), "lr": cfg.lr}]


DENSE_STRATEGIES: dict[str, DenseStrategy] = {}


def register_dense_strategy(cls: type[DenseStrategy]) -> type[DenseStrategy]:
    DENSE_STRATEGIES[cls.name] = cls()
    return cls


def _decoder_params(model: nn.Module) -> list:
    return [p for n, p in model.named_parameters() if not n.startswith("encoder.")]


def _freeze_encoder(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("encoder."))


@register_dense_strategy
class HeadOnly(DenseStrategy):
    name = "head_only"
    summary = "frozen encoder, decoder and heads trained: the dense task's linear probe"

    def param_groups(self, model, cfg):
        _freeze_encoder(model)
        return [{"params": _decoder_params(model), "lr": cfg.lr}]


class FinetuneConfig(DenseStrategyConfig):
    # The pre-trained encoder moves slower than the new decoder (as the classification fine-tunes do).
    backbone_lr_mult: float = Field(0.3, gt=0, le=10, description="encoder lr = lr x this")


class FinetuneTopConfig(FinetuneConfig):
    k: int = Field(2, ge=1, description="the encoder's last k block stages train")


@register_dense_strategy
class FinetuneTop(DenseStrategy):
    name = "finetune_top"
    summary = "the encoder's last k block stages, the decoder and heads"
    Config = FinetuneTopConfig

    def param_groups(self, model, cfg):
        _freeze_encoder(model)
        stages = list(model.encoder.blocks)
        top = [p for stage in stages[-cfg.k :] for p in stage.parameters()]
        for p in top:
            p.requires_grad_(True)
        return [{"params": _decoder_params(model), "lr": cfg.lr}, {"params": top, "lr": cfg.lr * cfg.backbone_lr_mult}]


@register_dense_strategy
class FinetuneFull(DenseStrategy):
    name = "finetune_full"
    summary = "every weight, the encoder at lr x backbone_lr_mult"
    Config = FinetuneConfig

    def param_groups(self, model, cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
        return [{"params": _decoder_params(model), "lr": cfg.lr}, {"params": enc, "lr": cfg.lr * cfg.backbone_lr_mult}]


class DenseLoraConfig(DenseStrategyConfig):
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)


# The encoder's pointwise (1x1, groups=1) convolutions of every inverted-residual block: EfficientNet's dense
# layers. Depthwise 3x3 convolutions stay frozen (a low-rank update of a per-channel filter saves nothing).
LORA_TARGET_NAMES = ("conv_pw", "conv_pwl")


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the encoder's `conv_pw` / `conv_pwl` Conv2d layers (groups 1)."""
    from torch import nn

    return [
        n
        for n, m in model.named_modules()
        if n.startswith("encoder.")
        and n.split(".")[-1] in LORA_TARGET_NAMES
        and isinstance(m, nn.Conv2d)
        and m.groups == 1
    ]


@register_dense_strategy
class DenseLora(DenseStrategy):
    name = "lora"
    summary = "peft LoRA on the encoder's pointwise convolutions (conv_pw, conv_pwl), decoder and heads trained"
    Config = DenseLoraConfig

    def adapt(self, model, cfg):
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_target_modules(model)
        if not targets:
            raise ValueError("lora: the encoder has no conv_pw / conv_pwl Conv2d layers to adapt")
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
        inject_adapter_in_model(config, model)

    def param_groups(self, model, cfg):
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("encoder.") or "lora_" in n)
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]


class ScratchConfig(DenseStrategyConfig):
    # Random weights need more steps than a pre-trained encoder to fit: a longer cosine schedule, so the
    # comparison is not won by under-training (the report still marks a run still improving on validation).
    epochs_factor: float = Field(2.0, ge=1, description="schedule length = dense.epochs x this (unless `epochs`)")


@register_dense_strategy
class Scratch(DenseStrategy):
    name = "scratch"
    summary = "the same architecture from random weights, every weight trained, a longer cosine schedule"
    Config = ScratchConfig
    pretrained = False

    def epochs(self, cfg, default):
        return cfg.epochs or max(1, round(default * cfg.epochs_factor))


def dense_strategy_config(
    name: str, raw: dict[str, Any] | None, task: str, classification: Callable[[str], bool] | None = None
) -> DenseStrategyConfig:
    """Validate `dense.strategies.<name>` against the registry and the task.

    Args:
        name: the entry's key; its `kind` defaults to it.
        raw: the entry.
        task: `dense.task`.
        classification: tells whether a name is a classification strategy (a better message for those).

    Raises:
        ValueError: unknown kind (with the valid ones), a strategy that does not support `task`, or a bad key or
            value, naming `dense.strategies.<name>[.<key>]` and the fix.
    """
    raw = dict(raw or {})
    kind = raw.get("kind", name)
    if kind not in DENSE_STRATEGIES:
        if classification is not None and classification(kind):
            raise ValueError(
                f"dense.strategies.{name}: '{kind}' is a classification strategy (tasks: ['classification']) and "
                f"dense.task is '{task}': use one of {sorted(DENSE_STRATEGIES)} (head_only is the {task} linear "
                "probe), or remove the entry"
            )
        raise ValueError(
            f"dense.strategies.{name}: unknown dense strategy kind '{kind}' (valid: {sorted(DENSE_STRATEGIES)}; "
            "set `kind:` when the entry's name is not a strategy name)"
        )
    strategy = DENSE_STRATEGIES[kind]
    if task not in strategy.tasks:
        valid = sorted(n for n, s in DENSE_STRATEGIES.items() if task in s.tasks)
        raise ValueError(
            f"dense.strategies.{name}: '{kind}' supports {list(strategy.tasks)} only, and dense.task is '{task}': "
            f"use one of {valid}"
        )
    raw["kind"] = kind
    try:
        return strategy.Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(
                    f"dense.strategies.{name}.{loc}: unknown key (valid keys: {sorted(strategy.Config.model_fields)})"
                )
            else:
                problems.append(f"dense.strategies.{name}.{loc}: {e['msg']} (got {e.get('input')!r})")
        raise ValueError("; ".join(problems)) from None

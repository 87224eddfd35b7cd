"""`l2sp` (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer learning with
convolutional networks"): full fine-tuning, regularised toward the pre-trained weights instead of toward 0.

Every layer trains; the loss adds `alpha/2 * ||w - w0||^2` over the backbone (w0: the source's weights,
copied at build time) and `beta/2 * ||w_head||^2` over the new head. The copy lives in a plain attribute,
not a buffer, so `state_dict` (and the saved model) is the plain network. The optimizer's weight decay is
switched off: decay toward 0 is exactly the bias L2-SP replaces.

This is an AdamW variant of L2-SP, not the paper's recipe: the paper optimises with SGD with momentum
(0.9), while here the shared training loop (`transferlab.training.loop.fit`: AdamW with weight decay 0 on these
groups, cosine learning rate, early stopping) drives every strategy alike, so strategies differ only in
what they change. With Adam the penalty's gradient is rescaled per parameter like the data term, so the
effective pull toward w0 is not the paper's; alpha values tuned for the paper's SGD do not carry over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from transferlab.models.sources import SourceModel, with_new_head
from transferlab.strategies.base import Strategy, StrategyConfig, head_names, register_strategy

if TYPE_CHECKING:  # params validation imports this module for its Config: no torch at import
    import torch
    from torch import nn

REFERENCE_ATTR = "l2sp_reference"  # dict name -> pre-trained tensor; not a buffer, so not in state_dict


class L2spConfig(StrategyConfig):
    # The paper's values (alpha = beta = 0.01), which it found to work across its target tasks.
    alpha: float = Field(0.01, ge=0, description="weight of alpha/2 * ||w - w0||^2 on the backbone")
    beta: float = Field(0.01, ge=0, description="weight of beta/2 * ||w||^2 on the new head")
    # The same 10x rule as finetune_full: the penalty and a smaller step both keep the backbone near w0.
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="backbone lr = lr * backbone_lr_mult")


def _split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    heads = set(head_names(model))
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if n not in heads], [p for n, p in named if n in heads]


@register_strategy
class L2sp(Strategy):
    name = "l2sp"
    summary = "all layers trained, penalised toward the pre-trained weights (L2-SP, AdamW variant)"
    optimizer_note = "AdamW (weight decay 0), not the paper's SGD with momentum"
    Config = L2spConfig

    def build(self, source: SourceModel, num_classes: int, cfg: L2spConfig, seed: int) -> nn.Module:
        model = with_new_head(source.model, num_classes, seed)
        body, _ = _split(model)
        # A plain dict attribute (nn.Module registers only Parameters, buffers and submodules): the reference
        # is used by `penalty` but never saved.
        setattr(model, REFERENCE_ATTR, {n: p.detach().clone() for n, p in body})
        return model

    def param_groups(self, model: nn.Module, cfg: L2spConfig) -> list[dict]:
        body, head = _split(model)
        return [
            {"params": [p for _, p in body], "lr": cfg.lr * cfg.backbone_lr_mult, "weight_decay": 0.0},
            {"params": head, "lr": cfg.lr, "weight_decay": 0.0},
        ]

    def move_to(self, model: nn.Module, device: torch.device, state: Any = None) -> None:
        """The reference weights follow the model (not a buffer, so `model.to` does not move them)."""
        reference = getattr(model, REFERENCE_ATTR, None)
        if reference is not None:
            setattr(model, REFERENCE_ATTR, {n: t.to(device) for n, t in reference.items()})

    def penalty(self, model: nn.Module, cfg: L2spConfig) -> torch.Tensor:
        reference = getattr(model, REFERENCE_ATTR, None)
        if reference is None:
            raise RuntimeError("l2sp: the model has no pre-trained reference weights; build it with L2sp.build")
        body, head = _split(model)
        sp = sum(((p - reference[n]) ** 2).sum() for n, p in body)
        l2 = sum((p**2).sum() for p in head)
        return cfg.alpha / 2 * sp + cfg.beta / 2 * l2

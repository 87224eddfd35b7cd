"""`dann`: domain-adversarial training (Ganin et al., JMLR 2016, "Domain-Adversarial Training of Neural
Networks"), from the labelled target data towards unlabelled deployment images.

The network is the source with a new head, every layer trained, the backbone at `backbone_lr_mult` times the
head's rate (as `finetune_full`). Beside it, a domain classifier (a small MLP, `domain_hidden` wide) reads the
penultimate features (`forward_head(pre_logits=True)`) through a gradient reversal layer: the identity
forward, the gradient times -lambda backward. Per step, with a labelled batch of n images and n unlabelled
images drawn from the deployment pool (`UnlabelledBatches`, handed over by the training layer):

    loss = CE(labelled logits, labels) + domain_weight * BCE(domain classifier([f_labelled, f_unlabelled]), [0, 1])

The domain classifier descends the BCE (it learns to tell the two apart); the features get its gradient
reversed, so they ascend it (they learn to hide the difference) while they descend the cross-entropy.
lambda = grl_max * (2 / (1 + exp(-grl_gamma * p)) - 1), p the fraction of the run's step budget (the epoch cap
times the steps per epoch) done: the paper's schedule, which keeps the early, still-meaningless domain gradients
from disturbing the features and reaches 0.9 * grl_max at p = 0.3 (so a run stopped early on its plateau has
had most of it). `domain_weight` scales the whole domain term (the classifier's learning too), lambda only what
reaches the features: TLlib's split (trade-off 1, a ramped reversal).

Where the numbers go:

* The history's `train_loss` is the cross-entropy alone (the loss returned adds the domain term as
  `w * (bce - bce.detach())`: the same gradient, a value of exactly 0). At the adversarial equilibrium the BCE
  sits near ln 2, which would otherwise read as a loss that never fell (`training_failure`) and hide the
  classification loss that every other strategy's `train_loss` means.
* The history gets three columns (`history_keys`): `domain_accuracy` (the domain classifier's accuracy on the
  epoch's training batches, labelled and unlabelled images together, measured in each step's forward pass
  before the update; 0.5 = the domains are indistinguishable to it), `domain_loss` (its mean BCE) and
  `grl_lambda` (the reversal coefficient at the epoch's last step).

BatchNorm: the labelled and the unlabelled batch go through the network as ONE concatenated batch (as TLlib
does), so every BatchNorm layer normalises both with the statistics of their mixture, and its running
statistics (what the evaluated model uses) are the mixture's too: the model is evaluated with the statistics
it was trained with. Two separate passes would instead normalise each domain by its own statistics (a
per-domain AdaBN during training) that no single evaluation-time model reproduces.

The domain classifier lives on the model as the submodule `dann_domain_head`, so the optimizer, the device
moves and the best-epoch checkpoint hold it like any parameter; it never takes part in `model(x)`, and `save`
drops it: the saved model is the plain classifier network, loaded like `finetune_full`'s. The strategy never
sees a deployment label (there are none in its inputs); the learning rate is the protocol's, chosen on the
labelled validation split. Image-only; one process only (`train.processes: 1`).

What `domain_accuracy` does not show: a fooled domain classifier is not aligned features. On tiny random-initialised
networks (16-32 px, a few hundred steps; colour-inverted, brightness- and red-channel-shifted targets), measured
while writing this strategy, the domain classifier's training accuracy swung around 0.5 (about 0.1 to 0.95 from
epoch to epoch: the features flip the domain direction faster than the classifier follows, the usual behaviour of
gradient reversal under Adam), while a logistic regression fitted afresh on held-out features separated the two
domains about as well as after plain fine-tuning (within a few points, both ways). Alignment must be measured on
held-out images (as the diagnosis stage's MMD and proxy A-distance do), not read from this column.

Stateless, like every registered strategy: a run's unlabelled batches, the step's domain logits and the
epoch's tally live in the `DannState` that `start_run` returns.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from transferlab.core.io import save_torch, write_json
from transferlab.models.sources import SourceModel, with_new_head
from transferlab.strategies.base import (
    Strategy,
    StrategyConfig,
    Teacher,
    UnlabelledBatches,
    head_names,
    register_strategy,
)

if TYPE_CHECKING:  # params validation imports this module for its Config: no torch at import
    import torch
    from torch import nn

DOMAIN_HEAD = "dann_domain_head"  # the domain classifier's submodule name on the trained network


class DannConfig(StrategyConfig):
    # The same 10x rule as finetune_full: the new head's early gradients (and here the reversed domain
    # gradients) must not wreck the pre-trained features.
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="backbone lr = lr * backbone_lr_mult")
    # 1.0: the paper's and TLlib's trade-off; the ramped reversal, not this weight, keeps early training safe.
    domain_weight: float = Field(
        1.0, ge=0, description="weight of the domain classifier's BCE in the loss (0: no adversarial term)"
    )
    # The paper's schedule constants: gamma = 10, a reversal that ends at 1.
    grl_max: float = Field(1.0, ge=0, description="the gradient reversal coefficient lambda at the end of the ramp")
    grl_gamma: float = Field(
        10.0, gt=0, description="steepness of the ramp lambda = grl_max * (2 / (1 + exp(-gamma p)) - 1)"
    )
    # The paper's domain classifiers are 2 hidden layers of 1024 for 4096-d AlexNet features; the targets here
    # are about 1,000 images and the features 1280-d (lite0) or smaller, so a narrower MLP is enough to
    # discriminate and has less to over-fit.
    domain_hidden: int = Field(256, ge=1, description="width of the domain classifier's two hidden layers")


@dataclass
class DannState:
    """One run's unlabelled pool, the current step's domain logits (from `train_forward` to `loss`) and the
    epoch's tally of the domain classifier."""

    unlabelled: UnlabelledBatches
    domain_logits: torch.Tensor | None = None  # (2n,): n labelled, then n unlabelled
    grl_lambda: float = 0.0  # the reversal coefficient of the latest step
    correct: int = 0  # the epoch's correct domain predictions
    seen: int = 0  # the epoch's domain predictions
    loss_sum: float = 0.0  # the epoch's sum of per-step BCE
    steps: int = 0


def grl_coefficient(progress: float, gamma: float = 10.0, maximum: float = 1.0) -> float:
    """lambda_p = maximum * (2 / (1 + exp(-gamma p)) - 1): 0 at p = 0, rising to `maximum` (Ganin et al. 2016,
    sec. 5.2.2)."""
    return maximum * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


@functools.cache
def _gradient_reversal() -> type:
    """The autograd Function (built on first use: no torch at import)."""
    import torch

    class GradientReversal(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
            ctx.coeff = coeff
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad.neg() * ctx.coeff, None

    return GradientReversal


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """The gradient reversal layer: `x` unchanged forward; backward, the incoming gradient times -`coeff`."""
    return _gradient_reversal().apply(x, coeff)


def domain_classifier(in_features: int, hidden: int) -> nn.Module:
    """The domain classifier: in_features -> hidden -> hidden -> 1 logit (1 = the unlabelled domain), ReLU."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def _feature_dim(model: nn.Module) -> int:
    """The width of `forward_head(pre_logits=True)`: the classifier's input."""
    clf = model.get_classifier()
    dim = getattr(clf, "in_features", None)
    return int(dim or getattr(model, "head_hidden_size", None) or model.num_features)


def _is_domain(name: str) -> bool:
    return name.startswith(DOMAIN_HEAD + ".")


@register_strategy
class Dann(Strategy):
    name = "dann"
    modalities = ("image",)  # the unlabelled pool is deployment images
    summary = "all layers trained + a domain classifier behind gradient reversal on unlabelled deployment images"
    Config = DannConfig
    uses_unlabelled = True
    history_keys = ("domain_accuracy", "domain_loss", "grl_lambda")

    def start_run(
        self,
        source: SourceModel,
        cfg: DannConfig,
        teacher: Teacher | None,
        unlabelled: UnlabelledBatches | None = None,
    ) -> DannState:
        """The run's state around its unlabelled pool.

        Raises:
            ValueError: no unlabelled images (the training layer refuses that earlier, naming the fix), or a
                run over several processes (each would pair its part of the batch with the same unlabelled
                images: not the one-process gradient).
        """
        from transferlab.core import distributed

        if unlabelled is None:
            raise ValueError(
                "dann: no unlabelled images for this run: pass images['unlabelled'] to train_strategy "
                "(the deployment pipeline does)"
            )
        if distributed.current() is not None:
            raise ValueError("strategies.dann: set train.processes to 1 (dann trains in one process only)")
        return DannState(unlabelled=unlabelled)

    def build(self, source: SourceModel, num_classes: int, cfg: DannConfig, seed: int) -> nn.Module:
        """The source with a new head and, as the submodule `dann_domain_head`, the domain classifier."""
        import torch

        model = with_new_head(source.model, num_classes, seed)
        # Its own seeded draws, the global stream left where the new head left it: the rest of the run draws
        # what finetune_full's would.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_module(DOMAIN_HEAD, domain_classifier(_feature_dim(model), cfg.domain_hidden))
        return model

    def param_groups(self, model: nn.Module, cfg: DannConfig) -> list[dict]:
        """The backbone at lr * backbone_lr_mult; the new head and the domain classifier (both new) at lr."""
        heads = set(head_names(model))
        named = list(model.named_parameters())
        body = [p for n, p in named if n not in heads and not _is_domain(n)]
        new = [p for n, p in named if n in heads or _is_domain(n)]
        return [{"params": body, "lr": cfg.lr * cfg.backbone_lr_mult}, {"params": new, "lr": cfg.lr}]

    def train_forward(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        cfg: DannConfig,
        state: DannState | None = None,
        progress: float = 0.0,
    ) -> torch.Tensor:
        """One pass over the labelled batch and as many unlabelled images, concatenated (BatchNorm sees their
        mixture); the labelled part's logits are returned, the domain logits kept in `state` for `loss`.
        Without run state (a model run outside training) this is `model(inputs)`."""
        import torch

        if state is None:
            return model(inputs)
        n = len(inputs)
        unlabelled = state.unlabelled.draw(n).to(inputs.device, non_blocking=True)
        features = model.forward_head(model.forward_features(torch.cat([inputs, unlabelled])), pre_logits=True)
        state.grl_lambda = grl_coefficient(progress, cfg.grl_gamma, cfg.grl_max)
        domain = getattr(model, DOMAIN_HEAD)
        state.domain_logits = domain(grad_reverse(features, state.grl_lambda)).squeeze(1)
        return model.get_classifier()(features[:n])

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        cfg: DannConfig,
        state: DannState | None = None,
    ) -> torch.Tensor:
        """CE + domain_weight * BCE of the step's domain logits (labelled = 0, unlabelled = 1), whose value is
        left out of the returned number (see the module docstring): its gradient is all that is added. The plain
        cross-entropy without run state or domain logits."""
        import torch
        import torch.nn.functional as F

        ce = F.cross_entropy(logits, targets)
        if state is None or state.domain_logits is None:
            return ce
        d, state.domain_logits = state.domain_logits.float(), None
        n = len(targets)
        domain = torch.cat([d.new_zeros(n), d.new_ones(len(d) - n)])
        bce = F.binary_cross_entropy_with_logits(d, domain)
        with torch.no_grad():
            state.correct += int(((d > 0).float() == domain).sum())
            state.seen += len(d)
            state.loss_sum += float(bce)
            state.steps += 1
        return ce + cfg.domain_weight * (bce - bce.detach())

    def epoch_metrics(self, state: DannState | None = None) -> dict[str, float]:
        """The epoch's `domain_accuracy`, `domain_loss` and `grl_lambda`; the tally starts again."""
        if state is None or state.seen == 0:
            return {}
        row = {
            "domain_accuracy": round(state.correct / state.seen, 6),
            "domain_loss": round(state.loss_sum / state.steps, 6),
            "grl_lambda": round(state.grl_lambda, 6),
        }
        state.correct, state.seen, state.loss_sum, state.steps = 0, 0, 0.0, 0
        return row

    def save(self, model: nn.Module, out_dir: Path, meta: dict) -> None:
        """The plain classifier network (the domain classifier dropped), loadable like finetune_full's."""
        state_dict = {k: v for k, v in model.state_dict().items() if not _is_domain(k)}
        save_torch(out_dir / "model.pt", {"state_dict": state_dict, **meta})
        write_json(out_dir / "model_meta.json", meta)

"""The strategy interface: how a source becomes a trainable target model, and how it is saved.

Importing this module (or a strategy module) must not import torch: params validation reads each
strategy's `Config` before any work, and a typo must be reported in well under a second, not after the
seconds torch and timm take to import. torch is therefore imported inside the methods that run a model.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from transferlab.core.io import read_json, save_torch, write_json
from transferlab.models.sources import SourceModel, with_new_head
from transferlab.params import SourceSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

PACKAGE = "transferlab.strategies"
# Modules of the package that are not one classification strategy: the interface, and the dense tasks' own
# registry (`dense.py`: detection and segmentation strategies, a different interface).
NOT_STRATEGIES = ("base", "dense")


class StrategyRegistry(Mapping):
    """name -> registered Strategy, importing a strategy's module only when that strategy is asked for.

    The module called `transferlab/strategies/<name>.py` registers the strategy `<name>`
    (`@register_strategy` checks it), so the valid names are known from the file names alone and
    `"lora" in STRATEGIES` imports nothing. Iterating over the values imports every strategy module.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Strategy] = {}

    def names(self) -> list[str]:
        """Every strategy name, from the package's module names (nothing is imported)."""
        package = importlib.import_module(PACKAGE)
        found = {
            m.name
            for m in pkgutil.iter_modules(package.__path__)
            if m.name not in NOT_STRATEGIES and not m.name.startswith("_")
        }
        return sorted(found | set(self._loaded))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._loaded or name in self.names())

    def __getitem__(self, name: str) -> Strategy:
        if name not in self._loaded and name in self.names():
            importlib.import_module(f"{PACKAGE}.{name}")
        try:
            return self._loaded[name]
        except KeyError:
            raise KeyError(f"unknown strategy '{name}' (valid: {self.names()})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def register(self, strategy: Strategy) -> None:
        self._loaded[strategy.name] = strategy


STRATEGIES = StrategyRegistry()


class StrategyConfig(BaseModel):
    """Fields every strategy has; a strategy's Config adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = Field(description="registered strategy name")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate of the newly initialised head")
    epochs: int | None = Field(None, ge=1, description="overrides train.epochs for this strategy")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: instantiate and register under `cls.name`.

    Raises:
        ValueError: a strategy in `transferlab/strategies/` whose name is not its module's name (the lazy
            registry finds a strategy by its file name).
    """
    module = cls.__module__.rsplit(".", 1)
    if module[0] == PACKAGE and module[1] != cls.name:
        raise ValueError(
            f"strategy '{cls.name}' is defined in {cls.__module__}: name the module "
            f"transferlab/strategies/{cls.name}.py (a strategy is found by its file name)"
        )
    STRATEGIES.register(cls())
    return cls


@dataclass(frozen=True)
class TeacherSpec:
    """A network a strategy needs fine-tuned on the run's target data before its own model trains (a
    distillation teacher), as `Strategy.teacher_spec` declares it.

    The strategy says what and for how long; the training layer trains it, with the run's recipe (batch size,
    weight decay, augmentation, schedule, device) at this fixed budget, so the helper and the model it helps
    are trained the same way.
    """

    source: SourceSpec  # the teacher's source network
    kind: str  # the registered strategy it is fine-tuned with (e.g. finetune_full)
    config: dict[str, Any] = field(default_factory=dict)  # that strategy's config entry (lr, ...)
    epochs: int = 1  # a fixed budget: the epoch cap and the patience
    label: str = "teacher"  # progress bars and errors


@dataclass
class Teacher:
    """The helper network `TeacherSpec` asked for, trained for one run by the training layer."""

    model: nn.Module  # the fine-tuned network (on the CPU, eval mode)
    source: SourceModel  # its source (preprocessing: mean, std)
    val_accuracy: float  # its best validation accuracy on the target


@dataclass
class UnlabelledBatches:
    """Unlabelled target (deployment) images of one run, as the training layer hands them to the `start_run` of
    a strategy that `uses_unlabelled`; it holds no labels, there are none.

    `inputs(indices, train)` builds a batch exactly as the training batches are built (the source's
    normalisation, the recipe's augmentation and memory order), on the CPU. The order in which the pool is
    drawn and the augmentation come from `generator`, a generator of their own seeded from the run's seed, so
    the labelled batches (and every other strategy's run) draw what they would draw without the pool.
    """

    inputs: Callable[[np.ndarray, bool], torch.Tensor]  # fn(indices, train) -> normalised batch, on the CPU
    n: int  # images in the pool
    generator: torch.Generator  # the pool's own: shuffling and augmentation
    _order: np.ndarray | None = field(default=None, repr=False)
    _pos: int = field(default=0, repr=False)

    def draw(self, k: int, augment: bool = True) -> torch.Tensor:
        """The next `k` images of the pool (augmented like the training batches unless `augment` is False),
        going through it in a seeded random order that is drawn afresh each time the pool is used up (an
        epoch over the pool, independent of the labelled epochs)."""
        import torch

        parts: list[np.ndarray] = []
        need = k
        while need > 0:
            if self._order is None or self._pos >= self.n:
                self._order, self._pos = torch.randperm(self.n, generator=self.generator).numpy(), 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            parts.append(take)
        return self.inputs(np.concatenate(parts), augment)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def head_names(model: nn.Module) -> list[str]:
    clf = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
    return [n for n, _ in model.named_parameters() if n == clf or n.startswith(clf + ".")]


class Strategy:
    """Base class. Subclasses set `name`, `Config` and `summary`, and override what differs.

    Life cycle in `training.protocol.train_strategy`: (the training layer trains the `teacher_spec` network,
    if any) -> `start_run` -> `build` -> per epoch `on_epoch_start`, `set_train_mode`, steps with
    `param_groups`, `train_forward`, `loss`, then `epoch_metrics` -> `save`; `load` rebuilds the trained model
    for evaluation.

    A registered strategy is one shared instance, like a scikit-learn estimator's class: it keeps no
    per-run state. What one run needs (a teacher, constants) is the value `start_run` returns, which the
    training layer passes back to `loss` and `move_to` as `state`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    uses_features: ClassVar[bool] = False  # trains on the features cache instead of images
    pretrained: ClassVar[bool] = True  # False: starts from random weights (scratch)
    modalities: ClassVar[tuple[str, ...]] = ("image", "text")  # what it can train on (a params check)
    # Also trains on unlabelled deployment images (`images["unlabelled"]` of `train_strategy`, handed to
    # `start_run` as `UnlabelledBatches`); training without them is refused before any work.
    uses_unlabelled: ClassVar[bool] = False
    history_keys: ClassVar[tuple[str, ...]] = ()  # the extra history columns `epoch_metrics` adds
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # dense tasks have their own (strategies.dense)

    def teacher_spec(self, cfg: StrategyConfig) -> TeacherSpec | None:
        """A network the training layer must fine-tune on the run's data before this strategy's model
        trains (distillation's teacher), or None (the default)."""
        return None

    def start_run(
        self,
        source: SourceModel,
        cfg: StrategyConfig,
        teacher: Teacher | None,
        unlabelled: UnlabelledBatches | None = None,
    ) -> Any:
        """The per-run state this strategy needs beside its model (default: None), made once per run before
        `build`; `teacher` is the trained network `teacher_spec` asked for, `unlabelled` the run's unlabelled
        deployment images (passed only to strategies with `uses_unlabelled`). The training layer passes the
        value back to `train_forward`, `loss`, `epoch_metrics` and `move_to`; nothing is kept on this shared
        instance."""
        return None

    def build(self, source: SourceModel, num_classes: int, cfg: StrategyConfig, seed: int) -> nn.Module:
        """The source network with a new `num_classes` head and the right parameters trainable."""
        return with_new_head(source.model, num_classes, seed)

    def param_groups(self, model: nn.Module, cfg: StrategyConfig) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]

    def before_training(self, model: nn.Module, cfg: StrategyConfig, train_inputs: Callable, n_train: int) -> None:
        """Hook run once before the first epoch (AdaBN re-estimates BatchNorm statistics here).
        `train_inputs(indices, augment)` builds a normalised input batch."""

    def train_forward(
        self, model: nn.Module, inputs: torch.Tensor, cfg: StrategyConfig, state: Any = None, progress: float = 0.0
    ) -> torch.Tensor:
        """The forward pass of one training step: the logits of the labelled batch `inputs` (default:
        `model(inputs)`). `progress` is the fraction of the run's step budget (the epoch cap times the steps per
        epoch) done before this step, 0 at the first; DANN ramps its gradient reversal with it and forwards an
        unlabelled batch in the same pass."""
        return model(inputs)

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        cfg: StrategyConfig,
        state: Any = None,
    ) -> torch.Tensor:
        """The training loss of one batch (cross-entropy; distillation adds the teacher's soft targets).
        `state` is what `start_run` returned for this run."""
        import torch

        return torch.nn.functional.cross_entropy(logits, targets)

    def penalty(self, model: nn.Module, cfg: StrategyConfig) -> torch.Tensor | None:
        """Extra loss term added to the cross-entropy at every step (L2-SP's pull towards the source)."""
        return None

    def epoch_metrics(self, state: Any = None) -> dict[str, float]:
        """Extra columns (`history_keys`) of the history row of the training epoch that just ended, from the run's
        state (default: none); called once after each epoch, so a strategy may start a new tally here."""
        return {}

    def on_epoch_start(
        self, model: nn.Module, epoch: int, cfg: StrategyConfig, optimizer: torch.optim.Optimizer
    ) -> None:
        """Hook for schedules that change what trains (gradual unfreezing)."""

    def move_to(self, model: nn.Module, device: torch.device, state: Any = None) -> None:
        """Move what a run keeps outside the model's parameters and buffers (L2-SP's reference weights on the
        model, a distillation teacher in `state`, what `start_run` returned) to `device`. `fit` calls it after
        moving the model; `train_strategy` calls it with the CPU when it hands the model back."""

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, except BatchNorm layers whose affine params are frozen: their running statistics
        stay the source's (a frozen block must compute what it computed before)."""
        from torch import nn

        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
                m.eval()

    def save(self, model: nn.Module, out_dir: Path, meta: dict) -> None:
        """Save the trained model with what `load` needs (architecture, classes, preprocessing)."""
        save_torch(out_dir / "model.pt", {"state_dict": model.state_dict(), **meta})
        write_json(out_dir / "model_meta.json", meta)

    def load(self, out_dir: Path, load_source: Callable[[], SourceModel]) -> nn.Module:
        """Rebuild the trained model from `out_dir` (eval mode)."""
        import torch

        from transferlab.models.sources import _create

        ckpt = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
        model = _create(ckpt["arch"], pretrained=False, num_classes=ckpt["num_classes"], **ckpt.get("kwargs", {}))
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return model.eval()

    @staticmethod
    def read_meta(out_dir: Path) -> dict:
        return read_json(out_dir / "model_meta.json")

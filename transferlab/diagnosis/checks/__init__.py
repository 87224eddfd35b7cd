"""Registry of diagnosis checks, one module each; adding one is a module and a decorator.

A check measures one problem on every training seed, grades it with an interval (ok / undetermined / flagged,
see `transferlab.diagnosis.findings.finding`), and for each flagged finding runs its remedy, which re-measures
the flagged quantity under the pipeline's protocol and re-grades it (or, when it only compares two models that
already exist, records that as evidence: `findings.remedy_result`):

    @register_check("resolution")
    class Resolution(Check):
        order = 50
        def measure(self, ctx): ...          # -> list of findings
        def remedy(self, ctx, finding): ...   # -> findings.remedy_result (kind remedy / evidence) or None

`run_checks` is the diagnose stage's loop: every registered check in `order`, remedies for flagged
findings only.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from transferlab.data.splits import Prepared
from transferlab.params import Params, SourceSpec

log = logging.getLogger(__name__)

CHECKS: dict[str, Check] = {}


class Check:
    """Base class: subclasses set `order` and override `measure` (and `remedy` when they have one)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # position in the stage's loop (the report orders by finding type)
    modalities: ClassVar[tuple[str, ...]] = ("image", "text")  # data it reads; skipped (and counted) otherwise

    def applies(self, ctx: DiagnosisContext) -> bool:
        """False when the inputs this check needs are absent (it is then skipped and counted)."""
        return True

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        raise NotImplementedError

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        """Run the remedy of a flagged finding; return its re-measurement (`findings.remedy_result`)."""
        return None


def register_check(name: str):
    """Class decorator: instantiate and register the check under `name`."""

    def deco(cls: type[Check]) -> type[Check]:
        if name in CHECKS:
            raise ValueError(f"check '{name}' is registered twice")
        cls.name = name
        CHECKS[name] = cls()
        return cls

    return deco


def get_check(name: str) -> Check:
    """The registered check called `name`.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    if name not in CHECKS:
        raise KeyError(f"unknown check '{name}' (valid: {sorted(CHECKS)})")
    return CHECKS[name]


@dataclass
class DiagnosisContext:
    """Everything the checks read, loaded once by the stage.

    Test predictions are aligned on `sample_ids` (never on row order); `preds_by_seed` holds each model's
    (k_seeds, n) predictions, every training seed, `test_images` the prepared test images in the same order.
    `summary` is compare's metrics/summary.json (negative transfer is graded from it); `controls` the sources
    of kind random_init (reference points, never findings), filled by the checks.
    """

    params: Params
    data: Prepared
    selected: str
    selected_spec: SourceSpec
    features_dir: Path
    pretrained_dir: Path
    models_dir: Path
    history_dir: Path
    train_metrics_dir: Path | None
    sample_ids: np.ndarray
    y: np.ndarray
    preds_by_seed: dict[str, np.ndarray]
    candidates: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict | None = None
    controls: list[dict] = field(default_factory=list)
    source_images: np.ndarray | None = None  # params diagnose.source_images, loaded at the target size
    cache: dict[str, Any] = field(default_factory=dict)
    # Where checks run forward passes and remedy training (a torch.device, resolved from train.device by the
    # stage); None: the CPU. Never part of a finding: metrics stay device-free.
    device: Any = None
    # Wall-clock measurements of the checks (a remedy model's CPU latency), written to the stage's perf file:
    # they vary run to run, so they never enter a finding (metrics/diagnosis.json stays reproducible).
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def train_seed(self) -> int:
        """The first training seed (the learning-rate sweep's short runs use it)."""
        return int(getattr(self.params.train, "seeds", [self.params.seed])[0])

    @property
    def n_bootstrap(self) -> int:
        """Replicates of the diagnosis's own intervals (BN gaps, agreements, source accuracies)."""
        return self.params.diagnose.n_bootstrap

    @property
    def compare_n_bootstrap(self) -> int:
        """Replicates of every target-accuracy gain: compare's, so that a gain is metrics/summary.json's."""
        return self.params.compare.n_bootstrap

    def gain(self, a: np.ndarray, b: np.ndarray) -> dict:
        """Test accuracy gain of rows `a` over rows `b` (all seeds), exactly as compare computes it."""
        from transferlab.diagnosis.findings import _gain

        return _gain(self.y, a, b, self.compare_n_bootstrap, self.seed, self.confidence)

    def target_change(self, before: np.ndarray, after: np.ndarray) -> dict:
        """Target test accuracy before/after a remedy (all seeds' rows) and the change, as compare computes it."""
        from transferlab.diagnosis.findings import accuracy_change

        return accuracy_change(self.y, before, after, self.compare_n_bootstrap, self.seed, self.confidence)

    @property
    def confidence(self) -> float:
        return self.params.compare.confidence

    @property
    def test_images(self) -> np.ndarray:
        """Prepared test images in `sample_ids` order."""
        if "test_images" not in self.cache:
            self.cache["test_images"] = self.data.images["test"][self.test_rows(self.sample_ids)]
        return self.cache["test_images"]

    def test_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the prepared test split holding the samples `ids`."""
        stored = self.data.ids.get("test") if self.data.ids else None
        if stored is None or len(stored) == 0:
            return np.asarray(ids, dtype=np.int64)
        pos = {int(s): i for i, s in enumerate(stored)}
        missing = [int(s) for s in ids if int(s) not in pos]
        if missing:
            raise ValueError(
                f"{len(missing)} predicted sample id(s) are not in the prepared test split: re-run evaluate"
            )
        return np.array([pos[int(s)] for s in ids], dtype=np.int64)

    def probe(self, split: str) -> np.ndarray:
        """A seeded, class-stratified subset of `diagnose.probe_images` images of a split."""
        from transferlab.diagnosis.measures import stratified_indices

        labels = self.y if split == "test" else self.data.labels[split]
        images = self.test_images if split == "test" else self.data.images[split]
        idx = stratified_indices(labels, self.params.diagnose.probe_images, seed=self.seed)
        return images[idx]

    def load_source(self, name: str | None = None):
        """A fresh copy of a source model (the selected one by default)."""
        from transferlab.models.sources import load_source

        name = name or self.selected
        spec = self.selected_spec if name == self.selected else self.params.sources[name]
        return load_source(name, spec, seed=self.seed, pipeline_dir=self.pretrained_dir)

    def load_strategy_model(self, name: str):
        """The trained model of `strategies.<name>` (its first seed), rebuilt on the selected source."""
        return self.load_strategy_models(name)[0]

    def load_strategy_models(self, name: str) -> list:
        """The trained models of `strategies.<name>`, one per training seed in seed order."""
        from transferlab.core import layout
        from transferlab.strategies import get_strategy, strategy_config

        cfg = strategy_config(name, self.params.strategies[name])
        return [
            get_strategy(cfg.kind).load(d, lambda: self.load_source())
            for d in layout.seed_dirs(self.models_dir / name).values()
        ]

    def kind_of(self, name: str) -> str:
        """The strategy kind of `strategies.<name>`."""
        return dict(self.params.strategies.get(name) or {}).get("kind", name)

    def protocol(self, kind: str, *, source: str | None = None, like: str | None = "finetune_full", **overrides):
        """Train `kind` under the pipeline's protocol (`build_recipe` + `train_protocol`: the rate chosen on
        validation from `train.lr_grid` around the configured one, then every seed of `train.seeds`), from
        `source` (default: the selected one). The settings are `strategies.<kind>`'s when listed, else those of
        `strategies.<like>` that `kind`'s config declares (finetune_full's lr, backbone_lr_mult and epochs: the
        rate the protocol searches around; `like=None`: the kind's defaults), plus `overrides` (e.g. L2-SP's
        alpha). Cached per (kind, source, overrides). Returns the `ProtocolResult`."""
        from transferlab.strategies import get_strategy, strategy_config
        from transferlab.training.protocol import train_protocol

        key = (kind, source, like, tuple(sorted(overrides.items())))
        runs = self.cache.setdefault("protocol_runs", {})
        if key not in runs:
            listed = next((n for n in sorted(self.params.strategies) if self.kind_of(n) == kind), None)
            raw = dict(self.params.strategies.get(listed or like or "") or {})
            raw.pop("kind", None)
            if listed is None:
                declared = type(strategy_config(kind, {"kind": kind})).model_fields
                raw = {k: v for k, v in raw.items() if k in ("lr", "backbone_lr_mult", "epochs") and k in declared}
            cfg = strategy_config(kind, {**raw, "kind": kind, **overrides})
            runs[key] = train_protocol(
                get_strategy(kind),
                cfg,
                lambda: self.load_source(source),
                self.data.images,
                self.data.labels,
                self.data.num_classes,
                self.recipe(kind, cfg),
                label=f"diagnose {kind}" + (f" on {source}" if source else ""),
            )
        return runs[key]

    def recipe(self, strategy_name: str, cfg):
        """The pipeline's own training recipe for remedy runs of `strategy_name` (`build_recipe` on
        params.train and `cfg`, on `device`): the recipe train@ trains with.

        `diagnose.remedy_epochs`, when set, caps the epochs (tiny test configs). Returns a `TrainRecipe`."""
        from transferlab.training.recipe import build_recipe

        cap = self.params.diagnose.remedy_epochs
        return build_recipe(self.params.train, cfg, device=self.device, max_epochs=cap)

    def finetune_like(self, kind: str, lr: float, *, source: str | None = None, epochs: int | None = None):
        """Train `kind` (`finetune_full`, or `l2sp` at `diagnose.l2sp_alpha`) with `strategies.finetune_full`'s
        settings at a FIXED `lr`, from `source` (default: the selected one), with the pipeline's recipe on the
        first training seed; `epochs` fixes a short budget (patience = epochs) instead. Only the learning-rate
        sweep uses it (a probe at fixed rates); remedies train with `protocol`. Returns the `TrainResult`."""
        from transferlab.core.seeding import seed_everything
        from transferlab.strategies import get_strategy, strategy_config
        from transferlab.training.protocol import train_strategy

        raw = dict(self.params.strategies.get("finetune_full") or {})
        raw.pop("kind", None)
        extra = {"alpha": self.params.diagnose.l2sp_alpha} if kind == "l2sp" else {}
        keep = {k: v for k, v in raw.items() if k in ("backbone_lr_mult", "epochs")}
        cfg = strategy_config(kind, {**keep, "kind": kind, "lr": lr, **extra})
        recipe = self.recipe(kind, cfg)
        if epochs is not None:
            recipe = recipe.short_run(epochs)
        gen = seed_everything(self.train_seed, recipe.num_threads)
        return train_strategy(
            get_strategy(kind),
            cfg,
            self.load_source(source),
            self.data.images,
            self.data.labels,
            self.data.num_classes,
            recipe,
            seed=self.train_seed,
            generator=gen,
            label=f"diagnose {kind}@{lr:g}",
        )


def run_checks(ctx: DiagnosisContext, names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run checks in `order`: measure, then the remedy of every flagged finding.

    Args:
        ctx: the loaded inputs.
        names: checks to run (default: every registered one).

    Returns:
        (findings, run_log): run_log lists the checks run and those skipped because their inputs are absent.
    """
    selected = [get_check(n) for n in (names if names is not None else sorted(CHECKS))]
    findings, ran, skipped = [], [], []
    for check in sorted(selected, key=lambda c: (c.order, c.name)):
        if ctx.data.modality not in check.modalities or not check.applies(ctx):
            skipped.append(check.name)
            continue
        log.info("check %s", check.name)
        for f in check.measure(ctx):
            f["check"] = check.name
            if f["flagged"]:
                f["remedy_result"] = check.remedy(ctx, f)
            findings.append(f)
        ran.append(check.name)
    seen: set[tuple[str, str]] = set()
    for f in findings:  # one finding per model and type: a model counted twice would weigh twice in the counts
        key = (f["type"], f["subject"])
        if key in seen:
            raise ValueError(f"two '{key[0]}' findings about '{key[1]}': a check measured one model twice")
        seen.add(key)
    return findings, {"checks_run": ran, "checks_skipped": skipped}


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")

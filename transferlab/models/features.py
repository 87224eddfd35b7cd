"""A candidate source's features cache (`data/features/<source>/`): one forward pass over the prepared splits,
kept as .npy for scoring and the linear probe, and the record of which source wrote it (`source.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.data.loaders import SPLITS
from transferlab.models.inference import extract
from transferlab.models.sources import SourceError, SourceModel
from transferlab.params import ParamsError

if TYPE_CHECKING:
    import torch

    from transferlab.data.splits import Prepared


def check_source_reads(name: str, source: SourceModel, data: Prepared) -> None:
    """Fail before the forward pass when `source` cannot read the prepared data.

    Raises:
        ParamsError: the source reads another modality than the data, or (texts) its tokenizer has another
            vocabulary than the one the data were tokenized with.
    """
    if source.modality != data.modality:
        raise ParamsError(f"sources.{name} reads {source.modality}, but the prepared data are {data.modality}")
    if source.modality == "text":
        from transferlab.data.tokenize import load_tokenizer, vocabulary_sha256

        if vocabulary_sha256(load_tokenizer(source.kwargs["tokenizer"])) != data.meta["tokenizer_vocab_sha256"]:
            raise ParamsError(
                f"sources.{name}: its tokenizer ({source.kwargs['tokenizer']}) has another vocabulary than "
                f"data.tokenizer ({data.meta['tokenizer']}), so the prepared token ids mean other words to it. "
                "Compare sources that share a vocabulary in one run, or set data.tokenizer to this source."
            )


def extract_splits(source: SourceModel, data: Prepared, device: torch.device | None = None) -> dict[str, np.ndarray]:
    """`<split>_features` (penultimate features) and, for a source with a classifier, `<split>_logits` of
    every prepared split, in split order (file stem -> float32 array)."""
    out = {}
    for split in SPLITS:
        feats, logits = extract(
            source.model, data.images[split], source.mean, source.std, with_logits=source.has_classifier, device=device
        )
        out[f"{split}_features"] = feats
        if logits is not None:
            out[f"{split}_logits"] = logits
    return out


def source_record(source: SourceModel) -> dict:
    """What `source.json` keeps: the source's name, architecture, weights (and their hash) and preprocessing."""
    return {
        "name": source.name,
        "arch": source.arch,
        "weights": source.weights,
        "weights_sha256": source.weights_sha256,
        "mean": source.mean,
        "std": source.std,
        "has_classifier": source.has_classifier,
    }


def load_cache(features_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, logits or None) of one split from a `features@<source>` folder: the one reader of the cache."""
    d = Path(features_dir)
    logits = d / f"{split}_logits.npy"
    return np.load(d / f"{split}_features.npy"), (np.load(logits) if logits.is_file() else None)


def load_features_cache(features_root: str | Path, source_name: str, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The `features@<source_name>` cache of `splits` (penultimate features of the frozen backbone), what
    strategies that train on features read.

    Raises:
        SourceError: the cache is missing (the features stage has not run for this source).
    """
    folder = Path(features_root) / source_name
    if not (folder / f"{splits[0]}_features.npy").is_file():
        raise SourceError(f"{folder} has no features: run `dvc repro features@{source_name}` first")
    return {s: load_cache(folder, s)[0] for s in splits}

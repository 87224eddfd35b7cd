"""Where the per-seed outputs of a strategy live, and how per-sample predictions are read back.

Every strategy is trained once per training seed (`train.seeds`). One `train@<strategy>` stage writes
`models/<strategy>/seed_<s>/` per seed, and `plots/history/<strategy>/seed_<s>.csv`; `evaluate@<strategy>`
writes one long predictions CSV with a row per (seed, test sample): `sample_id, seed, y_true, y_pred,
p_<class>...`. Consumers align rows on `sample_id` (the sample's index in the raw dataset), never on row
order. A deterministic model (the raw-pixel baseline) has a single seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SEED_PREFIX = "seed_"


def seed_dir(model_dir: str | Path, seed: int) -> Path:
    """The folder of one seed's model inside `models/<strategy>/`."""
    return Path(model_dir) / f"{SEED_PREFIX}{seed}"


def seed_dirs(model_dir: str | Path) -> dict[int, Path]:
    """seed -> model folder, in increasing seed order.

    Raises:
        FileNotFoundError: the folder holds no `seed_<s>/` model (run the train stage first).
    """
    found = {
        int(p.name.removeprefix(SEED_PREFIX)): p
        for p in Path(model_dir).glob(f"{SEED_PREFIX}*")
        if p.is_dir() and p.name.removeprefix(SEED_PREFIX).isdigit()
    }
    if not found:
        raise FileNotFoundError(f"{model_dir} holds no {SEED_PREFIX}<s>/ model: run its train stage first")
    return dict(sorted(found.items()))


def primary_seed_dir(model_dir: str | Path) -> Path:
    """The first training seed's model: what single-model consumers (diagnosis, audit) load."""
    return next(iter(seed_dirs(model_dir).values()))


def history_path(history_dir: str | Path, seed: int) -> Path:
    """`plots/history/<strategy>/seed_<s>.csv`."""
    return Path(history_dir) / f"{SEED_PREFIX}{seed}.csv"


def read_histories(history_dir: str | Path) -> dict[int, pd.DataFrame]:
    """seed -> per-epoch history of one strategy (empty when the folder has none)."""
    out = {}
    for p in sorted(Path(history_dir).glob(f"{SEED_PREFIX}*.csv")):
        out[int(p.stem.removeprefix(SEED_PREFIX))] = pd.read_csv(p)
    return dict(sorted(out.items()))


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A long predictions CSV, sorted by (seed, sample_id).

    Raises:
        ValueError: a required column is missing or a (seed, sample_id) pair repeats.
    """
    df = pd.read_csv(path)
    missing = [c for c in ("sample_id", "seed", "y_true", "y_pred") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}: re-run the stage that wrote it")
    if df.duplicated(["seed", "sample_id"]).any():
        raise ValueError(f"{path}: a (seed, sample_id) pair appears twice")
    return df.sort_values(["seed", "sample_id"], kind="stable").reset_index(drop=True)


def predictions_by_seed(df: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """seed -> that seed's rows, sorted by sample_id."""
    return {int(s): g.sort_values("sample_id").reset_index(drop=True) for s, g in df.groupby("seed", sort=True)}


def aligned_predictions(frames: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Align several models' long predictions on the test samples they share.

    Args:
        frames: name -> `read_predictions` output.

    Returns:
        (sample_ids, y_true, preds): preds maps name -> int array (n_seeds, n_samples), rows in seed order,
        columns in `sample_ids` order.

    Raises:
        ValueError: the models were evaluated on different samples, or disagree on a sample's label.
    """
    ids = None
    y_true = None
    preds = {}
    for name, df in frames.items():
        by_seed = predictions_by_seed(df)
        rows = []
        for seed, g in by_seed.items():
            sid = g["sample_id"].to_numpy()
            if ids is None:
                ids, y_true = sid, g["y_true"].to_numpy()
            elif not np.array_equal(sid, ids):
                raise ValueError(f"{name} (seed {seed}) was evaluated on other test samples: re-run its evaluate stage")
            elif not np.array_equal(g["y_true"].to_numpy(), y_true):
                raise ValueError(f"{name} (seed {seed}) has other labels for the same samples: re-run prepare")
            rows.append(g["y_pred"].to_numpy())
        preds[name] = np.stack(rows)
    return ids, y_true, preds

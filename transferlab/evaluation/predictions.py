"""Per-sample predictions as the pipeline stores them (`predictions/<name>.csv`): one row per training seed and
test sample, keyed by `sample_id` (core.layout reads them back and aligns models on it)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def predictions_frame(
    sample_ids: np.ndarray, seed: int, y_true: np.ndarray, proba: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One model's per-sample predictions.

    Args:
        sample_ids: (n,) ids of the test samples, in the row order of `y_true` and `proba`.
        seed: the training seed of the model (0 for a model without one, the classical baseline).
        y_true: (n,) true labels.
        proba: (n, n_classes) predicted class probabilities.
        class_names: the names of the columns of `proba`.

    Returns:
        Columns sample_id, seed, y_true, y_pred (the argmax) and p_<class> (rounded to 6 decimals, so the CSV
        stays small and stable in its last bits).
    """
    df = pd.DataFrame({"sample_id": sample_ids, "seed": seed, "y_true": y_true, "y_pred": proba.argmax(1)})
    for i, c in enumerate(class_names):
        df[f"p_{c}"] = np.round(proba[:, i], 6)
    return df

"""The diagnosis' inputs, read once from what the earlier stages wrote: the prepared data, the selected source,
every model's test predictions (every training seed) aligned on sample ids, compare's summary, the agreement
stage's linear-probe candidates, and the optional source-domain images. The checks
(`transferlab.diagnosis.checks`) read them from the context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.core import layout
from transferlab.core.io import read_json
from transferlab.data.splits import load_prepared
from transferlab.diagnosis.checks import DiagnosisContext
from transferlab.diagnosis.checks.domain_shift import load_image_folder
from transferlab.params import Params, SourceSpec


def load_context(
    params: Params,
    *,
    prepared: str | Path,
    selection: str | Path,
    features_dir: str | Path,
    pretrained_dir: str | Path,
    models_dir: str | Path,
    predictions_dir: str | Path,
    history_dir: str | Path,
    train_metrics_dir: str | Path | None,
    summary: str | Path | None = None,
) -> DiagnosisContext:
    """Load the inputs the checks share.

    Args:
        params: the run's params (the checks read their thresholds from `diagnose`).
        prepared: the prepared splits; selection: the score stage's `selection.json`.
        features_dir, pretrained_dir, models_dir, history_dir, train_metrics_dir: the folders the checks load
            features, pre-trained sources, trained models, histories and train metrics from.
        predictions_dir: `<name>.csv` of every strategy and of the classical baseline (those present are
            used), and the agreement stage's `agreement.csv` when there is one.
        summary: compare's metrics/summary.json (None: negative transfer is computed from the predictions).

    Returns:
        The context: every seed's test predictions of each model, aligned on shared sample ids (the same
        alignment as compare's `read_run_results`).

    Raises:
        ValueError: the predictions do not cover the same test samples.
        FileNotFoundError: `diagnose.source_images` holds fewer than two images.
    """
    data = load_prepared(prepared)
    sel = read_json(selection)
    pred_dir = Path(predictions_dir)
    names = sorted(params.strategies) + [params.baseline.model]
    frames = {n: layout.read_predictions(pred_dir / f"{n}.csv") for n in names if (pred_dir / f"{n}.csv").is_file()}
    ids, y, by_seed = layout.aligned_predictions(frames)
    ctx = DiagnosisContext(
        params=params,
        data=data,
        selected=sel["selected"],
        selected_spec=SourceSpec.model_validate(sel["spec"]),
        features_dir=Path(features_dir),
        pretrained_dir=Path(pretrained_dir),
        models_dir=Path(models_dir),
        history_dir=Path(history_dir),
        train_metrics_dir=Path(train_metrics_dir) if train_metrics_dir else None,
        sample_ids=ids,
        y=y,
        preds_by_seed=by_seed,
        candidates=_agreement_candidates(pred_dir / "agreement.csv", data.ids["test"], ids),
        summary=read_json(summary) if summary else None,
    )
    dp = params.diagnose
    if dp.source_images is not None:
        ctx.source_images = load_image_folder(
            dp.source_images, data.images["train"].shape[1], dp.probe_images, params.seed
        )
    return ctx


def _agreement_candidates(path: Path, test_ids: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """`linear_probe:<source>` column -> its test predictions in `ids` order ({} without the file)."""
    if not path.is_file():
        return {}
    agree = pd.read_csv(path)
    if "sample_id" in agree.columns:
        agree_ids = agree["sample_id"].to_numpy()
    else:  # written in the prepared test split's row order
        agree_ids = test_ids[agree["index"].to_numpy()] if "index" in agree.columns else test_ids
    pos = {int(s): i for i, s in enumerate(agree_ids)}
    rows = np.array([pos[int(s)] for s in ids])
    return {c: agree[c].to_numpy()[rows] for c in agree.columns if c.startswith("linear_probe:")}

"""Rank candidate source models from one cached forward pass each, and pick one under budgets.

`score_candidates` runs every transferability estimator on each candidate's cached train-split features
(and source logits, for LEEP / NCE), attaches the cost profile, ranks by `score.select_by` and selects
the best candidate that fits the budgets. `random_init` candidates are controls: scored and ranked, never
selected. An estimate that is undefined on a candidate's features (e.g. H-score once the features span every
labelling) is null, with its reason under `undefined`; a candidate whose `select_by` estimate is null is left
out of the ranking (listed under `unranked`) and never selected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferlab.core.io import read_json
from transferlab.models.features import load_cache
from transferlab.scoring.estimators import ESTIMATORS, get_estimator, score_all_with_reasons


def score_candidates(
    features_root: str | Path,
    candidates: dict[str, str],
    labels: np.ndarray,
    *,
    estimators: list[str],
    select_by: str,
    seed: int,
    costs: dict[str, dict],
    latency_ms: dict[str, float] | None = None,
    max_params: int | None = None,
    max_latency_ms: float | None = None,
) -> dict:
    """Score, rank and select.

    Args:
        features_root: folder holding `<candidate>/train_features.npy` (+ `train_logits.npy`).
        candidates: name -> source kind (kind 'random_init' marks a control).
        labels: train-split labels, aligned with the cached features.
        estimators: estimator names to run (see transferlab.scoring.estimators.ESTIMATORS).
        select_by: the estimator that ranks the candidates.
        seed: for the estimators that resample.
        costs: name -> deterministic cost profile (params, flops, memory).
        latency_ms: name -> measured CPU latency per image at batch 1 (only needed for the latency budget).
        max_params, max_latency_ms: optional budgets; candidates over budget are ranked but not selected.

    Returns:
        {'candidates': {name: {estimates..., cost..., ['undefined': {estimator: reason}], 'rank'}},
         'ranking': [names with a `select_by` estimate, best first], 'unranked': {name: reason},
         'selected': name, 'select_by': ..., 'excluded': {name: reason},
         'definitions': {estimator: what it computes}}. Null estimates stay null (None).

    Raises:
        KeyError: unknown estimator in `estimators` or `select_by`.
        ValueError: no candidate is eligible (all controls or over budget).
    """
    for name in [*estimators, select_by]:
        get_estimator(name)
    if select_by not in estimators:
        estimators = [*estimators, select_by]
    rows: dict[str, dict] = {}
    for name in sorted(candidates):
        feats, logits = load_cache(Path(features_root) / name, "train")
        est, reasons = score_all_with_reasons(feats, labels, logits, seed=seed, names=estimators)
        rows[name] = {
            **{k: (None if v is None else round(float(v), 6)) for k, v in est.items()},
            **costs.get(name, {}),
        }
        if reasons:
            rows[name]["undefined"] = dict(sorted(reasons.items()))
    higher = ESTIMATORS[select_by].higher_is_better
    unranked = {
        n: f"{select_by} is null: {rows[n].get('undefined', {}).get(select_by, 'no estimate')}"
        for n in sorted(rows)
        if rows[n][select_by] is None
    }
    ranking = sorted(
        (n for n in rows if n not in unranked),
        key=lambda n: (-rows[n][select_by] if higher else rows[n][select_by], n),
    )
    excluded: dict[str, str] = dict(unranked)
    for n in ranking:
        if candidates[n] == "random_init":
            excluded[n] = "control (random weights): ranked for reference, never selected"
        elif max_params is not None and rows[n].get("params", 0) > max_params:
            excluded[n] = f"params {rows[n]['params']} > score.max_params {max_params}"
        elif max_latency_ms is not None and (latency_ms or {}).get(n, float("inf")) > max_latency_ms:
            excluded[n] = f"latency {(latency_ms or {}).get(n)} ms > score.max_latency_ms {max_latency_ms}"
    eligible = [n for n in ranking if n not in excluded]
    if not eligible:
        raise ValueError(f"no candidate can be selected: {excluded}. Relax score budgets or add sources.")
    for n in rows:
        rows[n]["rank"] = None
    for rank, n in enumerate(ranking, 1):
        rows[n]["rank"] = rank
    return {
        "select_by": select_by,
        "candidates": rows,
        "ranking": ranking,
        "unranked": unranked,
        "selected": eligible[0],
        "excluded": excluded,
        "definitions": {e: ESTIMATORS[e].definition for e in estimators},
    }


def read_costs(features_root: str | Path, names: list[str]) -> dict[str, dict]:
    """name -> the deterministic cost profile (`cost.json`) its `features@<name>` stage wrote."""
    return {n: read_json(Path(features_root) / n / "cost.json") for n in names}

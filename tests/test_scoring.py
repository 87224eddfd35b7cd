"""Ranking and selection of candidates (the agreement statistics: tests/test_agreement.py)."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.core.io import write_npy
from transferlab.scoring.selection import score_candidates


def _cache(root, name, separation, seed, logits=True):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 20)
    centers = rng.normal(size=(3, 8)) * separation
    write_npy(root / name / "train_features.npy", (centers[y] + rng.normal(size=(60, 8))).astype(np.float32))
    if logits:
        write_npy(root / name / "train_logits.npy", rng.normal(size=(60, 5)).astype(np.float32))
    return y


def test_ranking_follows_the_estimate_and_skips_controls_and_budgets(tmp_path):
    y = _cache(tmp_path, "good", 6.0, 0)
    _cache(tmp_path, "okay", 1.5, 1)
    _cache(tmp_path, "noise", 0.0, 2, logits=False)
    _cache(tmp_path, "control", 8.0, 3, logits=False)
    kinds = {"good": "packaged", "okay": "packaged", "noise": "checkpoint", "control": "random_init"}
    costs = {"good": {"params": 5_000_000}, "okay": {"params": 1_000}, "noise": {"params": 1}, "control": {"params": 1}}
    out = score_candidates(tmp_path, kinds, y, estimators=["logme", "leep"], select_by="logme", seed=0, costs=costs)
    assert out["ranking"][:2] == ["control", "good"] and out["ranking"][-1] == "noise"
    assert out["selected"] == "good" and "control" in out["excluded"]
    assert out["candidates"]["noise"]["leep"] is None  # no source classifier
    budget = score_candidates(
        tmp_path, kinds, y, estimators=["logme"], select_by="logme", seed=0, costs=costs, max_params=10_000
    )
    assert budget["selected"] == "okay" and "max_params" in budget["excluded"]["good"]
    with pytest.raises(ValueError, match="no candidate can be selected"):
        score_candidates(tmp_path, kinds, y, estimators=["logme"], select_by="logme", seed=0, costs=costs, max_params=0)
    with pytest.raises(KeyError, match="valid names"):
        score_candidates(tmp_path, kinds, y, estimators=["logmee"], select_by="logme", seed=0, costs=costs)


def test_null_estimates_are_left_out_of_the_ranking_with_their_reason(tmp_path):
    # "wide" has more dims than samples: H-score is undefined there (it would be C - 1 for any features).
    y = _cache(tmp_path, "good", 6.0, 0)
    _cache(tmp_path, "okay", 1.5, 1)
    rng = np.random.default_rng(5)
    write_npy(tmp_path / "wide" / "train_features.npy", rng.normal(size=(60, 100)).astype(np.float32))
    kinds = {"good": "packaged", "okay": "packaged", "wide": "packaged"}
    out = score_candidates(tmp_path, kinds, y, estimators=["hscore", "logme"], select_by="hscore", seed=0, costs={})
    assert out["ranking"] == ["good", "okay"]
    assert "saturates" in out["unranked"]["wide"] and "wide" in out["excluded"]
    row = out["candidates"]["wide"]
    assert row["hscore"] is None and row["rank"] is None and "saturates" in row["undefined"]["hscore"]
    assert isinstance(row["logme"], float)
    assert "leep" not in out["definitions"] and set(out["definitions"]) == {"hscore", "logme"}


def test_definitions_tell_the_cross_validated_probe_from_the_trained_one(tmp_path):
    y = _cache(tmp_path, "good", 6.0, 0)
    _cache(tmp_path, "okay", 1.5, 1)
    out = score_candidates(
        tmp_path,
        {"good": "packaged", "okay": "packaged"},
        y,
        estimators=["linear_probe_accuracy"],
        select_by="linear_probe_accuracy",
        seed=0,
        costs={},
    )
    text = out["definitions"]["linear_probe_accuracy"]
    assert "cross-validated" in text and "train split only" in text and "train@linear_probe" in text

"""The label-budget sweep: the power-law fit (recovers known curves, refuses others), the answers read off the
curves (effective data, crossover, 'not within'), the nested budget subsets, the params check, and a tiny
`dvc repro curve/dvc.yaml` end to end."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from transferlab.data.budgets import budget_subset, extra_pool
from transferlab.data.loaders import RawDataset
from transferlab.data.splits import Prepared
from transferlab.evaluation.curve import (
    CurveInputs,
    analyse_curve,
    crossover,
    effective_data,
    fit_power_law,
    labels_needed,
)

N = np.array([10, 25, 50, 100, 200, 400], dtype=float)


def power(n, a, b, c):
    return a * np.asarray(n, dtype=float) ** (-b) + c


@pytest.mark.parametrize("a,b,c", [(0.8, 0.5, 0.1), (2.0, 0.9, 0.05), (0.5, 0.3, 0.0)])
def test_fit_recovers_known_parameters_without_noise(a, b, c):
    fit = fit_power_law(N, power(N, a, b, c), np.full(len(N), 0.005))
    assert fit.holds, fit.reason
    assert fit.a == pytest.approx(a, rel=0.03) and fit.b == pytest.approx(b, rel=0.02)
    assert fit.c == pytest.approx(c, abs=0.003)


def test_fit_recovers_known_parameters_with_small_noise():
    rng = np.random.default_rng(0)
    a, b, c, se = 0.8, 0.5, 0.1, 0.003
    err = power(N, a, b, c) + rng.normal(0, se, len(N))
    fit = fit_power_law(N, err, np.full(len(N), se))
    assert fit.holds, fit.reason
    assert fit.b == pytest.approx(b, rel=0.25) and fit.c == pytest.approx(c, abs=0.02)
    assert float(np.abs(fit.error(N) - power(N, a, b, c)).max()) < 2 * se


@pytest.mark.parametrize(
    "err",
    [
        [0.5, 0.5, 0.5, 0.1, 0.1, 0.1],  # a step
        [0.10, 0.15, 0.20, 0.25, 0.30, 0.35],  # error rising with more data
    ],
    ids=["step", "rising"],
)
def test_fit_says_does_not_hold_on_a_curve_that_is_not_a_power_law(err):
    fit = fit_power_law(N, err, np.full(len(N), 0.01))
    assert not fit.holds and fit.reason.startswith("does not hold")


@pytest.mark.parametrize("k", [2.0, 5.0])
def test_effective_data_of_a_curve_shifted_by_k_is_k_minus_1_times_n(k):
    """Scratch needs k times the strategy's labels for the same error: err_s(n) = err_t(n / k)."""
    a, b, c = 0.8, 0.5, 0.1
    fit_s = fit_power_law(N, power(N / k, a, b, c), np.full(len(N), 0.005))
    for n in (10, 25, 50):
        acc_t = 1 - float(power(n, a, b, c))
        assert effective_data(fit_s, acc_t, n, limit=1e9) == pytest.approx((k - 1) * n, rel=0.05)
    # At 400: scratch needs 400 k > 1.5 x 400: beyond the range, never a number read off an extrapolation.
    assert effective_data(fit_s, 1 - float(power(400, a, b, c)), 400, limit=1.5 * 400) == math.inf


def test_crossover_at_a_known_budget_and_not_within_when_curves_never_cross():
    se = np.full(len(N), 0.005)
    strategy = fit_power_law(N, power(N, 0.3, 0.5, 0.10), se)
    scratch = fit_power_law(N, power(N, 0.9, 0.5, 0.05), se)  # 0.6 n^-0.5 = 0.05: n = 144
    assert crossover(strategy, scratch, 10, 1600) == pytest.approx(144, rel=0.03)
    never = fit_power_law(N, power(N, 0.9, 0.5, 0.15), se)
    assert crossover(strategy, never, 10, 1600) == math.inf
    assert labels_needed(strategy, 1 - 0.095, 1600) == math.inf  # below the asymptote: never
    assert labels_needed(strategy, 1 - float(power(50, 0.3, 0.5, 0.10)), 1600) == pytest.approx(50, rel=0.03)


def _inputs(budgets, acc_of, n_test=400, seeds=(0, 1)):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, n_test)
    preds, sds = {}, {}
    for m, acc in acc_of.items():
        preds[m], sds[m] = {}, {}
        k = 1 if m == "raw_pixel_logreg" else len(seeds)
        for b in budgets:
            rows = []
            for _ in range(k):
                right = rng.random(n_test) < acc(b)
                rows.append(np.where(right, y, (y + 1) % 4))
            preds[m][b], sds[m][b] = np.stack(rows), list(seeds[:k])
    return CurveInputs(y_true=y, predictions=preds, seeds=sds, notes={})


def test_analyse_curve_answers_every_item_with_intervals():
    budgets = [10, 25, 50, 100]
    inputs = _inputs(
        budgets,
        {
            "linear_probe": lambda n: 1 - power(n, 0.3, 0.5, 0.05),
            "scratch": lambda n: 1 - power(n, 1.2, 0.5, 0.02),
            "raw_pixel_logreg": lambda n: 1 - power(n, 0.6, 0.4, 0.1),
        },
        n_test=2000,
    )
    kw = dict(budgets=budgets, strategies=["linear_probe", "scratch"], scratch="scratch", classical="raw_pixel_logreg")
    out = analyse_curve(
        inputs,
        **kw,
        extrapolation_factor=4,
        n_bootstrap=60,
        min_points=3,
        target_accuracy=None,
        target_margin=0.02,
        confidence=0.95,
        seed=0,
    )
    assert set(out["gain_vs_scratch"]["linear_probe"]) == {"10", "25", "50", "100"}
    g = out["gain_vs_scratch"]["linear_probe"]["10"]
    assert g["ci_low"] <= g["gain"] <= g["ci_high"] and g["gain"] > 0.1
    eff = out["effective_data_transferred"]["linear_probe"]["10"]
    assert out["fits"]["scratch"]["holds"], out["fits"]["scratch"]["status"]
    # 0.3 n^-0.5 + 0.05 = 1.2 m^-0.5 + 0.02 at n = 10: scratch needs m = 92, so 82 more; the sampled points
    # scatter by ~0.7 points of accuracy, the interval must hold the truth.
    assert eff["ci_low"] <= 82 <= eff["ci_high"] and eff["value"] == pytest.approx(82, rel=0.35)
    assert {"value", "ci_low", "ci_high"} <= set(out["crossover_vs_scratch"]["linear_probe"])
    assert set(out["labels_needed"]) == {"linear_probe", "scratch", "raw_pixel_logreg"}
    assert out["headline"] and "transfer is worth" in out["headline"][0]
    json.dumps(out)  # JSON-ready (inf never reaches the file: it is words)


def test_analyse_curve_with_two_budgets_says_not_enough_to_fit():
    budgets = [3, 6]
    inputs = _inputs(budgets, {"linear_probe": lambda n: 0.8, "raw_pixel_logreg": lambda n: 0.6})
    out = analyse_curve(
        inputs,
        budgets=budgets,
        strategies=["linear_probe"],
        scratch=None,
        classical="raw_pixel_logreg",
        extrapolation_factor=4,
        n_bootstrap=50,
        min_points=3,
        target_accuracy=None,
        target_margin=0.02,
        confidence=0.95,
        seed=0,
    )
    assert out["fits"]["linear_probe"]["status"].startswith("not enough budgets to fit")
    assert out["crossover_vs_classical"]["linear_probe"]["value"].startswith("not enough budgets to fit")
    assert out["gain_vs_classical"]["linear_probe"]["3"]["gain"] > 0


# --- nested subsets ---------------------------------------------------------------------------------------


def _prepared_and_raw(per_class_raw=40, tpc=6):
    rng = np.random.default_rng(0)
    n_cls = 3
    raw_imgs = rng.integers(0, 255, (n_cls * per_class_raw, 8, 8, 3), dtype=np.uint8)
    raw_labels = np.repeat(np.arange(n_cls), per_class_raw)
    raw = RawDataset(images=raw_imgs, labels=raw_labels, class_names=["a", "b", "c"])
    ids = {"train": [], "val": [], "test": []}
    for c in range(n_cls):
        idx = np.flatnonzero(raw_labels == c)
        ids["train"] += list(idx[:tpc])
        ids["val"] += list(idx[tpc : tpc + 3])
        ids["test"] += list(idx[tpc + 3 : tpc + 6])
    ids = {s: np.asarray(v) for s, v in ids.items()}
    prep = Prepared(
        images={s: raw_imgs[v] for s, v in ids.items()},
        labels={s: raw_labels[v] for s, v in ids.items()},
        class_names=["a", "b", "c"],
        meta={},
        ids=ids,
    )
    return prep, raw


def test_budget_subsets_are_nested_stratified_seeded_and_leave_val_test_alone():
    prep, raw = _prepared_and_raw()
    before = {s: prep.images[s].copy() for s in ("val", "test")}
    pool = extra_pool(raw, prep, 8, seed=42, limit_per_class=20)
    subsets = {b: budget_subset(prep, b, 42, pool) for b in (2, 4, 6, 10, 20)}
    for b, sub in subsets.items():
        assert np.bincount(sub.labels).tolist() == [b, b, b] and not sub.capped
    for small, big in ((2, 4), (4, 6), (6, 10), (10, 20)):
        assert set(subsets[small].ids) < set(subsets[big].ids)
    assert set(subsets[6].ids) == set(prep.ids["train"])
    held = set(prep.ids["val"]) | set(prep.ids["test"])
    assert not held & set(subsets[20].ids)
    for s in ("val", "test"):
        assert (prep.images[s] == before[s]).all()
    again = budget_subset(prep, 4, 42, extra_pool(raw, prep, 8, seed=42, limit_per_class=5))
    assert (again.ids == subsets[4].ids).all()
    longer = budget_subset(prep, 10, 42, extra_pool(raw, prep, 8, seed=42, limit_per_class=30))
    assert set(longer.ids) == set(subsets[10].ids)  # the pool's order does not depend on its length
    other = budget_subset(prep, 4, 7, pool)
    assert set(other.ids) != set(subsets[4].ids)
    capped = budget_subset(prep, 50, 42, pool)
    assert capped.capped == {0: 26, 1: 26, 2: 26}  # 6 prepared + 20 pooled per class


def test_budget_above_the_prepared_split_needs_the_pool():
    prep, _ = _prepared_and_raw()
    with pytest.raises(ValueError, match="extra_pool"):
        budget_subset(prep, 7, 42)


# --- params -----------------------------------------------------------------------------------------------


def test_unknown_curve_strategy_is_an_error_naming_the_fix():
    from transferlab.config import parse_params
    from transferlab.params import ParamsError

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["curve"]["strategies"] = ["linear_probe", "finetune_fulll"]
    with pytest.raises(
        (ParamsError, ValueError), match=r"curve.strategies.*finetune_fulll.*add them under `strategies`"
    ):
        parse_params(raw)
    raw["curve"]["strategies"] = None
    raw["strategies"] = {"scratch": {}, "lora": {}}
    assert parse_params(raw).curve.resolved_strategies(raw["strategies"]) == ["scratch"]


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_sweep_through_dvc_repro(tmp_path):
    from tiny_repo import build, sh

    repo = build(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["curve"].update(labels_per_class=[3, 6], strategies=["linear_probe"], n_bootstrap=50)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(repo / "curve" / "pipeline.yaml", repo / "curve" / "dvc.yaml")  # what `make repro-curve` does
    sh(sys.executable, "-m", "dvc", "repro", "curve/dvc.yaml", cwd=repo)
    out = json.loads((repo / "metrics/curve.json").read_text())
    for key in (
        "points",
        "fits",
        "gain_vs_scratch",
        "gain_vs_classical",
        "effective_data_transferred",
        "crossover_vs_scratch",
        "crossover_vs_classical",
        "target_accuracy",
        "labels_needed",
        "headline",
    ):
        assert key in out, key
    assert out["budgets"] == [3, 6] and set(out["points"]) == {"linear_probe", "raw_pixel_logreg"}
    assert out["fits"]["linear_probe"]["status"].startswith("not enough budgets to fit")
    assert out["crossover_vs_classical"]["linear_probe"]["value"].startswith("not enough budgets to fit")
    assert out["effective_data_transferred"]["linear_probe"]["3"]["value"].startswith("no scratch strategy")
    assert set(out["gain_vs_classical"]["linear_probe"]) == {"3", "6"}
    assert out["points"]["linear_probe"]["6"]["reused_root_pipeline"] is True  # the default budget: not retrained
    assert json.loads((repo / "metrics/curve/points/6.json").read_text())["reused"] == "root pipeline"
    assert (repo / "curve/predictions/3/linear_probe.csv").is_file()
    assert (repo / "plots/curve.png").stat().st_size > 0 and (repo / "reports/curve.md").is_file()
    status = sh(sys.executable, "-m", "dvc", "repro", "curve/dvc.yaml", cwd=repo)
    assert "Running stage" not in status, status
    assert "curve.json" in sh(sys.executable, "-m", "dvc", "metrics", "show", cwd=repo)

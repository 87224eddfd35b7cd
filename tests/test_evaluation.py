"""Test metrics, the paired comparison table, and the raw-pixel baseline."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.evaluation.baselines import raw_pixel_logreg
from transferlab.evaluation.comparison import compare_to_baseline, equal_compute, verdict
from transferlab.evaluation.metrics import classification_metrics, expected_calibration_error
from transferlab.evaluation.stats import paired_bootstrap_gain


def test_metrics_on_a_hand_example():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    m = classification_metrics(y, proba, ["a", "b"])
    assert m["test_accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3, abs=1e-6), "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["confusion"] == [[1, 1], [0, 2]]
    assert m["balanced_accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])), abs=1e-6)


def test_ece_zero_when_confidence_matches_accuracy():
    y = np.array([0, 1, 0, 1])
    proba = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(proba, y) == 0.0
    overconfident = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.25)


def _train(converged=True, failed=False, val=0.5):
    return {"converged": converged, "training_failed": failed, "best_val_accuracy_mean": val, "lr": 0.001}


def _compare(y, preds, train, **kw):
    metrics = {n: {"test_accuracy": float((p == y).mean()), "macro_f1": 0.0} for n, p in preds.items()}
    metrics["raw"] = {"test_accuracy": 0.5, "macro_f1": 0.0, "best_val_accuracy_mean": kw.pop("raw_val", 0.1)}
    preds = {**preds, "raw": preds["scratch"]}
    return compare_to_baseline(
        y,
        preds,
        metrics,
        {**train, "raw": None},
        {},
        "scratch",
        classical="raw",
        n_bootstrap=500,
        confidence=0.95,
        seed=0,
        **kw,
    )


def test_compare_flags_better_worse_and_inconclusive():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    good = np.where(rng.random((2, 600)) < 0.9, y, (y + 1) % 3)
    base = np.where(rng.random((2, 600)) < 0.6, y, (y + 1) % 3)
    preds = {"scratch": base, "good": good, "same": base.copy()}
    train = {"scratch": _train(val=0.6), "good": _train(val=0.9), "same": _train(val=0.6)}
    out = _compare(y, preds, train)
    assert out["strategies"]["good"]["verdict"] == "better"
    # ~+0.3 with 2 seeds a side: the interval carries the seed term (stats.INTERVAL_METHOD), still clear of 0
    assert out["strategies"]["good"]["gain_vs_scratch"]["accuracy"]["ci_low"] > 0.05
    assert out["strategies"]["same"]["verdict"] == "inconclusive"
    assert "gain_vs_scratch" not in out["strategies"]["scratch"]
    assert out["recommendation"]["choice"] == "good"
    assert verdict(-0.2, -0.1) == "worse"
    with pytest.raises(KeyError, match="has no predictions"):
        compare_to_baseline(
            y, {"good": good}, {}, {}, {}, "scratch", classical="raw", n_bootstrap=100, confidence=0.95, seed=0
        )


def test_no_verdict_for_under_trained_or_failed_runs():
    """A clear gain still gets no better/worse verdict when either side did not converge or failed."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    good = np.where(rng.random((2, 400)) < 0.95, y, (y + 1) % 3)
    base = np.where(rng.random((2, 400)) < 0.4, y, (y + 1) % 3)
    preds = {"scratch": base, "good": good}
    out = _compare(y, preds, {"scratch": _train(converged=False), "good": _train(val=0.9)})
    assert out["strategies"]["good"]["verdict"] == "inconclusive (under-trained: scratch)"
    out = _compare(y, preds, {"scratch": _train(), "good": _train(failed=True, val=0.9)})
    assert out["strategies"]["good"]["verdict"] == "inconclusive (training failed: good)"
    # The failed model is never recommended, whatever its validation accuracy.
    assert out["recommendation"]["choice"] != "good"


def test_recommendation_is_chosen_on_validation_and_can_be_the_baseline():
    """Test accuracy must not drive the choice: 'lucky' is best on test but worse on validation."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    lucky = np.where(rng.random((2, 300)) < 0.95, y, (y + 1) % 3)
    steady = np.where(rng.random((2, 300)) < 0.7, y, (y + 1) % 3)
    preds = {"scratch": steady, "lucky": lucky}
    out = _compare(y, preds, {"scratch": _train(val=0.8), "lucky": _train(val=0.5)})
    assert out["recommendation"]["choice"] == "scratch"
    out = _compare(y, preds, {"scratch": _train(val=0.8), "lucky": _train(val=0.5)}, raw_val=0.85)
    assert out["recommendation"]["choice"] == "raw" and out["recommendation"]["classical_baseline_wins"]
    assert out["recommendation"]["reason"].startswith("use the baseline; transfer does not pay here")


def test_seed_bootstrap_matches_a_brute_force_computation():
    """The former method (`seed_bootstrap`, kept for comparison) resamples seeds and samples: an independent
    loop over the same random draws agrees, and with seed-to-seed spread the interval is wider."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    a = np.stack([np.where(rng.random(200) < p, y, (y + 1) % 4) for p in (0.55, 0.85)])  # a lucky seed
    b = np.stack([np.where(rng.random(200) < 0.6, y, (y + 2) % 4) for _ in range(2)])
    out = paired_bootstrap_gain(
        y, a, b, metric="accuracy", n_bootstrap=300, confidence=0.9, seed=7, method="seed_bootstrap"
    )
    draws = np.random.default_rng(7)
    gains = []
    for _ in range(300):
        idx = draws.integers(0, 200, 200)
        sa, sb = draws.integers(0, 2, 2), draws.integers(0, 2, 2)
        acc_a = np.mean([(a[k][idx] == y[idx]).mean() for k in sa])
        acc_b = np.mean([(b[k][idx] == y[idx]).mean() for k in sb])
        gains.append(acc_a - acc_b)
    lo, hi = np.quantile(gains, [0.05, 0.95])
    assert out["ci_low"] == pytest.approx(lo) and out["ci_high"] == pytest.approx(hi)
    assert out["prob_gain_le_0"] == pytest.approx(np.mean(np.asarray(gains) <= 0))
    assert out["gain"] == pytest.approx((a == y).mean() - (b == y).mean())
    one_seed = paired_bootstrap_gain(
        y, a[1:], b[:1], metric="accuracy", n_bootstrap=300, confidence=0.9, seed=7, method="seed_bootstrap"
    )
    assert (out["ci_high"] - out["ci_low"]) > (one_seed["ci_high"] - one_seed["ci_low"])


def test_macro_f1_bootstrap_point_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, 300)
    a = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))[None]
    b = np.where(rng.random(300) < 0.5, y, rng.integers(0, 5, 300))[None]
    out = paired_bootstrap_gain(y, a, b, metric="macro_f1", n_bootstrap=50, confidence=0.95, seed=0)
    want = f1_score(y, a[0], average="macro") - f1_score(y, b[0], average="macro")
    assert out["gain"] == pytest.approx(want)


def test_equal_compute_reads_the_scratch_curve():
    strategy = [
        [
            {"epoch": 1, "train_gflops": 10.0, "val_accuracy": 0.7, "val_loss": 0.9},
            {"epoch": 2, "train_gflops": 20.0, "val_accuracy": 0.8, "val_loss": 0.7},
        ]
    ]
    scratch = [
        [
            {"epoch": e, "train_gflops": 8.0 * e, "val_accuracy": a, "val_loss": 1.0}
            for e, a in enumerate([0.3, 0.5, 0.7, 0.82], 1)
        ]
    ]
    ec = equal_compute(strategy, scratch)
    assert ec["strategy_gflops"] == 20.0 and ec["strategy_val_accuracy"] == 0.8
    assert ec["scratch_val_accuracy_at_that_compute"] == 0.5  # epochs 1-2 (16 GFLOPs) fit within 20
    assert ec["scratch_gflops_to_match"] == 32.0
    never = [[{"epoch": 1, "train_gflops": 30.0, "val_accuracy": 0.4, "val_loss": 1.0}]]
    ec = equal_compute(strategy, never)
    assert ec["scratch_val_accuracy_at_that_compute"] is None and ec["scratch_gflops_to_match"] is None


def test_equal_compute_measures_at_the_checkpoint_kept():
    """A tie on validation accuracy goes to the lower validation loss (the weights fit keeps), not the
    earlier epoch: equal compute is read at the kept checkpoint's compute."""
    strategy = [
        [
            {"epoch": 1, "train_gflops": 10.0, "val_accuracy": 0.8, "val_loss": 0.9},
            {"epoch": 2, "train_gflops": 20.0, "val_accuracy": 0.8, "val_loss": 0.6},
            {"epoch": 3, "train_gflops": 30.0, "val_accuracy": 0.8, "val_loss": 0.6},
        ]
    ]
    scratch = [[{"epoch": 1, "train_gflops": 15.0, "val_accuracy": 0.5, "val_loss": 1.0}]]
    assert equal_compute(strategy, scratch)["strategy_gflops"] == 20.0  # epoch 2: lower loss, then earlier


def test_fit_keeps_the_best_row_of_its_history(tiny_source, tiny_data):
    """The loop's kept checkpoint and `best_row` of its history are the same epoch (one definition)."""
    import copy

    import torch

    from transferlab.core.seeding import seed_everything
    from transferlab.models.inference import extract
    from transferlab.strategies import get_strategy, strategy_config
    from transferlab.training.protocol import TrainRecipe, train_strategy
    from transferlab.training.rules import best_row

    features = {
        s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std)[0]
        for s in ("train", "val")
    }
    res = train_strategy(
        get_strategy("linear_probe"),
        strategy_config("linear_probe", {"lr": 0.01}),
        copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=8, batch_size=8, patience=8, weight_decay=0.0, device=torch.device("cpu")),
        seed=0,
        generator=seed_everything(0),
        features=features,
    )
    assert len(res.history) == 8
    assert res.best_epoch == best_row(res.history)["epoch"]


def test_raw_pixel_baseline_chooses_C_on_validation(tiny_data):
    val_proba, proba, search = raw_pixel_logreg(
        tiny_data["images"], tiny_data["labels"], C_grid=[1.0, 1e-6], max_iter=200, seed=0
    )
    assert proba.shape == (18, 3) and val_proba.shape == (12, 3)
    assert (proba.argmax(1) == tiny_data["labels"]["test"]).mean() > 0.9
    assert [g["C"] for g in search["grid"]] == [1e-6, 1.0]
    best = max(search["grid"], key=lambda g: g["val_accuracy"])["val_accuracy"]
    assert search["val_accuracy"] == best


def test_recommendation_breaks_exact_ties_by_compute_and_names_the_close_ones():
    from transferlab.evaluation.comparison import recommend

    val = {"scratch": 0.79, "finetune_full": 0.79, "lora": 0.78, "raw": 0.70}
    trusted = dict.fromkeys(val, True)
    out = recommend(
        val, trusted, "raw", n_val=300, train_gflops={"scratch": 900.0, "finetune_full": 1300.0, "lora": 1.0}
    )
    assert out["choice"] == "scratch"  # same validation accuracy, less compute; not the alphabetical first
    se = (0.79 * 0.21 / 300) ** 0.5
    assert out["val_standard_error"] == pytest.approx(se, abs=1e-6)
    assert out["within_noise_of_best"] == ["finetune_full", "lora"]  # 0.70 is more than one SE below


# --- evaluate@'s computation: evaluate_model, and the audit's re-evaluation with it -------------------------

TINY_SPEC = {"kind": "random_init", "arch": "test_efficientnet"}
PIPELINE_SEED = 42


def _write_prepared(out) -> None:
    from transferlab.data.splits import save_prepared

    rng = np.random.default_rng(0)
    splits = {}
    for offset, (split, n) in enumerate((("train", 6), ("val", 6), ("test", 15))):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, (n, 32, 32, 3), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, c * 10 : c * 10 + 10] = 230
        splits[split] = {"images": images, "labels": labels, "source_index": np.arange(n) + 100 * offset}
    save_prepared(out, splits, ["a", "b", "c"], {})


def _write_models(out, kind: str, seeds=(0, 1)) -> None:
    """What train@ saves for `kind` (weights nudged off their initialisation, so every seed differs)."""
    import copy

    import torch

    from transferlab.core import layout
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec
    from transferlab.strategies import get_strategy, strategy_config

    spec = SourceSpec.model_validate(TINY_SPEC)
    source = load_source("tiny", spec, seed=PIPELINE_SEED)
    strategy = get_strategy(kind)
    for seed in seeds:
        model = strategy.build(copy.deepcopy(source), 3, strategy_config(kind, {"kind": kind}), seed)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        meta = {
            "strategy": kind,
            "kind": kind,
            "source": "tiny",
            "arch": source.arch,
            "num_classes": 3,
            "class_names": ["a", "b", "c"],
            "mean": list(source.mean),
            "std": list(source.std),
            "pretrained": strategy.pretrained,
            "source_spec": spec.model_dump(),
            "lr": 0.01,
        }
        strategy.save(model, layout.seed_dir(out, seed), {**meta, "seed": seed})


@pytest.mark.parametrize("kind", ["scratch", "lora"])
def test_evaluate_model_pools_every_seed_and_loads_the_source_from_the_model_folder(tmp_path, kind):
    """LoRA rebuilds its base from the spec in model_meta.json: no `sources` params are involved."""
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.predictions import deployed_latency_ms, evaluate_model
    from transferlab.models.costs import count_parameters

    _write_prepared(tmp_path / "prepared")
    _write_models(tmp_path / "models", kind)
    data = load_prepared(tmp_path / "prepared")
    ev = evaluate_model(tmp_path / "models", data, seed=PIPELINE_SEED, pretrained_dir=tmp_path / "pretrain")
    m = ev.metrics
    assert m["seeds"] == 2 and set(m["per_seed"]) == {"0", "1"} and m["test_samples"] == 15
    assert m["test_accuracy"] == pytest.approx(np.mean([r["test_accuracy"] for r in m["per_seed"].values()]), abs=1e-6)
    assert m["params_millions"] == round(count_parameters(ev.model) / 1e6, 4) and m["artifact_size_mb"] > 0
    assert "confusion" not in m and np.asarray(ev.confusion).sum() == 30
    frame = ev.predictions
    assert len(frame) == 30 and list(frame["seed"].unique()) == [0, 1]
    assert list(frame.columns) == ["sample_id", "seed", "y_true", "y_pred", "p_a", "p_b", "p_c"]
    for seed, rows in frame.groupby("seed"):
        acc = float((rows["y_pred"] == rows["y_true"]).mean())
        assert m["per_seed"][str(seed)]["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert list(ev.confusion_rows.columns) == ["actual", "predicted"] and len(ev.confusion_rows) == 30
    again = evaluate_model(tmp_path / "models", data, seed=PIPELINE_SEED, pretrained_dir=tmp_path / "pretrain")
    assert again.metrics == m and again.predictions.equals(frame)
    perf = deployed_latency_ms(ev, data.images["test"], 4)
    assert set(perf) == {"latency_ms_per_image_batch1", "latency_ms_per_image_batch32"}
    assert all(v > 0 for v in perf.values())


def test_evaluate_model_names_the_fix_for_a_model_saved_without_its_source_spec(tmp_path):
    from transferlab.core.io import read_json, write_json
    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.predictions import evaluate_model

    _write_prepared(tmp_path / "prepared")
    _write_models(tmp_path / "models", "scratch", seeds=(0,))
    path = tmp_path / "models" / "seed_0" / "model_meta.json"
    write_json(path, {k: v for k, v in read_json(path).items() if k != "source_spec"})
    with pytest.raises(ValueError, match=r"no \['source_spec'\].*train@scratch"):
        evaluate_model(tmp_path / "models", load_prepared(tmp_path / "prepared"), seed=0, pretrained_dir=tmp_path)


def test_audit_reevaluate_reruns_evaluate_on_the_paths_of_its_locked_command(tmp_path):
    """`audit --reevaluate` recomputes what evaluate@ wrote (same function, the paths dvc.lock names), and a
    recorded number that was edited afterwards is a mismatch."""
    import shutil
    from pathlib import Path

    import yaml

    from transferlab.data.splits import load_prepared
    from transferlab.evaluation.predictions import evaluate_model
    from transferlab.provenance.audit import AuditError, StrategyAudit, check_reevaluation, reevaluate

    root = tmp_path
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", root / "params.yaml")
    _write_prepared(root / "inputs" / "prepared")
    _write_models(root / "trained" / "scratch", "scratch")
    cmd = (
        "python -m stages.evaluate --strategy scratch --prepared inputs/prepared --model trained/scratch "
        "--metrics metrics/eval/scratch.json --predictions predictions/scratch.csv"
    )
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate@scratch": {"cmd": cmd}}}))
    recorded = evaluate_model(
        root / "trained" / "scratch",
        load_prepared(root / "inputs" / "prepared"),
        seed=PIPELINE_SEED,
        pretrained_dir=root / "models" / "pretrain",
    ).metrics
    recomputed = reevaluate(root, "scratch")
    assert recomputed == recorded
    a = StrategyAudit("scratch", "workspace", "0" * 40)
    check_reevaluation(a, recomputed, recorded)
    assert a.checks[-1].status == "ok"
    check_reevaluation(a, recomputed, {**recorded, "macro_f1": recorded["macro_f1"] + 0.01})
    assert a.checks[-1].status == "mismatch" and "macro_f1" in a.checks[-1].detail
    with pytest.raises(AuditError, match="evaluate@lora"):
        reevaluate(root, "lora")

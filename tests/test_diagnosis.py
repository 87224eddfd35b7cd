"""Findings: each problem is flagged where it is built in, and stays quiet where it is absent."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from transferlab.core.seeding import seed_everything
from transferlab.diagnosis import findings as dx
from transferlab.reporting.diagnosis_md import to_markdown
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.protocol import TrainRecipe, train_strategy


def _preds(y, acc, seed):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(y)) < acc, y, (y + 1) % 3)


def test_negative_transfer_flagged_only_when_the_whole_interval_is_below_zero():
    y = np.random.default_rng(0).integers(0, 3, 800)
    refs = {"scratch": _preds(y, 0.7, 1), "raw_pixel_logreg": _preds(y, 0.9, 2)}
    out = {
        f["subject"]: f
        for f in dx.negative_transfer(
            y,
            {"bad": _preds(y, 0.4, 3), "good": _preds(y, 0.95, 4), "between": _preds(y, 0.72, 5)},
            refs,
            n_bootstrap=300,
            seed=0,
        )
    }
    assert out["bad"]["flagged"] and out["bad"]["severity"] == "critical"
    assert not out["good"]["flagged"] and out["good"]["severity"] == "ok"
    assert out["between"]["flagged"] and out["between"]["severity"] == "warning"  # below raw pixels only
    assert out["between"]["evidence"]["below"] == ["raw_pixel_logreg"]


def test_remedy_outcome_verdicts():
    y = np.random.default_rng(0).integers(0, 3, 800)
    before, after = _preds(y, 0.5, 1), _preds(y, 0.9, 2)
    assert dx.remedy_outcome(y, before, after, 300, 0, "x")["verdict"] == "helped"
    assert dx.remedy_outcome(y, after, before, 300, 0, "x")["verdict"] == "hurt"
    assert dx.remedy_outcome(y, before, before, 300, 0, "x")["verdict"] == "no clear effect"


def test_overfitting_gap():
    hist = lambda tr, va: [{"epoch": 1, "train_accuracy": tr, "val_accuracy": va, "train_loss": 0.1, "val_loss": 0.2}]  # noqa: E731
    out = {f["subject"]: f for f in dx.overfitting({"over": hist(1.0, 0.6), "fine": hist(0.82, 0.8)}, 0.15)}
    assert out["over"]["flagged"] and not out["fine"]["flagged"]
    assert out["over"]["evidence"]["accuracy_gap_at_best"] == 0.4


def test_lr_sensitivity_chooses_on_validation_and_flags_a_rate_that_wrecks_the_source():
    def row(lr, val, test, drop):
        return {
            "lr": lr,
            "val_accuracy": val,
            "test_accuracy": test,
            "source_accuracy_drop": drop,
        }  # noqa: E731

    calm = [row(1e-4, 0.8, 0.7, 0.01), row(1e-3, 0.79, 0.9, 0.01)]
    f = dx.lr_sensitivity(calm, spread_threshold=0.1, forgetting_threshold=0.1)
    assert not f["flagged"]
    assert f["evidence"]["best_lr_on_validation"] == 1e-4  # the test split's favourite (1e-3) is not chosen
    wild = calm + [row(0.1, 0.3, 0.3, 0.6)]
    f = dx.lr_sensitivity(wild, spread_threshold=0.1, forgetting_threshold=0.1)
    assert f["flagged"] and f["evidence"]["rates_that_wreck_the_source_task"] == [0.1]


def _history(losses, val_accs):
    return [
        {"epoch": i + 1, "train_loss": lo, "train_accuracy": va, "val_loss": lo, "val_accuracy": va, "lr": 1e-3}
        for i, (lo, va) in enumerate(zip(losses, val_accs, strict=True))
    ]


def test_training_failed_flags_a_run_at_chance_with_a_flat_loss_and_not_a_normal_one():
    ln10 = float(np.log(10))
    failed = dx.training_failed("x", 0, _history([ln10, ln10 + 0.001, ln10], [0.1, 0.11, 0.1]), {"lr": 0.003}, 10)
    assert failed["flagged"] and failed["severity"] == "critical"
    (why,) = failed["evidence"]["reasons"]
    assert why.startswith("history: ") and "near chance" in why and "never fell below 90% of ln(C)" in why
    assert failed["evidence"]["train_loss_first_last"] == [round(ln10, 6), round(ln10, 6)]
    assert failed["evidence"]["rule"] == "transferlab.training.loop.training_failure"
    assert "0.003" in failed["remedy"]
    normal = dx.training_failed("x", 0, _history([2.0, 1.0, 0.6], [0.5, 0.7, 0.8]), {}, 10)
    assert not normal["flagged"] and normal["evidence"]["reasons"] == []
    diverged = dx.training_failed("x", 0, _history([2.0, 1.0, float("nan")], [0.5, 0.7, 0.8]), {}, 10)
    assert diverged["flagged"] and diverged["evidence"]["reasons"] == ["loss not finite (diverged)"]
    # A loss that rose late is not a failure: the best validation epoch is what the train stage keeps.
    assert not dx.training_failed("x", 0, _history([2.0, 1.0, 5.0], [0.5, 0.7, 0.8]), {}, 10)["flagged"]
    assert dx.training_failed("x", 0, [], {}, 10)["evidence"]["reasons"] == ["no history"]
    told = dx.training_failed(
        "x", 1, _history([2.0, 0.6], [0.5, 0.8]), {"training_failed": True, "failure_reason": "nan"}, 10
    )
    assert told["flagged"] and told["evidence"]["reasons"] == ["train stage: nan"]


@pytest.mark.parametrize("best_val", [0.1, 0.15, 0.19, 0.2, 0.5])
@pytest.mark.parametrize("min_loss_share", [0.5, 0.89, 0.9, 0.95, 1.0])
def test_training_failed_is_the_train_stages_rule(best_val, min_loss_share):
    """One rule: the diagnosis flags a run exactly when the train stage's `training_failure` does."""
    from transferlab.training.loop import training_failure

    ln10 = float(np.log(10))
    hist = _history([ln10 * 1.01, ln10 * min_loss_share], [best_val / 2, best_val])
    f = dx.training_failed("x", 0, hist, {}, 10)
    assert f["flagged"] == (training_failure(hist, 10, best_val) is not None)


def test_resolution_flags_only_a_size_far_below_the_source_size():
    low = dx.resolution("lite0", 48, 224, ratio_threshold=0.5, size_origin="timm")
    assert low["flagged"] and low["evidence"]["ratio"] == round(48 / 224, 6)
    assert not dx.resolution("lite0", 160, 224, ratio_threshold=0.5, size_origin="timm")["flagged"]


def _trained_source(tiny_source, tiny_data):
    """A tiny 'pre-trained' source: test_efficientnet trained on the tiny task (3 classes)."""
    cfg = strategy_config("finetune_full", {"epochs": 3, "lr": 0.01, "backbone_lr_mult": 1.0})
    result = train_strategy(
        get_strategy("finetune_full"),
        cfg,
        tiny_source,
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=3, batch_size=8, patience=3, weight_decay=0.0),
        seed=0,
        generator=seed_everything(0),
    )
    return result.model


def test_forgetting_proxy_quiet_when_unchanged_and_flagged_when_wrecked(tiny_source, tiny_data):
    source = _trained_source(tiny_source, tiny_data)
    images = tiny_data["images"]["test"]
    same = dx.forgetting_by_proxy(
        source, copy.deepcopy(source), images, (0.5,) * 3, (0.5,) * 3, agreement_threshold=0.5
    )
    assert not same["flagged"] and same["evidence"]["source_top1_agreement"] == 1.0
    assert all(c > 0.999 for c in same["evidence"]["cka_per_stage"])
    assert all(v == 0 for v in same["evidence"]["relative_weight_drift"].values())
    wrecked = copy.deepcopy(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrecked.named_parameters():
            if not name.startswith("classifier"):
                p.copy_(torch.randn_like(p))
    bad = dx.forgetting_by_proxy(source, wrecked, images, (0.5,) * 3, (0.5,) * 3, agreement_threshold=0.9)
    assert bad["flagged"]
    assert min(bad["evidence"]["relative_weight_drift"].values()) > 0.5


def test_exact_forgetting_after_fine_tuning_at_a_wrecking_rate(tiny_source, tiny_data):
    source = _trained_source(tiny_source, tiny_data)
    head = copy.deepcopy(source.get_classifier())
    images, labels = tiny_data["images"]["test"], tiny_data["labels"]["test"]
    before = (dx.source_head_predictions(source, head, images, (0.5,) * 3, (0.5,) * 3) == labels).mean()
    # A different target task (labels permuted) at a very high rate pulls the backbone away from the source.
    from transferlab.models.sources import SourceModel

    src = SourceModel("s", "test_efficientnet", copy.deepcopy(source), (0.5,) * 3, (0.5,) * 3, True, "t", None)
    shifted = {k: (v + 1) % 3 for k, v in tiny_data["labels"].items()}
    cfg = strategy_config("finetune_full", {"lr": 1.0, "backbone_lr_mult": 1.0})
    tuned = train_strategy(
        get_strategy("finetune_full"),
        cfg,
        src,
        tiny_data["images"],
        shifted,
        3,
        TrainRecipe(epochs=2, batch_size=8, patience=2, weight_decay=0.0),
        seed=0,
        generator=seed_everything(0),
    ).model
    after = (dx.source_head_predictions(tuned, head, images, (0.5,) * 3, (0.5,) * 3) == labels).mean()
    assert before > 0.9 and before - after > 0.3


def test_domain_shift_quiet_for_same_domain_and_flagged_for_a_shift(tiny_source, tiny_data):
    model = copy.deepcopy(tiny_source.model)  # BN statistics are set below
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 16)), rng.normal(size=(120, 16))
    imgs = tiny_data["images"]["train"]
    # The source's own BN statistics on its own training images: re-estimated exactly there, so gap ~ 0.
    from transferlab.strategies.adabn import reestimate_bn_stats
    from transferlab.training.loop import image_batches

    reestimate_bn_stats(model, image_batches(imgs, {"mean": (0.5,) * 3, "std": (0.5,) * 3}, "none", None), len(imgs))
    kw = dict(n_permutations=100, seed=0, pad_threshold=1.0, bn_gap_threshold=0.5, source_domain="s")
    same = dx.domain_shift(model, imgs, a, b, (0.5,) * 3, (0.5,) * 3, **kw)
    assert not same["flagged"] and same["evidence"]["bn_mean_gap_avg"] < 0.05
    shifted = rng.integers(0, 256, imgs.shape, dtype=np.uint8)  # uniform noise: another domain entirely
    far = dx.domain_shift(model, shifted, a, b + 3.0, (0.5,) * 3, (0.5,) * 3, **kw)
    assert far["flagged"] and far["evidence"]["proxy_a_distance"] > 1.5 and far["evidence"]["mmd_p_value"] < 0.05
    assert set(far["evidence"]["flagged_by"]) == {"bn_statistics_gap", "mmd_and_proxy_a_distance"}


def test_domain_shift_without_source_images_is_not_measurable_and_never_flagged_by_a_stand_in(tiny_source, tiny_data):
    model = copy.deepcopy(tiny_source.model)  # BN statistics are set below
    imgs = tiny_data["images"]["train"]
    from transferlab.strategies.adabn import reestimate_bn_stats
    from transferlab.training.loop import image_batches

    reestimate_bn_stats(model, image_batches(imgs, {"mean": (0.5,) * 3, "std": (0.5,) * 3}, "none", None), len(imgs))
    f = dx.domain_shift(
        model,
        imgs,
        None,
        None,
        (0.5,) * 3,
        (0.5,) * 3,
        n_permutations=100,
        seed=0,
        pad_threshold=1.0,
        bn_gap_threshold=0.5,
        source_domain="s",
    )
    assert not f["flagged"] and f["remedy_result"] is None
    assert f["evidence"]["proxy_a_distance"] == dx.NOT_MEASURABLE and f["evidence"]["mmd2"] == dx.NOT_MEASURABLE
    assert "not measurable offline" in to_markdown([f], dx.summarize([f]))


def test_summary_and_markdown():
    findings = [
        dx.finding("overfitting", "a", True, "warning", {"accuracy_gap_at_best": 0.3, "threshold": 0.1}, "r"),
        dx.finding("overfitting", "b", False, "warning", {"accuracy_gap_at_best": 0.0, "threshold": 0.1}, "r"),
    ]
    s = dx.summarize(findings)
    assert s == {"by_type": {"overfitting": {"checked": 2, "flagged": 1}}, "worst_severity": "warning", "flagged": 1}
    md = to_markdown(findings, s)
    assert "**WARNING** `a`" in md and "ok `b`" in md
    y = np.random.default_rng(0).integers(0, 3, 400)
    findings[0]["remedy_result"] = dx.remedy_outcome(
        y, _preds(y, 0.5, 1), _preds(y, 0.9, 2), 200, 0, "x", confidence=0.9
    )
    assert "(90% CI)" in to_markdown(findings, s) and "95%" not in to_markdown(findings, s)


def test_check_registry_lists_every_check_and_names_the_valid_ones_on_a_typo():
    from transferlab.diagnosis.checks import CHECKS, get_check

    expected = {
        "training_failed",
        "negative_transfer",
        "forgetting_proxy",
        "forgetting_exact",
        "domain_shift",
        "resolution",
        "overfitting",
        "text_domain_shift",
        "text_forgetting",
    }
    assert set(CHECKS) == expected and all(get_check(n).name == n for n in expected)
    with pytest.raises(KeyError, match="valid: .*domain_shift"):
        get_check("domain_shfit")


def test_per_seed_records_reads_the_train_stage_layout():
    from transferlab.diagnosis.checks.training_failed import per_seed_records

    recs = per_seed_records({"lr": 0.003, "per_seed": {"0": {"converged": True}, "1": {"training_failed": True}}})
    assert recs == {0: {"lr": 0.003, "converged": True}, 1: {"lr": 0.003, "training_failed": True}}
    assert per_seed_records({"best_epoch": 3}) == {-1: {"best_epoch": 3}}


def test_stratified_probe_covers_every_class_when_rows_are_class_ordered():
    from transferlab.diagnosis.measures import stratified_indices

    y = np.repeat(np.arange(10), 100)  # the old `images[:256]` would see 3 classes
    idx = stratified_indices(y, 256, seed=0)
    assert len(idx) == 256 and set(np.bincount(y[idx])) <= {25, 26}
    assert np.array_equal(idx, stratified_indices(y, 256, seed=0))
    assert not np.array_equal(idx, stratified_indices(y, 256, seed=1))


def test_restore_bn_buffers_tells_statistics_from_weights(tiny_source):
    from transferlab.diagnosis.checks.forgetting_exact import restore_bn_buffers

    source = tiny_source.model
    tuned = copy.deepcopy(source)
    with torch.no_grad():
        for m in tuned.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(1.0)
        tuned.conv_stem.weight.mul_(2.0)
    restored = restore_bn_buffers(tuned, source)
    assert torch.equal(restored.bn1.running_mean, source.bn1.running_mean)
    assert torch.equal(restored.conv_stem.weight, tuned.conv_stem.weight)  # weights stay fine-tuned
    assert not torch.equal(tuned.bn1.running_mean, source.bn1.running_mean)  # the input is not modified


def test_resolution_remedy_features_at_a_larger_size(tiny_source, tiny_data):
    from transferlab.diagnosis.checks.resolution import features_at, probe_predictions

    m = tiny_source.model
    small = {s: features_at(m, im, (0.5,) * 3, (0.5,) * 3, 32) for s, im in tiny_data["images"].items()}
    big = {s: features_at(m, im, (0.5,) * 3, (0.5,) * 3, 64) for s, im in tiny_data["images"].items()}
    assert small["train"].shape == big["train"].shape and not np.allclose(small["train"], big["train"])
    pred = probe_predictions(big, tiny_data["labels"], seed=0)
    assert pred["test"].shape == tiny_data["labels"]["test"].shape


def test_checks_of_the_other_modality_are_skipped_and_listed():
    """An image check never runs on text (and vice versa): it is listed as skipped, not silently dropped."""
    from types import SimpleNamespace

    from transferlab.diagnosis.checks import CHECKS, run_checks

    image_only = [n for n, c in CHECKS.items() if c.modalities == ("image",)]
    text_only = [n for n, c in CHECKS.items() if c.modalities == ("text",)]
    assert {"domain_shift", "resolution"} <= set(image_only) and set(text_only) == {
        "text_domain_shift",
        "text_forgetting",
    }
    ctx = SimpleNamespace(data=SimpleNamespace(modality="text"))
    findings, log = run_checks(ctx, image_only)
    assert findings == [] and sorted(log["checks_skipped"]) == sorted(image_only) and log["checks_run"] == []

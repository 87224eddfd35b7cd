"""Findings: each problem is flagged where it is built in, and stays quiet where it is absent."""

from __future__ import annotations

import copy

import numpy as np
import torch

from transferlab import diagnosis as dx
from transferlab.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training import train_strategy


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


def test_lr_sensitivity_flags_a_rate_that_wrecks_the_source():
    calm = [{"lr": lr, "target_accuracy": 0.8, "source_accuracy_drop": 0.01} for lr in (1e-4, 1e-3)]
    assert not dx.lr_sensitivity(calm, spread_threshold=0.1, forgetting_threshold=0.1)["flagged"]
    wild = calm + [{"lr": 0.1, "target_accuracy": 0.3, "source_accuracy_drop": 0.6}]
    f = dx.lr_sensitivity(wild, spread_threshold=0.1, forgetting_threshold=0.1)
    assert f["flagged"] and f["evidence"]["rates_that_wreck_the_source_task"] == [0.1]
    assert f["evidence"]["best_lr"] == 1e-4


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
        epochs=3,
        batch_size=8,
        patience=3,
        weight_decay=0.0,
        augment="none",
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
    from transferlab.backbones import SourceModel

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
        epochs=2,
        batch_size=8,
        patience=2,
        weight_decay=0.0,
        augment="none",
        seed=0,
        generator=seed_everything(0),
    ).model
    after = (dx.source_head_predictions(tuned, head, images, (0.5,) * 3, (0.5,) * 3) == labels).mean()
    assert before > 0.9 and before - after > 0.3


def test_domain_shift_quiet_for_same_domain_and_flagged_for_a_shift(tiny_source, tiny_data):
    model = _trained_source(tiny_source, tiny_data)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 16)), rng.normal(size=(120, 16))
    imgs = tiny_data["images"]["train"]
    same = dx.domain_shift(
        model, imgs, a, b, (0.5,) * 3, (0.5,) * 3, source_domain="s", n_permutations=100, seed=0, pad_threshold=1.0
    )
    assert not same["flagged"]
    far = dx.domain_shift(
        model,
        255 - imgs,
        a,
        b + 3.0,
        (0.5,) * 3,
        (0.5,) * 3,
        source_domain="s",
        n_permutations=100,
        seed=0,
        pad_threshold=1.0,
    )
    assert far["flagged"] and far["evidence"]["proxy_a_distance"] > 1.5 and far["evidence"]["mmd_p_value"] < 0.05
    assert far["evidence"]["bn_layers"] > 0


def test_summary_and_markdown():
    findings = [
        dx.finding("overfitting", "a", True, "warning", {"accuracy_gap_at_best": 0.3, "threshold": 0.1}, "r"),
        dx.finding("overfitting", "b", False, "warning", {"accuracy_gap_at_best": 0.0, "threshold": 0.1}, "r"),
    ]
    s = dx.summarize(findings)
    assert s == {"by_type": {"overfitting": {"checked": 2, "flagged": 1}}, "worst_severity": "warning", "flagged": 1}
    md = dx.to_markdown(findings, s)
    assert "**WARNING** `a`" in md and "ok `b`" in md

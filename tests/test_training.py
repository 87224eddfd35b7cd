"""The shared training protocol: plateau detection, under-training at the cap, failed training, the
learning rate chosen on validation, and one run per seed."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.core.seeding import seed_everything
from transferlab.strategies import get_strategy, strategy_config
from transferlab.training.loop import fit, tensor_batches, training_failure
from transferlab.training.protocol import TrainRecipe, train_protocol


def _blobs(n_per_class: int, d: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(123).normal(0, 1, (3, d)) * sep  # the same classes in every split
    rng = np.random.default_rng(seed)
    x = np.concatenate([centres[c] + rng.normal(0, 1, (n_per_class, d)) for c in range(3)])
    y = np.repeat(np.arange(3), n_per_class)
    return x.astype(np.float32), y


def _fit(x, y, xv, yv, epochs, patience, lr=0.05):
    seed_everything(0)
    head = nn.Linear(x.shape[1], 3)
    strategy = get_strategy("linear_probe")
    return fit(
        head,
        strategy,
        strategy_config("linear_probe", {"lr": lr}),
        tensor_batches(x),
        y,
        tensor_batches(xv),
        yv,
        TrainRecipe(epochs=epochs, batch_size=16, patience=patience, weight_decay=0.0),
        generator=torch.Generator().manual_seed(0),
    )


def test_an_easy_problem_reaches_a_plateau_before_the_cap():
    x, y = _blobs(30, 8, 3.0, 0)
    xv, yv = _blobs(10, 8, 3.0, 1)
    res = _fit(x, y, xv, yv, epochs=200, patience=4)
    conv = res.convergence
    assert res.converged and conv["stopped_by"] == "plateau"
    assert conv["epochs_run"] < 200 and conv["epochs_without_improvement"] == 4
    # The evidence: nothing gained over the last `patience` epochs.
    assert conv["val_accuracy_gain_last_epochs"] <= 0
    # The rule's verdict: flat over the last max(3, patience) epochs, and the easy problem is fitted.
    assert conv["verdict"] == "converged" and conv["trend_window"] == 4 and conv["fits_training_set"]
    assert res.best_val_accuracy > 0.9
    assert [r["lr"] for r in res.history][0] > 0 and "grad_norm" in res.history[0]


def test_a_run_cut_at_the_cap_is_marked_under_trained():
    x, y = _blobs(30, 8, 0.7, 0)
    xv, yv = _blobs(10, 8, 0.7, 1)
    res = _fit(x, y, xv, yv, epochs=2, patience=5, lr=0.001)
    assert not res.converged and res.convergence["stopped_by"] == "cap" and len(res.history) == 2


def test_reduce_on_plateau_cuts_the_rate_over_the_epochs_run():
    x, y = _blobs(30, 8, 0.5, 0)
    xv, yv = _blobs(10, 8, 0.5, 1)
    res = _fit(x, y, xv, yv, epochs=60, patience=8, lr=0.5)
    lrs = [r["lr"] for r in res.history]
    assert res.convergence["lr_reductions"] >= 1 and min(lrs) < lrs[1]


def test_training_failure_flags_chance_and_flat_loss_and_stays_quiet_otherwise():
    flat = [{"train_loss": math.log(10) + 0.01, "grad_norm": 0.0, "lr": 0.1} for _ in range(5)]
    why = training_failure(flat, 10, best_val_accuracy=0.1)
    assert "near chance" in why and "ln(C)" in why
    learning = [{"train_loss": 2.3 - 0.4 * i, "grad_norm": 1.0, "lr": 0.01} for i in range(5)]
    assert training_failure(learning, 10, best_val_accuracy=0.85) is None


def test_protocol_picks_the_rate_on_validation_and_trains_every_seed(tiny_source, tiny_data, tiny_features):
    """The grid's rates are judged on validation only (the test split is not even given), a diverging
    rate loses, the chosen rate is the search table's best, and each seed gets its own run."""
    strategy = get_strategy("linear_probe")
    no_test = {
        k: {s: v[s] for s in ("train", "val")}
        for k, v in (("images", tiny_data["images"]), ("labels", tiny_data["labels"]))
    }
    out = train_protocol(
        strategy,
        strategy_config("linear_probe", {"lr": 0.1}),
        lambda: copy.deepcopy(tiny_source),
        no_test["images"],
        no_test["labels"],
        3,
        TrainRecipe(
            seeds=(0, 1),
            lr_grid=(0.01, 1.0, 1e30),  # 1e30: the loss explodes (diverges or never falls)
            lr_search_epochs=3,
            epochs=4,
            batch_size=8,
            patience=2,
            weight_decay=0.0,
        ),
        features=tiny_features,
        label="probe",
    )
    assert sorted(out.runs) == [0, 1]
    assert [r["lr_multiplier"] for r in out.lr_search] == [0.01, 1.0, 1e30]
    huge = out.lr_search[2]
    assert ("diverged" in huge or "failed" in huge) and not huge["chosen"]
    # The rule (LR_CHOICE_RULE): within one binomial SE of the best validation accuracy, the nearest to x1.
    ok = [r for r in out.lr_search if r["val_accuracy"] is not None and "failed" not in r]
    top = max(r["val_accuracy"] for r in ok)
    se = math.sqrt(top * (1 - top) / len(no_test["labels"]["val"]))
    within = [r for r in ok if r["val_accuracy"] >= top - se - 1e-12]
    assert [r["within_noise"] for r in ok] == [r in within for r in ok]
    chosen = min(within, key=lambda r: abs(math.log(r["lr_multiplier"])))
    assert chosen["chosen"] and out.lr == chosen["lr"]
    assert out.lr_choice["candidates"] == sorted(r["lr"] for r in within) and out.lr_choice["chosen_lr"] == out.lr
    w0, w1 = (out.runs[s].model.get_classifier().weight for s in (0, 1))
    assert not torch.equal(w0, w1)


def test_a_best_rate_on_the_grid_edge_extends_the_grid(tiny_source, tiny_data, tiny_features):
    """Tiny rates all under-train; the best sits on the upper edge, so one more step beyond it is tried."""
    out = train_protocol(
        get_strategy("linear_probe"),
        strategy_config("linear_probe", {"lr": 1.0}),
        lambda: copy.deepcopy(tiny_source),
        tiny_data["images"],
        tiny_data["labels"],
        3,
        TrainRecipe(
            seeds=(0,),
            lr_grid=(1e-5, 1e-4),
            lr_search_epochs=2,
            lr_grid_extend=1,
            epochs=2,
            batch_size=8,
            patience=2,
            weight_decay=0.0,
        ),
        features=tiny_features,
        label="probe",
    )
    live = [r for r in out.lr_search if not r.get("superseded")]
    mults = [r["lr_multiplier"] for r in live]
    assert len(mults) == 3 and mults[-1] == pytest.approx(1e-3)
    # Such tiny rates leave every 2-epoch run at chance: the grid is tried again at twice the budget first.
    superseded = [r for r in out.lr_search if r.get("superseded")]
    assert [r["epochs"] for r in superseded] == [2, 2] and {r["epochs"] for r in live} == {4}


def test_channels_last_trains_reproducibly_and_hands_back_a_saveable_model(tiny_source, tiny_data, tmp_path):
    """Channels-last training: the same numbers on a rerun, contiguous weights afterwards (a LoRA adapter is
    saved with safetensors, which refuses other layouts), and a reload that predicts exactly the same."""
    from transferlab.models.inference import predict_logits, to_input
    from transferlab.training.protocol import train_strategy

    def run():
        seed_everything(0)
        return train_strategy(
            get_strategy("lora"),
            strategy_config("lora", {"rank": 2}),
            copy.deepcopy(tiny_source),
            tiny_data["images"],
            tiny_data["labels"],
            3,
            TrainRecipe(epochs=1, batch_size=8, patience=1, weight_decay=0.0, augment="crop_flip", channels_last=True),
            seed=0,
            generator=torch.Generator().manual_seed(0),
        )

    a, b = run(), run()
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(p.is_contiguous() for p in a.model.parameters())
    strategy = get_strategy("lora")
    strategy.save(a.model, tmp_path, {"arch": tiny_source.arch, "num_classes": 3, "source": "tiny"})
    images = tiny_data["images"]["test"]
    logits = predict_logits(a.model, lambda i: to_input(images[i], tiny_source.mean, tiny_source.std), len(images))
    reloaded = strategy.load(tmp_path, lambda: copy.deepcopy(tiny_source))
    again = predict_logits(reloaded, lambda i: to_input(images[i], tiny_source.mean, tiny_source.std), len(images))
    assert torch.equal(logits, again)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet10t"])
def test_scratch_zero_init_starts_every_residual_block_as_the_identity(arch):
    """`strategies.scratch.zero_init_last`: each residual branch's last BatchNorm scale and the classifier at
    zero, so a from-scratch network starts at the loss of a uniform guess (ln C), not at ~2 ln C."""
    import timm

    from transferlab.strategies.scratch import zero_init_last

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    x = torch.randn(4, 3, 48, 48)
    assert not torch.allclose(model.eval()(x), torch.zeros(4, 3))  # timm's default init: unequal logits
    changed = zero_init_last(model)
    assert changed >= 4
    assert torch.equal(model.get_classifier().weight, torch.zeros_like(model.get_classifier().weight))
    logits = model.eval()(x)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).item() == pytest.approx(math.log(3))

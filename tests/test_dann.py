"""DANN (domain-adversarial training): the gradient reversal layer, the adversarial gradient the strategy's hooks
produce, the unlabelled-images contract of the training layer (refused without them, ignored by every other
strategy, bit for bit), the saved model (the plain classifier network) and the history columns."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_images

from transferlab.core.seeding import seed_everything
from transferlab.models.inference import predict_logits, to_input
from transferlab.strategies import STRATEGIES, get_strategy, strategy_config
from transferlab.strategies.base import UnlabelledBatches
from transferlab.strategies.dann import DOMAIN_HEAD, grad_reverse, grl_coefficient
from transferlab.training import protocol
from transferlab.training.protocol import TrainRecipe, train_strategy

RECIPE = TrainRecipe(epochs=2, batch_size=8, patience=5, weight_decay=0.0, augment="crop_flip")


def _shifted(images: np.ndarray) -> np.ndarray:
    """The controlled target domain: the same kind of images, colours inverted (a strong, known shift)."""
    return (255 - images).astype(np.uint8)


@pytest.fixture
def with_pool(tiny_data) -> dict:
    """The tiny splits plus an unlabelled pool of 12 shifted images (the deployment images; no labels)."""
    images = dict(tiny_data["images"])
    images["unlabelled"] = _shifted(make_images(4, 3, 32, seed=7)[0])
    return images


def _run(name, source, images, labels, recipe=RECIPE, seed=0, **cfg):
    config = strategy_config(name, {"epochs": recipe.epochs, **cfg})
    return train_strategy(
        get_strategy(config.kind),
        config,
        copy.deepcopy(source),
        images,
        labels,
        3,
        recipe,
        seed=seed,
        generator=seed_everything(seed),
        label=name,
    )


def _logits(model, source, images):
    return predict_logits(model, lambda i: to_input(images[i], source.mean, source.std), len(images))


# --- (1) the gradient reversal layer ----------------------------------------------------------------------


def test_gradient_reversal_is_the_identity_forward_and_minus_lambda_backward():
    x = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    upstream = torch.tensor([[1.0, 2.0, -4.0]])
    (y * upstream).sum().backward()
    # d/dx of sum(upstream * x) is upstream; reversed and scaled: -0.3 * upstream, by hand:
    assert torch.allclose(x.grad, torch.tensor([[-0.3, -0.6, 1.2]]))
    # Composed with autograd: the gradient of f(GRL(x)) is -lambda times that of f(x).
    x2 = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x2, 2.0) ** 2).sum().backward()
    assert torch.allclose(x2.grad, -2.0 * 2 * x2.detach())


def test_the_reversal_coefficient_follows_the_papers_schedule():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(0.3) == pytest.approx(0.905148, abs=1e-6)  # 90% of the way at 30% of the budget
    values = [grl_coefficient(p / 10, gamma=10, maximum=0.5) for p in range(11)]
    assert values == sorted(values) and values[-1] < 0.5


def test_the_domain_term_reaches_the_features_reversed_and_the_domain_head_as_is(tiny_source):
    """The strategy's hooks (`train_forward` + `loss`) give the backbone -lambda x the domain loss's gradient and
    the domain classifier + its gradient; the loss's value stays the cross-entropy."""
    strategy = get_strategy("dann")
    gen = torch.Generator().manual_seed(0)
    x, u = torch.randn(6, 3, 32, 32, generator=gen), torch.randn(6, 3, 32, 32, generator=gen) + 1.5
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def pool() -> UnlabelledBatches:
        return UnlabelledBatches(inputs=lambda idx, train: u[idx], n=6, generator=torch.Generator().manual_seed(1))

    model = strategy.build(copy.deepcopy(tiny_source), 3, strategy_config("dann", {}), seed=0).train()

    def grads(weight: float) -> tuple[dict, float, float, torch.Tensor]:
        cfg = strategy_config("dann", {"domain_weight": weight})
        state = strategy.start_run(tiny_source, cfg, None, unlabelled=pool())
        model.zero_grad()
        logits = strategy.train_forward(model, x, cfg, state, progress=0.2)
        lam = state.grl_lambda
        loss = strategy.loss(logits, y, x, cfg, state)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item(), lam, logits.detach()

    with_domain, value, lam, logits = grads(1.0)
    ce_only, _, _, _ = grads(0.0)
    assert value == pytest.approx(float(F.cross_entropy(logits, y)), abs=0)  # the reported loss is the CE
    assert lam == pytest.approx(grl_coefficient(0.2))
    # The domain loss's own gradient, without reversal: features of the same concatenated pass -> head -> BCE.
    model.zero_grad()
    feats = model.forward_head(model.forward_features(torch.cat([x, u])), pre_logits=True)
    d = getattr(model, DOMAIN_HEAD)(feats).squeeze(1)
    F.binary_cross_entropy_with_logits(d, torch.cat([torch.zeros(6), torch.ones(6)])).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, g in plain.items():
        added = with_domain[n] - ce_only[n]
        expected = g if n.startswith(DOMAIN_HEAD + ".") else -lam * g
        assert torch.allclose(added, expected, atol=1e-6, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for n, g in plain.items() if n.startswith("conv_stem"))  # it reaches the stem


# --- (2) a run on the controlled pair: history columns, compute, determinism, statelessness ---------------


def test_dann_trains_on_the_controlled_pair_and_records_the_domain_classifier(tiny_source, tiny_data, with_pool):
    strategy = get_strategy("dann")
    before = dict(vars(strategy))
    a = _run("dann", tiny_source, with_pool, tiny_data["labels"])
    assert vars(strategy) == before  # the run's state travelled in the call, not on the shared instance
    base = {"epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "grad_norm"}
    assert [set(r) for r in a.history] == [base | set(strategy.history_keys)] * len(a.history)
    for row in a.history:
        assert 0.0 <= row["domain_accuracy"] <= 1.0 and row["domain_loss"] > 0
    lams = [r["grl_lambda"] for r in a.history]
    assert 0 < lams[0] < lams[-1] < 1  # ramped over the run's step budget
    assert all(np.isfinite(v) for r in a.history for v in r.values())
    # Training compute: each labelled image is paired with an unlabelled one through the same network.
    ft = _run("finetune_full", tiny_source, tiny_data["images"], tiny_data["labels"], recipe=RECIPE.short_run(1))
    assert a.train_flops == {k: 2 * v for k, v in ft.train_flops.items()}
    # The same seed gives the same run, unlabelled draws included.
    b = _run("dann", tiny_source, with_pool, tiny_data["labels"])
    assert a.history == b.history
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_unlabelled_pool_is_drawn_in_seeded_epochs_of_its_own():
    seen = []
    pool = UnlabelledBatches(
        inputs=lambda idx, train: (seen.append((idx.copy(), train)), torch.as_tensor(idx))[1],
        n=5,
        generator=torch.Generator().manual_seed(0),
    )
    first = torch.cat([pool.draw(3), pool.draw(2)])
    assert sorted(first.tolist()) == [0, 1, 2, 3, 4]  # one pass over the pool before any image repeats
    assert len(pool.draw(4)) == 4 and all(train for _, train in seen)  # augmented like the training batches
    gen = torch.Generator().manual_seed(0)
    again = UnlabelledBatches(inputs=lambda idx, train: torch.as_tensor(idx), n=5, generator=gen)
    assert torch.equal(torch.cat([again.draw(3), again.draw(2)]), first)


# --- (3) no unlabelled images: a clear error before any work ----------------------------------------------


def test_dann_without_unlabelled_images_is_refused_before_training(tiny_source, tiny_data, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(protocol, "fit", no_training)
    with pytest.raises(ValueError, match=r"images\['unlabelled'\] missing or empty.*deploy\.data.*deployment pipeline"):
        _run("dann", tiny_source, tiny_data["images"], tiny_data["labels"])
    empty = {**tiny_data["images"], "unlabelled": tiny_data["images"]["train"][:0]}
    with pytest.raises(ValueError, match="deployment pipeline"):
        _run("dann", tiny_source, empty, tiny_data["labels"])
    wrong = {**tiny_data["images"], "unlabelled": make_images(2, 3, 16, seed=0)[0]}
    with pytest.raises(ValueError, match=r"images\['unlabelled'\] are uint8 \(16, 16, 3\).*\(32, 32, 3\)"):
        _run("dann", tiny_source, wrong, tiny_data["labels"])
    with pytest.raises(ValueError, match="pass images\\['unlabelled'\\]"):
        get_strategy("dann").start_run(tiny_source, strategy_config("dann", {}), None)


# --- (4) registry, params, save/load ----------------------------------------------------------------------


def test_dann_is_registered_and_params_accept_it():
    from pathlib import Path

    from transferlab.config import parse_params

    assert "dann" in STRATEGIES and "dann" in STRATEGIES.names()
    strategy = get_strategy("dann")
    assert strategy.uses_unlabelled and not get_strategy("finetune_full").uses_unlabelled
    cfg = strategy_config("dann", {})
    assert (cfg.domain_weight, cfg.grl_max, cfg.grl_gamma, cfg.backbone_lr_mult) == (1.0, 1.0, 10.0, 0.1)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert "dann" not in raw["strategies"]  # not in the default run: it needs deployment images
    raw["strategies"]["dann"] = {}
    assert parse_params(raw).strategies["dann"] == {}
    with pytest.raises(ValueError, match="strategies.dann.domain_weight"):
        strategy_config("dann", {"domain_weight": -1})
    with pytest.raises(ValueError, match="strategies.dann.grl_gama: unknown key"):
        strategy_config("dann", {"grl_gama": 5})


def test_dann_saves_the_plain_network_and_reloads_to_identical_logits(tiny_source, tiny_data, with_pool, tmp_path):
    strategy = get_strategy("dann")
    result = _run("dann", tiny_source, with_pool, tiny_data["labels"], recipe=RECIPE.short_run(1))
    assert any(k.startswith(DOMAIN_HEAD + ".") for k in result.model.state_dict())  # trained beside the network
    meta = {"arch": tiny_source.arch, "num_classes": 3, "mean": list(tiny_source.mean), "std": list(tiny_source.std)}
    strategy.save(result.model, tmp_path, meta)
    saved = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(DOMAIN_HEAD) for k in saved["state_dict"])
    reloaded = strategy.load(tmp_path, lambda: tiny_source)
    test = tiny_data["images"]["test"]
    assert torch.equal(_logits(reloaded, tiny_source, test), _logits(result.model, tiny_source, test))
    # The classifier network alone, loaded as finetune_full's model is.
    plain = get_strategy("finetune_full").load(tmp_path, lambda: tiny_source)
    assert torch.equal(_logits(plain, tiny_source, test), _logits(result.model, tiny_source, test))


def test_the_head_on_the_penultimate_features_is_the_models_own_forward(tiny_source):
    """`train_forward` computes the logits as classifier(forward_head(pre_logits=True)): that must be what
    `model(x)` computes, or training and evaluation would differ."""
    model = get_strategy("dann").build(copy.deepcopy(tiny_source), 3, strategy_config("dann", {}), 0).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(model.get_classifier()(feats), model(x), atol=1e-6)


# --- (5) every other strategy ignores the pool, bit for bit ------------------------------------------------


@pytest.mark.parametrize("name", ["finetune_full"])
def test_other_strategies_are_unchanged_by_an_unlabelled_pool(name, tiny_source, tiny_data, with_pool):
    plain = _run(name, tiny_source, tiny_data["images"], tiny_data["labels"])
    pooled = _run(name, tiny_source, with_pool, tiny_data["labels"])
    assert pooled.history == plain.history
    sp, sq = plain.model.state_dict(), pooled.model.state_dict()
    assert sp.keys() == sq.keys() and all(torch.equal(sp[k], sq[k]) for k in sp)
    assert pooled.train_flops == plain.train_flops

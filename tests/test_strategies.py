"""Every registered strategy on a tiny model and tiny data: trains, reports, saves and reloads exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from transferlab.core.seeding import seed_everything
from transferlab.models.costs import count_parameters
from transferlab.models.inference import extract, predict_logits, to_input
from transferlab.strategies import STRATEGIES, get_strategy, strategy_config
from transferlab.training.loop import DivergenceError
from transferlab.training.protocol import TrainRecipe, train_strategy

ALL = sorted(STRATEGIES)


def _train(name, tiny_source, tiny_data, seed=0, **overrides):
    cfg = strategy_config(name, {"epochs": 1, **overrides})
    strategy = get_strategy(cfg.kind)
    gen = seed_everything(seed)
    images = tiny_data["images"]
    if strategy.uses_unlabelled:  # dann: unlabelled deployment images beside the splits (here: colours inverted)
        images = {**images, "unlabelled": (255 - images["train"][::2]).astype(np.uint8)}
    features = None
    if strategy.uses_features:
        features = {
            s: extract(tiny_source.model, tiny_data["images"][s], tiny_source.mean, tiny_source.std, with_logits=False)[
                0
            ]
            for s in ("train", "val")
        }
    result = train_strategy(
        strategy,
        cfg,
        tiny_source,
        images,
        tiny_data["labels"],
        3,
        TrainRecipe(epochs=cfg.epochs, batch_size=8, patience=1, weight_decay=0.0, augment="crop_flip"),
        seed=seed,
        generator=gen,
        features=features,
        label=name,
    )
    return strategy, cfg, result


def _test_logits(model, source, data):
    images = data["images"]["test"]
    return predict_logits(model, lambda idx: to_input(images[idx], source.mean, source.std), len(images))


def test_registry_lists_the_core_strategies():
    assert {"scratch", "linear_probe", "finetune_top", "finetune_full", "lora"} <= set(STRATEGIES)


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(KeyError, match="valid: .*lora"):
        get_strategy("lorra")
    with pytest.raises(ValueError, match="unknown strategy kind 'lorra'"):
        strategy_config("lorra", {})
    with pytest.raises(ValueError, match=r"strategies.lora.rnak: unknown key"):
        strategy_config("lora", {"rnak": 4})


@pytest.mark.parametrize("name", ALL)
def test_strategy_trains_saves_and_reloads_exactly(name, tiny_source, tiny_data, tmp_path):
    strategy, cfg, result = _train(name, tiny_source, tiny_data)
    row = result.history[0]
    base = {"epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "grad_norm"}
    assert set(row) == base | set(strategy.history_keys)
    assert all(np.isfinite(v) for v in row.values())
    assert 0 < result.trainable_params <= result.total_params
    logits = _test_logits(result.model, tiny_source, tiny_data)
    assert logits.shape == (18, 3) and torch.isfinite(logits).all()

    meta = {"arch": tiny_source.arch, "num_classes": 3, "source": "tiny", "mean": [0.5] * 3, "std": [0.5] * 3}
    strategy.save(result.model, tmp_path, meta)
    # Reload from a *fresh* source: the saved artifact alone must carry everything that was trained.
    from transferlab.models.sources import load_source
    from transferlab.params import SourceSpec

    def fresh():
        torch.manual_seed(0)
        return load_source("tiny", SourceSpec(kind="random_init", arch=tiny_source.arch), seed=0)

    reloaded = strategy.load(tmp_path, fresh)
    assert torch.equal(_test_logits(reloaded, tiny_source, tiny_data), logits)


def test_trainable_parameter_counts_match_each_strategy(tiny_source, tiny_data):
    counts = {}
    for name in ("linear_probe", "finetune_top", "finetune_full", "lora"):
        import copy

        source = copy.deepcopy(tiny_source)
        model = get_strategy(name).build(source, 3, strategy_config(name, {}), 0)
        counts[name] = (count_parameters(model, trainable_only=True), count_parameters(model))
    head = 3 * tiny_source.model.num_features + 3
    assert counts["linear_probe"][0] == head
    assert head < counts["finetune_top"][0] < counts["finetune_full"][0] == counts["finetune_full"][1]
    assert head < counts["lora"][0] < counts["finetune_full"][0]


def test_linear_probe_keeps_the_backbone_frozen(tiny_source, tiny_data):
    before = {k: v.clone() for k, v in tiny_source.model.state_dict().items() if "classifier" not in k}
    _, _, result = _train("linear_probe", tiny_source, tiny_data)
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_top_trains_only_the_top_groups(tiny_source, tiny_data):
    before = {k: v.clone() for k, v in tiny_source.model.state_dict().items()}
    _, _, result = _train("finetune_top", tiny_source, tiny_data, k=1)
    after = result.model.state_dict()
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])  # frozen stem
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # frozen BN keeps its statistics
    top = [k for k in before if k.startswith("blocks.4") and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in top)


def test_same_seed_same_weights(tiny_source, tiny_data):
    import copy

    _, _, a = _train("finetune_full", copy.deepcopy(tiny_source), tiny_data, seed=3)
    _, _, b = _train("finetune_full", copy.deepcopy(tiny_source), tiny_data, seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b.history


def test_diverging_loss_is_a_clear_error(tiny_source, tiny_data):
    cfg = strategy_config("linear_probe", {"epochs": 1})
    bad = np.full((24, tiny_source.model.num_features), np.inf, np.float32)
    with pytest.raises(DivergenceError, match="Lower strategies.linear_probe.lr"):
        train_strategy(
            get_strategy("linear_probe"),
            cfg,
            tiny_source,
            tiny_data["images"],
            tiny_data["labels"],
            3,
            TrainRecipe(epochs=1, batch_size=8, patience=1, weight_decay=0.0),
            seed=0,
            generator=seed_everything(0),
            features={"train": bad, "val": bad[:12]},
            label="linear_probe",
        )


def test_lora_adapter_is_small_and_holds_the_head(tiny_source, tiny_data, tmp_path):
    strategy, _, result = _train("lora", tiny_source, tiny_data, rank=2)
    strategy.save(result.model, tmp_path, {"num_classes": 3, "arch": tiny_source.arch})
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and "classifier" in config["modules_to_save"]


_SAVE_LORA = """
import sys, torch
from transferlab.models.sources import load_source
from transferlab.params import SourceSpec
from transferlab.strategies import get_strategy, strategy_config
torch.manual_seed(0)
source = load_source("tiny", SourceSpec(kind="random_init", arch="test_efficientnet"), seed=0)
strategy = get_strategy("lora")
model = strategy.build(source, 3, strategy_config("lora", {"rank": 2}), 0)
strategy.save(model, __import__("pathlib").Path(sys.argv[1]), {"num_classes": 3})
"""


def test_a_saved_lora_adapter_is_the_same_file_in_every_interpreter(tmp_path):
    """peft writes target_modules (a set) in string-hash order, which PYTHONHASHSEED changes from one Python to
    the next: an identical rerun then wrote another adapter_config.json, and DVC reran evaluate@lora."""
    import subprocess
    import sys

    texts = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", _SAVE_LORA, str(out)], env=env, check=True, capture_output=True)
        texts.append((out / "adapter" / "adapter_config.json").read_text())
    assert len(json.loads(texts[0])["target_modules"]) > 2  # an order to get wrong
    assert texts[1] == texts[0] and texts[2] == texts[0]

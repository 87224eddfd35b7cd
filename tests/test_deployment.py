"""The deployment study (issue 19): deployment data, shift graded against a control, label-free accuracy, AdaBN on
deployment statistics, and `dvc repro deploy/dvc.yaml` end to end with poisoned deployment labels."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from transferlab.data.deployment import CORRUPTIONS, corrupt, folder_deployment, load_deployment, save_deployment
from transferlab.data.loaders import DatasetError
from transferlab.evaluation.label_free import atc_threshold, negative_entropy, predict_accuracy, predictor_errors
from transferlab.params import DataParams, DeployDataParams

# --- corruptions ---------------------------------------------------------------------------------------------


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(120, 255)
    img[..., 0] += (np.add.outer(np.arange(size), np.arange(size)) * 2).astype(np.uint8)  # detail to blur
    return img


@pytest.mark.parametrize("family", sorted(CORRUPTIONS))
def test_every_corruption_changes_the_image_more_at_higher_severity(family):
    img = _image()
    dist = []
    for s in (1, 3, 5):
        out = corrupt(img, family, s, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == img.shape
        dist.append(float(np.abs(out.astype(float) - img).mean()))
    assert 0 < dist[0] < dist[2], dist


def test_contrast_shrinks_the_spread_by_its_factor():
    img = _image()
    out = corrupt(img, "contrast", 5, np.random.default_rng(0))  # factor 0.05
    assert out.astype(float).std() == pytest.approx(0.05 * img.astype(float).std(), abs=0.6)


def test_unknown_corruption_in_params_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid"):
        DeployDataParams(corruptions=["fog"])
    with pytest.raises(ValueError, match="path"):
        DeployDataParams(kind="folder")


# --- a user's folder -----------------------------------------------------------------------------------------


def _folder(root: Path, labelled: bool, bad: int = 0) -> Path:
    for c, name in enumerate(["a", "b"]):
        d = root / name if labelled else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            Image.fromarray(_image(10 * c + i, 20)).save(d / f"{name}{i}.png")
    for i in range(bad):
        (root / f"broken{i}.png").write_bytes(b"not a png")
    return root


def test_a_flat_folder_is_unlabelled_and_class_folders_are_labelled(tmp_path):
    data = DataParams(image_size=16, max_corrupt_fraction=0.0)
    flat = folder_deployment(
        _folder(tmp_path / "flat", False), ["a", "b"], data, DeployDataParams(kind="folder", path="x"), 0
    )
    assert flat.labels is None and flat.images.shape == (10, 16, 16, 3)
    lab = folder_deployment(
        _folder(tmp_path / "lab", True), ["a", "b"], data, DeployDataParams(kind="folder", path="x"), 0
    )
    assert lab.labels.tolist() == [0] * 5 + [1] * 5
    none = folder_deployment(
        tmp_path / "lab", ["a", "b"], data, DeployDataParams(kind="folder", path="x", labels="none"), 0
    )
    assert none.labels is None
    save_deployment(tmp_path / "img", tmp_path / "lab_out", lab, ["a", "b"])
    assert load_deployment(tmp_path / "img").labels is None  # the images folder holds no label
    assert load_deployment(tmp_path / "img", tmp_path / "lab_out").labels.tolist() == lab.labels.tolist()


def test_folder_errors_name_the_problem_and_the_fix(tmp_path):
    data = DataParams(image_size=16, max_corrupt_fraction=0.0)
    spec = DeployDataParams(kind="folder", path="x")
    with pytest.raises(DatasetError, match="not training classes"):
        folder_deployment(_folder(tmp_path / "lab", True), ["a", "zzz"], data, spec, 0)
    with pytest.raises(DatasetError, match="cannot be decoded"):
        folder_deployment(_folder(tmp_path / "bad", False, bad=2), ["a", "b"], data, spec, 0)
    ok = folder_deployment(tmp_path / "bad", ["a", "b"], DataParams(image_size=16, max_corrupt_fraction=0.2), spec, 0)
    assert len(ok.images) == 10 and ok.meta["undecodable"] == 2
    with pytest.raises(DatasetError, match="not a folder"):
        folder_deployment(tmp_path / "missing", ["a"], data, spec, 0)


# --- label-free accuracy -------------------------------------------------------------------------------------


def test_atc_on_its_own_validation_set_returns_validation_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 4)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 300)
    y[:150] = p[:150].argmax(1)  # about 60% right
    t = atc_threshold(p, y)
    acc = (p.argmax(1) == y).mean()
    assert (negative_entropy(p) > t).mean() == pytest.approx(acc, abs=1 / 300)
    assert predict_accuracy(p, y, p)["atc"] == pytest.approx(acc, abs=1 / 300)


def _separable(n: int, rng: np.random.Generator, right_share: float) -> tuple[np.ndarray, np.ndarray]:
    """2 classes; right predictions have top probability in [0.8, 1], wrong ones in [0.5, 0.7]: the confidence
    separates right from wrong (the case where ATC is exact, Garg et al. 2022), and the model is over-confident."""
    right = rng.random(n) < right_share
    c = np.where(right, rng.uniform(0.8, 1.0, n), rng.uniform(0.5, 0.7, n))
    proba = np.stack([c, 1 - c], 1)
    return proba, np.where(right, 0, 1)


def test_atc_predicts_a_known_shifted_accuracy_where_average_confidence_does_not():
    """A known answer: validation 80% right, deployment 40% right; the threshold set on validation falls in the gap
    between right and wrong confidences, so ATC recovers 40%; average confidence says about 72%."""
    rng = np.random.default_rng(1)
    p_val, y_val = _separable(2000, rng, 0.8)
    p_dep, y_dep = _separable(2000, rng, 0.4)
    true = float((p_dep.argmax(1) == y_dep).mean())
    est = predict_accuracy(p_val, y_val, p_dep)
    assert abs(est["atc"] - true) < 0.01, (est, true)
    assert abs(est["average_confidence"] - true) > 0.25, (est, true)
    errs = predictor_errors([est], [true])
    assert errs["atc_useful"] is True and errs["best"] == "atc"
    # and when confidence carries no information, ATC is no better than average confidence: not "useful" for free
    flat = np.full((2000, 2), 0.5)
    est_flat = predict_accuracy(flat, y_val, flat)
    assert predictor_errors([est_flat], [0.8])["atc_useful"] is False


# --- shift measured against a control ------------------------------------------------------------------------


def _domain(n: int, seed: int, family: str | None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.full((16, 16, 3), 30, np.uint8)
        c = i % 2
        img[4:12, 2 + 6 * c : 8 + 6 * c] = rng.integers(150, 255)
        out.append(corrupt(img, family, 5, rng) if family else img)
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_model():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=2, pretrained=False).eval()


def _measure(model, deploy, seed=0):
    from transferlab.diagnosis import deployment as D

    test = _domain(240, 1, None)
    val = _domain(60, 2, None)
    m = D.measure_model(
        model,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        seed=seed,
        val_images=val,
        val_labels=np.arange(60) % 2,
        test_images=test,
        deploy_images=deploy,
        halves=D.reference_halves(len(test), 0),
        max_samples=120,
        n_permutations=50,
        n_bootstrap=200,
        adabn=True,
    )
    return D.summarize_strategy(
        "tiny",
        [m],
        test_labels=np.arange(240) % 2,
        deploy_labels=np.arange(len(deploy)) % 2,
        groups=np.full(len(deploy), "g"),
        pad_threshold=0.2,
        alpha=0.05,
        n_bootstrap=200,
        seed=0,
    )


def test_a_built_in_shift_is_flagged_and_the_same_data_without_shift_is_not(tiny_model):
    shifted = _measure(tiny_model, _domain(160, 3, "gaussian_noise"))
    assert shifted["shift"]["deploy"]["status"] == "flagged", shifted["shift"]
    assert shifted["shift"]["control"]["status"] != "flagged", shifted["shift"]
    clean = _measure(tiny_model, _domain(160, 3, None))
    assert clean["shift"]["deploy"]["status"] != "flagged", clean["shift"]
    assert clean["shift"]["control"]["status"] != "flagged"
    # AdaBN on deployment statistics: measured before/after with a paired interval and a verdict in words
    assert shifted["measured"]["adabn"]["verdict"] in ("helps", "hurts", "no clear effect")
    assert "adabn_change" in shifted["label_free"]


def test_adabn_on_deployment_leaves_the_model_itself_untouched(tiny_model):
    import torch

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    _measure(tiny_model, _domain(80, 4, "contrast"))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_deployment_study_through_dvc_repro_never_reads_labels_to_choose(tmp_path):
    from tiny_repo import build, sh

    repo = build(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # A user's folder: the tiny project's classes, darker and noisier (labelled by sub-folder, for checking).
    rng = np.random.default_rng(5)
    for c, name in enumerate(["circle", "square", "stripe"]):
        (repo / "deploy_images" / name).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 50, (24, 24, 3)).astype(float)
            img[c * 8 : c * 8 + 8] = 150
            img = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(repo / "deploy_images" / name / f"{i}.png")
    params["strategies"] = {"scratch": {"lr": 0.003}, "linear_probe": {"epochs": 3}, "finetune_full": {}}
    params["deploy"] = {
        "data": {"kind": "folder", "path": "deploy_images"},
        "dann": {"epochs": 2},
        "max_samples": 40,
        "mmd_permutations": 20,
        "n_bootstrap": 100,
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(repo / "deploy" / "pipeline.yaml", repo / "deploy" / "dvc.yaml")  # what `make repro-deploy` does
    sh(sys.executable, "-m", "dvc", "repro", "deploy/dvc.yaml", cwd=repo)
    out = json.loads((repo / "metrics/deployment.json").read_text())
    assert out["labelled"] is True
    assert set(out["strategies"]) == {"scratch", "linear_probe", "finetune_full", "dann"}
    for s in out["strategies"].values():
        assert s["shift"]["deploy"]["status"] in ("ok", "flagged", "undetermined")
        assert 0 <= s["label_free"]["plain"]["atc"]["value"] <= 1
        assert "deploy_accuracy" in s["measured"]
    assert "dann_vs_finetune_full" in out
    rec = out["recommendation"]  # the tiny runs may all be under-trained: then no choice, and the reason
    assert rec["strategy"] or rec["why"] == "no converged model to deploy"
    report = (repo / "reports/deployment.md").read_text()
    assert "# Deployment study" in report and "DANN" in report
    dann_model = (repo / "deploy/models/dann/seed_0/model.pt").read_bytes()

    # DANN cannot read a label: deploy-prepare writes them to a folder deploy-train does not depend on.
    stages = yaml.safe_load((repo / "deploy/pipeline.yaml").read_text())["stages"]
    assert "data/deployment/labels" not in stages["deploy-train"]["deps"]
    assert "data/deployment/labels" not in stages["deploy-train"]["cmd"]
    # Poison the deployment labels and rerun the study: nothing label-free may move, nor the choice.
    labels = repo / "data/deployment/labels/labels.npy"
    poisoned = (np.load(labels) + 1) % 3
    labels.unlink()  # a DVC cache link: replace the file, not its cached target
    np.save(labels, poisoned)
    log = sh(sys.executable, "-m", "dvc", "repro", "--single-item", "deploy/dvc.yaml:deploy", cwd=repo)
    assert "Running stage 'deploy/dvc.yaml:deploy'" in log, log
    poisoned_out = json.loads((repo / "metrics/deployment.json").read_text())
    assert (repo / "deploy/models/dann/seed_0/model.pt").read_bytes() == dann_model
    for name, s in out["strategies"].items():
        p = poisoned_out["strategies"][name]
        assert p["label_free"] == s["label_free"] and p["shift"] == s["shift"], name
        assert p["measured"] != s["measured"], name  # the labels are read: to check, after the fact
    assert {k: out["recommendation"][k] for k in ("strategy", "adaptation", "predicted")} == {
        k: poisoned_out["recommendation"][k] for k in ("strategy", "adaptation", "predicted")
    }

"""The deployment study: how far the deployment images sit from the training distribution, the accuracy each
model will have there predicted without labels, and whether adapting to them (AdaBN, DANN) wins it back.

Per model and seed (`measure_model`):

* **Shift**, on the model's own penultimate features. The reference is a seeded half of the held-out test split
  (in-distribution images the model never trained on: the training images themselves are fitted, so their
  features differ from any new image's and would make every set look shifted); the other half is the
  **control**, measured the same way, which a shift measurement must not flag. MMD with a permutation test and
  the proxy A-distance with a bootstrap interval (`measures.proxy_a_distance_replicates`); the BatchNorm
  statistics gap (the model's running statistics against the deployment activations, and against the control's).
* **Label-free accuracy**: ATC (threshold on validation), average confidence and DoC (`evaluation.label_free`).
* **AdaBN on deployment statistics**: the same model with every BatchNorm layer's statistics re-estimated on the
  deployment images (`strategies.adabn.reestimate_bn_stats`); the in-distribution images keep the training
  statistics (one normalisation per domain, as AdaBN prescribes), so ATC's threshold stays the model's own.
* **Measured** accuracy on deployment (and on the test split) when deployment labels exist: they are read here
  only, after every prediction is made, and choose nothing.

`summarize_strategy` pools the seeds with the project's one bootstrap (test or deployment samples and training
seeds: `findings.level`, `findings.accuracy_change`); `recommend` picks the deployed model and adaptation by the
label-free estimate only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferlab.core.resampling import percentile_interval
from transferlab.diagnosis.findings import accuracy_change, difference, grade, level
from transferlab.diagnosis.measures import bn_gap_interval, mmd_permutation_test, proxy_a_distance_replicates
from transferlab.evaluation.comparison import verdict
from transferlab.evaluation.label_free import negative_entropy, predict_accuracy, predictor_errors

# The rule a shift is graded by, quoted in the report.
SHIFT_RULE = (
    "shift flagged when the proxy A-distance's whole interval lies above deploy.pad_threshold and the MMD "
    "permutation test rejects at deploy.alpha on every seed; ok when the interval lies wholly below the threshold "
    "or MMD does not reject on any seed; otherwise undetermined. The control (two halves of the test split) is "
    "graded by the same rule."
)
RECOMMEND_RULE = (
    "the deployed model and adaptation with the highest label-free (ATC) estimate of deployment accuracy, among "
    "models that converged; deployment labels, when present, only check the choice."
)


@dataclass
class SeedMeasure:
    """One model (one seed) measured on the deployment images."""

    seed: int
    pad: dict[str, tuple[float, np.ndarray]]  # "deploy" / "control" / "adabn" -> (PAD, replicates)
    mmd: dict[str, dict]  # same keys -> mmd_permutation_test result
    bn: dict[str, dict | None]  # "deploy" / "control" -> bn_gap_interval
    label_free: dict[str, dict]  # "plain" / "adabn" -> predict_accuracy result
    atc_indicators: dict[str, np.ndarray]  # "plain" / "adabn" -> (n_deploy,) score > threshold
    deploy_pred: dict[str, np.ndarray]  # "plain" / "adabn" -> predicted classes on deployment
    test_pred: np.ndarray  # predicted classes on the test split
    extra: dict[str, Any] = field(default_factory=dict)


def reference_halves(n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded halves of the test split: the in-distribution reference and the control."""
    order = np.random.default_rng([seed, 5]).permutation(n_test)
    half = n_test // 2
    return np.sort(order[:half]), np.sort(order[half : 2 * half])


def _has_bn(model: Any) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def measure_model(
    model: Any,
    mean: tuple,
    std: tuple,
    *,
    seed: int,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    test_images: np.ndarray,
    deploy_images: np.ndarray,
    halves: tuple[np.ndarray, np.ndarray],
    max_samples: int,
    n_permutations: int,
    n_bootstrap: int,
    adabn: bool,
    device: Any = None,
) -> SeedMeasure:
    """Measure one trained model (see the module docstring). No label of the deployment images is read.

    Args:
        model: the trained network (eval mode; copied before AdaBN changes statistics).
        mean, std: its input normalisation.
        seed: the pipeline's seed (subsampling, permutations, bootstrap draws: the same for every model, so
            replicates of several models can be averaged).
        val_images, val_labels: the labelled validation split (ATC's threshold).
        test_images: the test split (reference and control halves; its predictions are returned for reporting).
        deploy_images: the unlabelled deployment images.
        halves: `reference_halves` of the test split.
        max_samples, n_permutations, n_bootstrap: as `deploy.*`.
        adabn: also measure the model with deployment BatchNorm statistics (when it has BatchNorm layers).
    """
    import torch

    from transferlab.models.inference import extract, to_input
    from transferlab.strategies.adabn import reestimate_bn_stats

    rng = np.random.default_rng([seed, 6])

    def sub(n: int) -> np.ndarray:
        return np.sort(rng.choice(n, size=min(n, max_samples), replace=False))

    f_val, l_val = extract(model, val_images, mean, std, device=device)
    f_test, l_test = extract(model, test_images, mean, std, device=device)
    f_dep, l_dep = extract(model, deploy_images, mean, std, device=device)
    ref, ctl = halves
    ref_s, ctl_s, dep_s = ref[sub(len(ref))], ctl[sub(len(ctl))], sub(len(deploy_images))

    def both(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, np.ndarray], dict]:
        pad = proxy_a_distance_replicates(x, y, seed=seed, n_bootstrap=n_bootstrap, bootstrap_seed=seed)
        return pad, mmd_permutation_test(x, y, n_permutations=n_permutations, seed=seed)

    pad, mmd = {}, {}
    pad["deploy"], mmd["deploy"] = both(f_test[ref_s], f_dep[dep_s])
    pad["control"], mmd["control"] = both(f_test[ref_s], f_test[ctl_s])
    p_val = torch.softmax(torch.from_numpy(l_val).double(), 1).numpy()
    p_dep = torch.softmax(torch.from_numpy(l_dep).double(), 1).numpy()
    lf = {"plain": predict_accuracy(p_val, val_labels, p_dep)}
    ind = {"plain": negative_entropy(p_dep) > lf["plain"]["atc_threshold"]}
    pred = {"plain": p_dep.argmax(1)}
    bn: dict[str, dict | None] = {"deploy": None, "control": None}
    extra: dict[str, Any] = {}
    if _has_bn(model):
        for key, imgs in (("deploy", deploy_images[dep_s]), ("control", test_images[ctl_s])):
            bn[key] = bn_gap_interval([model], to_input(imgs, mean, std), n_bootstrap=n_bootstrap, seed=seed)
        if adabn:
            adapted = copy.deepcopy(model)
            reestimate_bn_stats(adapted, lambda idx, _aug: to_input(deploy_images[idx], mean, std), len(deploy_images))
            f_ada, l_ada = extract(adapted, deploy_images, mean, std, device=device)
            p_ada = torch.softmax(torch.from_numpy(l_ada).double(), 1).numpy()
            # ATC's threshold is the model's own on validation: in-distribution images keep the training statistics.
            lf["adabn"] = predict_accuracy(p_val, val_labels, p_ada)
            ind["adabn"] = negative_entropy(p_ada) > lf["plain"]["atc_threshold"]
            lf["adabn"]["atc"] = float(ind["adabn"].mean())
            lf["adabn"]["atc_threshold"] = lf["plain"]["atc_threshold"]
            pred["adabn"] = p_ada.argmax(1)
            pad["adabn"], mmd["adabn"] = both(f_test[ref_s], f_ada[dep_s])
    return SeedMeasure(
        seed=seed,
        pad=pad,
        mmd=mmd,
        bn=bn,
        label_free=lf,
        atc_indicators=ind,
        deploy_pred=pred,
        test_pred=l_test.argmax(1),
        extra=extra,
    )


def grade_shift(
    pads: list[tuple[float, np.ndarray]], mmds: list[dict], *, threshold: float, alpha: float, confidence: float
) -> dict:
    """One comparison (deploy, control or adapted) over a model's seeds, graded by SHIFT_RULE.

    PAD: the mean over seeds, its interval from the mean of the seeds' replicates (shared draws). MMD: every
    seed's p-value."""
    value = float(np.mean([p for p, _ in pads]))
    lo, hi = percentile_interval(np.mean([r for _, r in pads], axis=0), confidence)
    ps = [float(m["p_value"]) for m in mmds]
    pad_grade = grade(value, float(lo), float(hi), threshold, "above")
    rejects = [p < alpha for p in ps]
    if pad_grade == "ok" or not any(rejects):
        status = "ok"
    elif pad_grade == "flagged" and all(rejects):
        status = "flagged"
    else:
        status = "undetermined"
    return {
        "status": status,
        "proxy_a_distance": {"value": round(value, 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)},
        "mmd2": round(float(np.mean([m["mmd2"] for m in mmds])), 6),
        "mmd_p_values": [round(p, 4) for p in ps],
        "threshold": threshold,
        "alpha": alpha,
    }


def _bn_summary(measures: list[SeedMeasure]) -> dict | None:
    dep = [m.bn["deploy"] for m in measures if m.bn["deploy"]]
    ctl = [m.bn["control"] for m in measures if m.bn["control"]]
    if not dep or not ctl:
        return None

    def avg(rows: list[dict]) -> dict:
        return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("value", "ci_low", "ci_high")}

    d, c = avg(dep), avg(ctl)
    excess = difference(c, d)
    return {
        "deploy": d,
        "control": c,
        "excess": excess,
        "status": grade(excess["gain"], excess["ci_low"], excess["ci_high"], 0.0, "above"),
        "meaning": "mean standardised gap between BatchNorm running statistics and activations, deployment minus "
        "control (in-distribution) images",
    }


def summarize_strategy(
    name: str,
    measures: list[SeedMeasure],
    *,
    test_labels: np.ndarray,
    deploy_labels: np.ndarray | None,
    groups: np.ndarray,
    pad_threshold: float,
    alpha: float,
    n_bootstrap: int,
    seed: int,
    confidence: float = 0.95,
    converged: bool | None = None,
) -> dict:
    """Everything the report says about one model (all its seeds). `deploy_labels` is read here only."""
    out: dict[str, Any] = {
        "seeds": [m.seed for m in measures],
        "converged": converged,
        "shift": {},
        "label_free": {},
    }
    for key in ("deploy", "control", "adabn"):
        have = [m for m in measures if key in m.pad]
        if len(have) == len(measures):
            out["shift"][key] = grade_shift(
                [m.pad[key] for m in have],
                [m.mmd[key] for m in have],
                threshold=pad_threshold,
                alpha=alpha,
                confidence=confidence,
            )
    out["shift"]["bn_gap"] = _bn_summary(measures)
    ones = np.ones(len(groups), dtype=np.int64)
    for variant in ("plain", "adabn"):
        if not all(variant in m.label_free for m in measures):
            continue
        rows = np.stack([m.atc_indicators[variant].astype(np.int64) for m in measures])
        atc = level(ones, rows, n_bootstrap, seed, confidence)  # ATC's fraction, over deployment images and seeds
        est = {
            k: round(float(np.mean([m.label_free[variant][k] for m in measures])), 4)
            for k in ("average_confidence", "doc")
        }
        out["label_free"][variant] = {"atc": {k: round(v, 4) for k, v in atc.items()}, **est}
    if "adabn" in out["label_free"]:
        b = np.stack([m.atc_indicators["plain"].astype(np.int64) for m in measures])
        a = np.stack([m.atc_indicators["adabn"].astype(np.int64) for m in measures])
        out["label_free"]["adabn_change"] = accuracy_change(
            ones, b, a, n_bootstrap, seed, confidence, what="ATC estimate"
        )["change"]
    test_rows = np.stack([m.test_pred for m in measures])
    out["test_accuracy"] = level(test_labels, test_rows, n_bootstrap, seed, confidence)
    out["predicted_drop"] = round(out["test_accuracy"]["value"] - out["label_free"]["plain"]["atc"]["value"], 4)
    if deploy_labels is not None:
        out["measured"] = _measured(
            measures, deploy_labels, groups, n_bootstrap, seed, confidence, out["test_accuracy"]
        )
    return out


def _measured(
    measures: list[SeedMeasure],
    y: np.ndarray,
    groups: np.ndarray,
    n_bootstrap: int,
    seed: int,
    confidence: float,
    test_accuracy: dict,
) -> dict:
    plain = np.stack([m.deploy_pred["plain"] for m in measures])
    acc = level(y, plain, n_bootstrap, seed, confidence)
    out: dict[str, Any] = {
        "deploy_accuracy": acc,
        "drop": difference(acc, test_accuracy),  # test - deployment, intervals in quadrature
        "per_group": {},
        "predictor_errors": {},
    }
    for g in np.unique(groups):
        rows = groups == g
        out["per_group"][str(g)] = {
            "images": int(rows.sum()),
            "accuracy": round(float((plain[:, rows] == y[rows]).mean()), 4),
            "atc": round(float(np.mean([m.atc_indicators["plain"][rows].mean() for m in measures])), 4),
        }
    for variant in ("plain", "adabn"):
        if all(variant in m.label_free for m in measures):
            pred = [m.label_free[variant] for m in measures]
            meas = [float((m.deploy_pred[variant] == y).mean()) for m in measures]
            out["predictor_errors"][variant] = predictor_errors(pred, meas)
    if all("adabn" in m.deploy_pred for m in measures):
        after = np.stack([m.deploy_pred["adabn"] for m in measures])
        ch = accuracy_change(y, plain, after, n_bootstrap, seed, confidence, what="deployment accuracy")
        ch["verdict"] = {"better": "helps", "worse": "hurts", "inconclusive": "no clear effect"}[
            verdict(ch["change"]["ci_low"], ch["change"]["ci_high"])
        ]
        out["adabn"] = ch
    return out


def dann_versus(
    dann: list[SeedMeasure],
    base: list[SeedMeasure],
    deploy_labels: np.ndarray | None,
    test_labels: np.ndarray,
    n_bootstrap: int,
    seed: int,
    confidence: float = 0.95,
) -> dict:
    """DANN against the same recipe without the domain loss (finetune_full): the label-free estimate's change,
    and, with labels, the deployment accuracy's and the test accuracy's (a trade-off shows there)."""
    ones = np.ones(len(dann[0].atc_indicators["plain"]), dtype=np.int64)
    b = np.stack([m.atc_indicators["plain"].astype(np.int64) for m in base])
    a = np.stack([m.atc_indicators["plain"].astype(np.int64) for m in dann])
    out: dict[str, Any] = {
        "atc_change": accuracy_change(ones, b, a, n_bootstrap, seed, confidence, what="ATC estimate")["change"]
    }
    out["test"] = accuracy_change(
        test_labels,
        np.stack([m.test_pred for m in base]),
        np.stack([m.test_pred for m in dann]),
        n_bootstrap,
        seed,
        confidence,
        what="test accuracy",
    )
    if deploy_labels is not None:
        ch = accuracy_change(
            deploy_labels,
            np.stack([m.deploy_pred["plain"] for m in base]),
            np.stack([m.deploy_pred["plain"] for m in dann]),
            n_bootstrap,
            seed,
            confidence,
            what="deployment accuracy",
        )
        ch["verdict"] = {"better": "helps", "worse": "hurts", "inconclusive": "no clear effect"}[
            verdict(ch["change"]["ci_low"], ch["change"]["ci_high"])
        ]
        out["deploy"] = ch
    return out


def recommend(strategies: dict[str, dict]) -> dict:
    """The deployed model and adaptation chosen by RECOMMEND_RULE, and, with labels, how the choice fared."""
    options = []
    for name, s in strategies.items():
        if s.get("converged") is False:
            continue
        for variant, lf in s["label_free"].items():
            if variant in ("plain", "adabn"):
                options.append((lf["atc"]["value"], name, variant))
    if not options:
        return {"strategy": None, "adaptation": None, "predicted": None, "why": "no converged model to deploy"}
    options.sort(key=lambda o: (-o[0], o[1], o[2]))
    est, name, variant = options[0]
    out: dict[str, Any] = {"strategy": name, "adaptation": "adabn" if variant == "adabn" else "none", "predicted": est}
    measured = strategies[name].get("measured")
    if measured is not None:
        m = measured["adabn"]["after"] if variant == "adabn" else measured["deploy_accuracy"]["value"]
        out["measured"] = m
        if variant == "plain":
            out["measured_interval"] = [measured["deploy_accuracy"]["ci_low"], measured["deploy_accuracy"]["ci_high"]]
        best = max(
            (
                (s["measured"]["adabn"]["after"] if v == "adabn" else s["measured"]["deploy_accuracy"]["value"], n, v)
                for n, s in strategies.items()
                if s.get("measured") and s.get("converged") is not False
                for v in s["label_free"]
                if v in ("plain", "adabn")
            ),
            key=lambda o: o[0],
        )
        out["best_measured"] = {
            "strategy": best[1],
            "adaptation": "adabn" if best[2] == "adabn" else "none",
            "accuracy": best[0],
        }
        out["regret"] = round(best[0] - m, 4)
    return out

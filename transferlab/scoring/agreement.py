"""Closing the loop: did the transferability ranking predict what training achieved, on this data?

Every candidate is trained to convergence with the project's own recipes (the `linear_probe` strategy on its
cached features, the same code path as `train@linear_probe`, once per seed; optionally a fine-tune); each
estimate is then correlated with the achieved test accuracies (weighted Kendall tau, which weighs the top of
the ranking most, and Spearman). With a handful of candidates, a finite test set and seed-to-seed variation,
part of any ranking is noise: a bootstrap that resamples both the seeds and the test samples gives each
correlation an interval and counts how many candidate pairs the accuracies actually tell apart.

Two guards keep the verdicts honest:

- below `min_candidates` candidates with an estimate (5 by default), a rank correlation is reported but not
  graded: the verdict is "too few candidates to judge";
- every estimator is set against data-free rankings (the source's published ImageNet top-1 where known, its
  parameter count). An estimator is "useful here" only when its weighted tau beats each data-free ranking's
  tau beyond the interval of the paired difference (same bootstrap draws, same candidates).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import spearmanr, weightedtau

from transferlab.core.resampling import bootstrap_draws, percentile_interval

if TYPE_CHECKING:
    import pandas as pd

    from transferlab.data.splits import Prepared
    from transferlab.params import Params
    from transferlab.strategies import StrategyConfig
    from transferlab.training.recipe import TrainRecipe

TOO_FEW = "too few candidates to judge"

# Published ImageNet top-1 (%) of the packaged sources: the TF EfficientNet-Lite release
# (tensorflow/tpu, models/official/efficientnet/lite/README.md). Used as a data-free ranking only.
PUBLISHED_IMAGENET_TOP1 = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(weighted tau, spearman); NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(weightedtau(x, y).statistic), float(spearmanr(x, y).statistic)


def _as_runs(correct: np.ndarray) -> np.ndarray:
    """(seeds, test samples) boolean array from one candidate's correctness (1-D: a single seed)."""
    c = np.asarray(correct, bool)
    return c[None, :] if c.ndim == 1 else c


def bootstrap_accuracies(
    correct: dict[str, np.ndarray], *, n_bootstrap: int, seed: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Achieved accuracies and their bootstrap replicates, resampling seeds and test samples together.

    Each replicate draws the seeds with replacement and, independently, the test samples with replacement
    (`core.resampling.bootstrap_draws`, the project's one resampling); a candidate's accuracy is then the mean
    correctness over the drawn seeds and samples. The same draws are used for every candidate (the comparison
    is paired, seeds included: the candidates' seed s are paired as their test samples are).

    Args:
        correct: candidate -> boolean per test sample, ``(N,)`` or ``(S, N)`` for S seeds; the same test
            samples and the same number of seeds for every candidate.
        n_bootstrap: replicates.
        seed: of the resampling.

    Returns:
        (sorted candidate names, accuracies ``(K,)``, replicates ``(n_bootstrap, K)``).

    Raises:
        ValueError: candidates with different numbers of seeds or test samples.
    """
    names = sorted(correct)
    runs = [_as_runs(correct[n]) for n in names]
    shapes = {r.shape for r in runs}
    if len(shapes) != 1:
        got = {n: r.shape for n, r in zip(names, runs, strict=True)}
        raise ValueError(f"every candidate needs the same (seeds, test samples); got {got}")
    c = np.stack(runs, axis=1).astype(np.float64)  # (S, K, N)
    n_seeds, _, n = c.shape
    boot = np.empty((n_bootstrap, len(names)))
    b = 0
    # Seeds first, then samples, in every replicate: the draw order is part of the stream.
    for seed_draws, sample_draws in bootstrap_draws(n_bootstrap, (n_seeds, n), seed=seed):
        for seeds, idx in zip(seed_draws, sample_draws, strict=True):
            boot[b] = c[seeds][:, :, idx].mean(axis=(0, 2))
            b += 1
    return names, c.mean(axis=(0, 2)), boot


def _ci(values: np.ndarray, confidence: float) -> list[float]:
    """The percentile interval of the finite replicates, rounded; NaN when none is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return [float("nan"), float("nan")]
    return [round(float(q), 6) for q in percentile_interval(v, confidence)]


def _finite(values: dict[str, float | None], among: list[str]) -> list[str]:
    return [n for n in among if values.get(n) is not None and np.isfinite(values[n])]


def rank_agreement(
    estimates: dict[str, float | None],
    correct: dict[str, np.ndarray],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_candidates: int = 5,
    data_free: dict[str, dict[str, float | None]] | None = None,
) -> dict:
    """Agreement between one estimator's scores and the achieved accuracies of the same candidates.

    Candidates whose estimate is None or not finite are left out. The bootstrap resamples seeds and test
    samples (`bootstrap_accuracies`).

    Args:
        estimates: candidate -> estimator value (higher = predicted better), None when undefined.
        correct: candidate -> boolean per test sample, ``(N,)`` or ``(S, N)`` over S seeds.
        n_bootstrap, confidence, seed: the bootstrap.
        min_candidates: below this many candidates with an estimate, the verdict is "too few candidates to
            judge" (the numbers are still reported).
        data_free: name -> {candidate: value or None}: data-free rankings the estimator must beat to be
            called useful here; compared on the candidates both rank, with the same bootstrap draws.

    Returns:
        {n_candidates, n_seeds, weighted_tau, spearman, weighted_tau_ci, spearman_ci, pairs_resolved,
         pairs_total, verdict, [vs_data_free, useful_here, useful_here_reason]}; verdict is 'strong',
         'moderate', 'weak', 'undetermined' or "too few candidates to judge" (read it together with
         pairs_resolved: when few pairs are resolved, the order is mostly noise).

    Raises:
        ValueError: fewer than 3 candidates with an estimate, or mismatched sample counts.
    """
    names = _finite(estimates, sorted(n for n in estimates if n in correct))
    if len(names) < 3:
        raise ValueError(f"rank agreement needs at least 3 candidates with an estimate (got {names})")
    all_names, acc_all, boot_all = bootstrap_accuracies(correct, n_bootstrap=n_bootstrap, seed=seed)
    col = {n: i for i, n in enumerate(all_names)}
    idx = [col[n] for n in names]
    est = np.array([estimates[n] for n in names], dtype=float)
    acc, boot = acc_all[idx], boot_all[:, idx]
    tau, rho = _corr(est, acc)
    pairs = np.array([_corr(est, a) for a in boot])  # (B, 2)
    diffs = boot[:, :, None] - boot[:, None, :]
    lo, hi = percentile_interval(diffs, confidence, axis=0)
    iu = np.triu_indices(len(names), 1)
    resolved = int(((lo[iu] > 0) | (hi[iu] < 0)).sum())
    tau_ci = _ci(pairs[:, 0], confidence)
    if len(names) < min_candidates:
        verdict = TOO_FEW
    elif not np.isfinite(tau):
        verdict = "undetermined"
    elif tau_ci[0] > 0.5:
        verdict = "strong"
    elif tau_ci[0] > 0:
        verdict = "moderate"
    else:
        verdict = "weak"
    out = {
        "n_candidates": len(names),
        "n_seeds": int(_as_runs(correct[names[0]]).shape[0]),
        "weighted_tau": round(tau, 6),
        "spearman": round(rho, 6),
        "weighted_tau_ci": tau_ci,
        "spearman_ci": _ci(pairs[:, 1], confidence),
        "pairs_resolved": resolved,
        "pairs_total": len(iu[0]),
        "verdict": verdict,
    }
    if data_free is None:
        return out
    versus: dict[str, dict] = {}
    for base_name, base in sorted(data_free.items()):
        common = _finite(base, names)
        if len(common) < max(min_candidates, 3):
            versus[base_name] = {"n_candidates": len(common), "verdict": TOO_FEW, "beats": None}
            continue
        ci_idx = [col[n] for n in common]
        e = np.array([estimates[n] for n in common], dtype=float)
        v = np.array([base[n] for n in common], dtype=float)
        diff = _corr(e, acc_all[ci_idx])[0] - _corr(v, acc_all[ci_idx])[0]
        boot_diff = np.array([_corr(e, a)[0] - _corr(v, a)[0] for a in boot_all[:, ci_idx]])
        ci = _ci(boot_diff, confidence)
        versus[base_name] = {
            "n_candidates": len(common),
            "weighted_tau_difference": round(float(diff), 6),
            "weighted_tau_difference_ci": ci,
            "beats": bool(np.isfinite(ci[0]) and ci[0] > 0),
        }
    judged = {k: v["beats"] for k, v in versus.items() if v["beats"] is not None}
    if verdict == TOO_FEW:
        useful, why = False, TOO_FEW
    elif not judged:
        useful, why = False, "no data-free ranking covers enough of the same candidates to compare against"
    elif all(judged.values()):
        useful, why = True, f"beats {', '.join(sorted(judged))} beyond the interval of the difference"
    else:
        lost = sorted(k for k, b in judged.items() if not b)
        useful, why = False, f"does not beat {', '.join(lost)} beyond the interval of the difference"
    out.update(vs_data_free=versus, useful_here=useful, useful_here_reason=why)
    return out


def data_free_rankings(
    candidates: list[str], score_rows: dict[str, dict], imagenet_top1: dict[str, float]
) -> dict[str, dict[str, float | None]]:
    """Rankings that need no target data: published ImageNet top-1 where known, and the parameter count.

    Args:
        candidates: candidate names.
        score_rows: `metrics/score.json`'s `candidates` (the parameter count is its `params`).
        imagenet_top1: source name -> published ImageNet top-1 (%); the others are unknown (None).

    Returns:
        {'imagenet_top1': {name: value or None}, 'params': {name: value or None}}.
    """
    return {
        "imagenet_top1": {n: imagenet_top1.get(n) for n in candidates},
        "params": {n: score_rows.get(n, {}).get("params") for n in candidates},
    }


def recipe_agreement(
    estimates: dict[str, dict[str, float | None]],
    correct: dict[str, np.ndarray],
    data_free: dict[str, dict[str, float | None]],
    *,
    recipe: str,
    not_converged: list[str] | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_candidates: int = 5,
) -> dict:
    """Every estimator and every data-free ranking against one recipe's achieved accuracies.

    Args:
        estimates: estimator -> {candidate: value or None}.
        correct: candidate -> correctness per test sample, ``(N,)`` or ``(S, N)`` over S seeds.
        data_free: see `data_free_rankings`.
        recipe: name used in the summary.
        not_converged: candidates whose ground-truth training hit its epoch cap (for any seed).
        n_bootstrap, confidence, seed, min_candidates: see `rank_agreement`.

    Returns:
        {'test_accuracy': {candidate: mean over seeds}, 'estimators': {name: rank_agreement or
         {'verdict', 'reason'}}, 'data_free': {name: ...}, 'not_converged': [...], 'summary': sentence}.
    """
    kw = {"n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed, "min_candidates": min_candidates}

    def agree(values: dict[str, float | None], against: dict | None) -> dict:
        try:
            return rank_agreement(values, correct, data_free=against, **kw)
        except ValueError as exc:
            return {"verdict": "undetermined", "reason": str(exc)}

    per_est = {name: agree(values, data_free) for name, values in estimates.items()}
    baselines = {name: agree(values, None) for name, values in sorted(data_free.items())}
    return {
        "test_accuracy": {n: round(float(_as_runs(c).mean()), 6) for n, c in sorted(correct.items())},
        "estimators": per_est,
        "data_free": baselines,
        "not_converged": sorted(not_converged or []),
        "summary": plain_summary(per_est, recipe, baselines, not_converged),
    }


def plain_summary(
    per_estimator: dict[str, dict],
    recipe: str,
    data_free: dict[str, dict] | None = None,
    not_converged: list[str] | None = None,
) -> str:
    """One paragraph a person reads: which estimates predicted the achieved order, how sure that is, and
    whether any did better than rankings that need no data at all."""
    usable = {k: v for k, v in per_estimator.items() if "weighted_tau" in v}
    tail = ""
    if not_converged:
        tail = f" Ground truth did not converge (hit the epoch cap) for: {', '.join(sorted(not_converged))}."
    if not usable:
        return f"{recipe}: no estimator could be compared.{tail}"
    best = max(usable, key=lambda k: (np.nan_to_num(usable[k]["weighted_tau"], nan=-9), k))
    r = usable[best]
    base_txt = ""
    for name, b in sorted((data_free or {}).items()):
        if "weighted_tau" in b:
            tau, k = b["weighted_tau"], b["n_candidates"]
            base_txt += f" Data-free ranking by {name}: weighted tau {tau:.2f} ({k} candidates)."
    if all(v["verdict"] == TOO_FEW for v in usable.values()):
        most = max(v["n_candidates"] for v in usable.values())
        return (
            f"{recipe}: {TOO_FEW} (at most {most} candidates with an estimate): the rank correlations are "
            f"reported but not graded; best weighted tau {r['weighted_tau']:.2f} from {best}.{base_txt}{tail}"
        )
    noise = ""
    if r["pairs_resolved"] < r["pairs_total"] / 2:
        noise = (
            f" Only {r['pairs_resolved']} of {r['pairs_total']} candidate pairs differ beyond their confidence "
            "intervals, so most of the achieved order is noise: do not read much into any rank correlation here."
        )
    weak = [k for k, v in per_estimator.items() if v["verdict"] in ("weak", "undetermined", TOO_FEW)]
    weak_txt = f" Weak, undetermined or not graded: {', '.join(sorted(weak))}." if weak else ""
    useful = sorted(k for k, v in usable.items() if v.get("useful_here"))
    if any("useful_here" in v for v in usable.values()):
        useful_txt = (
            f" Useful here (beat the data-free rankings beyond their interval): {', '.join(useful)}."
            if useful
            else " No estimator beats the data-free rankings (ImageNet top-1, parameter count) beyond the "
            "interval: none is shown useful here."
        )
    else:
        useful_txt = ""
    return (
        f"{recipe}: best agreement from {best} (weighted tau {r['weighted_tau']:.2f}, "
        f"95% CI {r['weighted_tau_ci'][0]:.2f} to {r['weighted_tau_ci'][1]:.2f}, verdict {r['verdict']})."
        f"{useful_txt}{base_txt}{weak_txt}{noise}{tail}"
    )


# --- the agreement stage: train every candidate, then correlate ----------------------------------------------


def agreement_recipes(params: Params, device: Any = None) -> dict[str, tuple[StrategyConfig, TrainRecipe]]:
    """recipe -> (strategy config, training recipe) of the ground truth, each from `build_recipe`.

    `linear_probe`: train@linear_probe's entry (`strategies.linear_probe`, its defaults when absent or of
    another kind) and recipe, so there is one linear-probe number per candidate and seed. `short_finetune`
    (only when `agreement.finetune_epochs` > 0): `agreement.finetune` at that epoch budget.
    """
    from transferlab.strategies import strategy_config
    from transferlab.training.recipe import build_recipe

    raw = params.strategies.get("linear_probe") or {}
    if raw.get("kind", "linear_probe") != "linear_probe":
        raw = {}
    probe = strategy_config("linear_probe", raw)
    recipes = {"linear_probe": (probe, build_recipe(params.train, probe, device=device))}
    ap = params.agreement
    if ap.finetune_epochs > 0:
        ft = strategy_config("agreement.finetune", ap.finetune)
        recipes["short_finetune"] = (ft, build_recipe(params.train, ft, device=device, epochs=ap.finetune_epochs))
    return recipes


def train_candidates(
    params: Params,
    data: Prepared,
    names: list[str],
    recipes: dict[str, tuple[StrategyConfig, TrainRecipe]],
    features_root: str | Path,
    pretrained_dir: str | Path,
) -> dict[str, dict[str, list[dict]]]:
    """Train every candidate source with every recipe under the shared protocol (`train_protocol`).

    Returns:
        recipe -> candidate -> [{'seed', 'pred' (test predictions), 'converged', 'epochs_run'}] per seed.
        Training and test predictions run on each recipe's device.
    """
    import torch

    from transferlab.models.features import load_cache
    from transferlab.models.inference import predict_images
    from transferlab.models.sources import load_source
    from transferlab.strategies import get_strategy
    from transferlab.training.protocol import train_protocol

    out: dict = {r: {} for r in recipes}
    for name in names:
        feats = {s: load_cache(Path(features_root) / name, s)[0] for s in ("train", "val", "test")}
        # The source's identity is fixed (features@ used params.seed); training seeds vary the runs only.
        source = load_source(name, params.sources[name], seed=params.seed, pipeline_dir=pretrained_dir)
        for recipe_name, (cfg, recipe) in recipes.items():
            strategy = get_strategy(cfg.kind)
            result = train_protocol(
                strategy,
                cfg,
                lambda source=source: copy.deepcopy(source),
                data.images,
                data.labels,
                data.num_classes,
                recipe,
                features=feats if strategy.uses_features else None,
                label=f"agreement:{recipe_name}:{name}",
            )
            runs = []
            for seed, res in sorted(result.runs.items()):
                if strategy.uses_features:  # the head on the cached test features of the same frozen backbone
                    with torch.no_grad():
                        logits = res.model.get_classifier()(
                            torch.from_numpy(np.ascontiguousarray(feats["test"], np.float32))
                        )
                else:
                    logits = predict_images(
                        res.model, data.images["test"], source.mean, source.std, device=recipe.device
                    )
                runs.append(
                    {
                        "seed": seed,
                        "pred": logits.argmax(1).numpy(),
                        "converged": bool(res.converged) and seed not in result.failures,
                        "epochs_run": len(res.history),
                    }
                )
            out[recipe_name][name] = runs
    return out


@dataclass
class AgreementResult:
    """What the agreement stage writes."""

    predictions: pd.DataFrame  # per-sample test predictions of every recipe x candidate (x seed)
    metrics: dict  # metrics/agreement.json
    plot: pd.DataFrame  # estimate against achieved test accuracy, per recipe, estimator and candidate


def closing_the_loop(
    params: Params,
    data: Prepared,
    score: dict,
    recipes: dict[str, tuple[StrategyConfig, TrainRecipe]],
    features_root: str | Path,
    pretrained_dir: str | Path,
) -> AgreementResult:
    """Train every candidate of `sources` with the ground-truth `recipes` (`agreement_recipes`) and check how
    well each transferability estimate of `score` (metrics/score.json) predicted the achieved test accuracy,
    beside the data-free rankings (`recipe_agreement` per recipe).

    Returns:
        AgreementResult: the predictions table, the metrics and the plot table.
    """
    import pandas as pd

    ap = params.agreement
    names = sorted(params.sources)
    runs = train_candidates(params, data, names, recipes, features_root, pretrained_dir)
    y_test = data.labels["test"]
    table = pd.DataFrame({"y_true": y_test})
    for recipe, by_name in runs.items():
        for n, seed_runs in by_name.items():
            for i, r in enumerate(seed_runs):  # the first seed keeps the plain column name (diagnose reads it)
                table[f"{recipe}:{n}" if i == 0 else f"{recipe}@seed{r['seed']}:{n}"] = r["pred"]
    data_free = data_free_rankings(names, score["candidates"], ap.imagenet_top1)
    estimates = {e: {n: score["candidates"][n].get(e) for n in names} for e in params.score.estimators}
    out: dict = {"candidates": names, "data_free_rankings": data_free, "recipes": {}}
    rows = []
    for recipe, by_name in runs.items():
        correct = {n: np.stack([r["pred"] == y_test for r in rs]) for n, rs in by_name.items()}
        not_converged = [n for n, rs in by_name.items() if not all(r["converged"] for r in rs)]
        result = recipe_agreement(
            estimates,
            correct,
            data_free,
            recipe=recipe,
            not_converged=not_converged,
            n_bootstrap=ap.n_bootstrap,
            seed=params.seed,
            min_candidates=ap.min_candidates,
        )
        result["epochs_run"] = {n: [r["epochs_run"] for r in rs] for n, rs in sorted(by_name.items())}
        out["recipes"][recipe] = result
        for est, values in [*estimates.items(), *((f"{k} (data-free)", v) for k, v in data_free.items())]:
            for n in names:
                rows.append(
                    {
                        "recipe": recipe,
                        "estimator": est,
                        "candidate": n,
                        "estimate": values[n],
                        "test_accuracy": result["test_accuracy"][n],
                    }
                )
    return AgreementResult(predictions=table, metrics=out, plot=pd.DataFrame(rows))

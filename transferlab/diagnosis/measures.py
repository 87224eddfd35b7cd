"""Diagnostics for what went wrong (or right) in a transfer run.

Pure functions over arrays, tensors and models; no file I/O and no global state. Each one answers one
question a transfer report needs:

* Whether the transferred model really beats scratch (or another technique) on the test set, or the gain
  is noise, is the project's one bootstrap: ``transferlab.evaluation.stats.paired_bootstrap_gain``.
* ``linear_cka``: how much did the representation change between two checkpoints (or two models)?
* ``mmd_permutation_test`` and ``proxy_a_distance``: how far apart are the source and target feature
  distributions (domain shift)?
* ``bn_statistics_gap``: how far do the target activations sit from the BatchNorm running statistics
  learnt on the source (the covariate shift a frozen BN layer cannot absorb)?
* ``weight_drift`` and ``prediction_agreement``: how far did fine-tuning move the weights and the source
  predictions (catastrophic forgetting proxies when the source data is not available)?
* ``train_val_gap``: over-fitting of the target task.

Inputs are validated: mismatched shapes or lengths, NaN values and empty inputs raise ``ValueError``
with a message naming the argument and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transferlab.evaluation.stats import labels_1d, to_numpy
from transferlab.models.batchnorm import ChannelMoments
from transferlab.models.inference import module_device
from transferlab.training.rules import best_row

__all__ = [
    "bn_statistics_gap",
    "stratified_indices",
    "linear_cka",
    "mmd_permutation_test",
    "prediction_agreement",
    "proxy_a_distance",
    "proxy_a_distance_replicates",
    "train_val_gap",
    "weight_drift",
]

# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _float_2d(value: Any, name: str, *, allow_1d: bool = True) -> np.ndarray:
    arr = to_numpy(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 1 and allow_1d:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN values")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains infinite values")
    return arr


# --------------------------------------------------------------------------------------------------
# 1. stratified subsets (probe images, reference samples)
# --------------------------------------------------------------------------------------------------


def stratified_indices(labels: Any, n: int, *, seed: int) -> np.ndarray:
    """A seeded subset of at most `n` row indices with the classes in proportion (never "the first n rows").

    Each class gets floor(n * share) rows, the leftover rows go to the classes with the largest remainders
    (ties: lower class first), every class with a row gets at least one while n allows; rows within a class
    are drawn without replacement by a numpy generator seeded with `seed`.

    Args:
        labels: 1-D class labels of the pool.
        n: subset size (>= 1); the whole pool when it has no more rows.
        seed: the generator's seed.

    Returns:
        Sorted int64 indices into `labels`.

    Raises:
        ValueError: labels not 1-D or empty, n < 1.
    """
    y = labels_1d(labels, "labels")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n >= len(y):
        return np.arange(len(y), dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    exact = n * counts / len(y)
    take = np.minimum(np.maximum(np.floor(exact).astype(int), 1 if n >= len(classes) else 0), counts)
    order = np.lexsort((np.arange(len(classes)), -(exact - np.floor(exact))))
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:  # the at-least-one floor overshot: trim the largest
        take[int(np.argmax(take))] -= 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(y == c), size=int(k), replace=False) for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# 2. linear CKA
# --------------------------------------------------------------------------------------------------


def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment between two representations of the same examples.

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with column-centred X_c, Y_c
    (Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019,
    eq. for linear HSIC). Invariant to orthogonal transforms and isotropic scaling, not to arbitrary
    invertible linear maps. The Gram (n x n) form is used when it is cheaper than the feature form.

    Args:
        x: (n, d1) features; a 1-D array is taken as one feature.
        y: (n, d2) features of the same n examples, in the same order.

    Returns:
        CKA in [0, 1]; 1 for identical representations.

    Raises:
        ValueError: not 2-D, empty, different numbers of rows, fewer than 2 rows, NaN/inf, or a
            representation that is constant across examples (zero variance after centring).
    """
    xa = _float_2d(x, "x")
    ya = _float_2d(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {xa.shape[0]} and {ya.shape[0]}")
    n, d1 = xa.shape
    d2 = ya.shape[1]
    if n < 2:
        raise ValueError(f"linear_cka needs at least 2 rows, got {n}")
    xc = xa - xa.mean(axis=0, keepdims=True)
    yc = ya - ya.mean(axis=0, keepdims=True)
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):
        kx = xc @ xc.T
        ky = yc @ yc.T
        hsic_xy = float(np.sum(kx * ky))
        norm_x = float(np.linalg.norm(kx))
        norm_y = float(np.linalg.norm(ky))
    else:
        hsic_xy = float(np.linalg.norm(yc.T @ xc) ** 2)
        norm_x = float(np.linalg.norm(xc.T @ xc))
        norm_y = float(np.linalg.norm(yc.T @ yc))
    if norm_x == 0.0:
        raise ValueError("x has zero variance after centring (all rows identical); CKA is undefined")
    if norm_y == 0.0:
        raise ValueError("y has zero variance after centring (all rows identical); CKA is undefined")
    return float(np.clip(hsic_xy / (norm_x * norm_y), 0.0, 1.0))


# --------------------------------------------------------------------------------------------------
# 3. MMD permutation test
# --------------------------------------------------------------------------------------------------


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = np.sum(z * z, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _mmd2_unbiased_from_masks(k0: np.ndarray, masks: np.ndarray, m: int, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each row of ``masks`` (1 marks the x side) on a kernel with zeroed diagonal."""
    other = 1.0 - masks
    km = masks @ k0  # (p, N)
    ko = other @ k0
    s_xx = np.sum(km * masks, axis=1)
    s_xy = np.sum(km * other, axis=1)
    s_yy = np.sum(ko * other, axis=1)
    return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2.0 * s_xy / (m * n)


def mmd_permutation_test(
    x: Any,
    y: Any,
    *,
    n_permutations: int = 200,
    seed: int = 0,
    bandwidth: float | None = None,
    max_samples: int = 500,
) -> dict[str, float]:
    """Two-sample test of P_x = P_y with the unbiased squared MMD and a Gaussian RBF kernel.

    MMD_u^2 is the U-statistic of Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A Kernel Two-Sample Test",
    JMLR 13, 2012 (eq. 3), with k(a, b) = exp(-||a - b||^2 / (2 sigma^2)). When ``bandwidth`` is None,
    sigma is the median heuristic of the same paper: the median Euclidean distance between distinct points
    of the pooled (subsampled) sample. The null distribution comes from random relabelings of the pooled
    sample, p = (#{permuted >= observed} + 1) / (n_permutations + 1) (Phipson & Smyth, 2010).

    Args:
        x: (m, d) sample from the first domain (1-D is taken as d = 1).
        y: (n, d) sample from the second domain, same d.
        n_permutations: number of random relabelings (>= 1).
        seed: seed for the subsampling and the permutations.
        bandwidth: kernel width sigma (> 0); None for the median heuristic.
        max_samples: each side is subsampled without replacement to at most this many rows.

    Returns:
        ``{"mmd2", "p_value", "bandwidth"}``: the observed unbiased MMD^2 (can be slightly negative under the
        null), the permutation p-value and the sigma used.

    Raises:
        ValueError: not 2-D, empty, fewer than 2 rows on a side, different feature dimensions, NaN/inf,
            non-positive bandwidth, ``n_permutations`` or ``max_samples`` out of range.
    """
    xa = _float_2d(x, "x")
    ya = _float_2d(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {xa.shape[1]} and {ya.shape[1]}")
    if xa.shape[0] < 2 or ya.shape[0] < 2:
        raise ValueError(f"each sample needs at least 2 rows, got {xa.shape[0]} and {ya.shape[0]}")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 2:
        raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    if bandwidth is not None and not (math.isfinite(float(bandwidth)) and float(bandwidth) > 0.0):
        raise ValueError(f"bandwidth must be a positive finite number or None, got {bandwidth!r}")

    rng = np.random.default_rng(seed)
    if xa.shape[0] > max_samples:
        xa = xa[rng.choice(xa.shape[0], size=max_samples, replace=False)]
    if ya.shape[0] > max_samples:
        ya = ya[rng.choice(ya.shape[0], size=max_samples, replace=False)]
    m, n = xa.shape[0], ya.shape[0]
    z = np.vstack([xa, ya])
    d2 = _sq_dists(z)

    if bandwidth is None:
        iu = np.triu_indices(m + n, k=1)
        dists = np.sqrt(d2[iu])
        sigma = float(np.median(dists))
        if sigma <= 0.0:  # more than half the pairs coincide: fall back to the mean positive distance
            positive = dists[dists > 0]
            sigma = float(positive.mean()) if positive.size else 1.0
    else:
        sigma = float(bandwidth)

    k0 = np.exp(-d2 / (2.0 * sigma * sigma))
    np.fill_diagonal(k0, 0.0)

    observed_mask = np.zeros((1, m + n))
    observed_mask[0, :m] = 1.0
    mmd2 = float(_mmd2_unbiased_from_masks(k0, observed_mask, m, n)[0])

    count = 0
    chunk = 64
    done = 0
    while done < n_permutations:
        p = min(chunk, int(n_permutations) - done)
        masks = np.zeros((p, m + n))
        for i in range(p):
            masks[i, rng.permutation(m + n)[:m]] = 1.0
        perm_stats = _mmd2_unbiased_from_masks(k0, masks, m, n)
        # a small tolerance so that relabelings equal to the observed one in exact arithmetic count as >=
        count += int(np.sum(perm_stats >= mmd2 - 1e-12))
        done += p
    p_value = (count + 1) / (int(n_permutations) + 1)
    return {"mmd2": mmd2, "p_value": float(p_value), "bandwidth": sigma}


# --------------------------------------------------------------------------------------------------
# 4. proxy A-distance
# --------------------------------------------------------------------------------------------------


def proxy_a_distance(x: Any, y: Any, *, seed: int = 0) -> float:
    """Proxy A-distance between two feature samples: PAD = 2 (1 - 2 e).

    e is the cross-validated error of a linear domain classifier (standardised features + sklearn
    ``LogisticRegression``) trained to tell x from y (Ben-David, Blitzer, Crammer & Pereira, "Analysis of
    Representations for Domain Adaptation", NIPS 2007; Ben-David et al., "A theory of learning from different
    domains", Machine Learning 79, 2010). Stratified 5-fold CV is used when each domain has at least 5 rows,
    2-fold otherwise. e is the *balanced* error (mean of the two per-domain error rates), equal to the plain
    error for equal sample sizes, so unequal sizes do not inflate the distance.

    Args:
        x: (m, d) features of the first domain (1-D is taken as d = 1).
        y: (n, d) features of the second domain, same d.
        seed: random_state of the fold shuffling and of the classifier.

    Returns:
        PAD clipped to [0, 2]: about 0 for indistinguishable domains, 2 for linearly separable ones.

    Raises:
        ValueError: not 2-D, empty, fewer than 2 rows on a side, different feature dimensions, NaN/inf.
    """
    xa = _float_2d(x, "x")
    ya = _float_2d(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {xa.shape[1]} and {ya.shape[1]}")
    if xa.shape[0] < 2 or ya.shape[0] < 2:
        raise ValueError(f"each domain needs at least 2 rows, got {xa.shape[0]} and {ya.shape[0]}")
    wrong_x, wrong_y = _domain_errors(xa, ya, seed)
    error = 0.5 * (float(wrong_x.mean()) + float(wrong_y.mean()))
    return float(np.clip(2.0 * (1.0 - 2.0 * error), 0.0, 2.0))


def _domain_errors(xa: np.ndarray, ya: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether the cross-validated linear domain classifier of `proxy_a_distance` got it wrong."""
    features = np.vstack([xa, ya])
    labels = np.concatenate([np.zeros(xa.shape[0], dtype=int), np.ones(ya.shape[0], dtype=int)])
    n_splits = 5 if min(xa.shape[0], ya.shape[0]) >= 5 else 2
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    pred = cross_val_predict(clf, features, labels, cv=folds)
    return pred[labels == 0] != 0, pred[labels == 1] != 1


def proxy_a_distance_replicates(
    x: Any, y: Any, *, seed: int = 0, n_bootstrap: int = 1000, bootstrap_seed: int = 0
) -> tuple[float, np.ndarray]:
    """`proxy_a_distance` and bootstrap replicates of it, for an interval.

    The cross-validated predictions are made once; each replicate redraws, with replacement and within each
    domain, which rows' errors count (a stratified bootstrap of the balanced error; the classifier is not
    refitted, so the interval covers the test-sample noise of the error, not the fold noise of the fit).
    Replicates made with the same `bootstrap_seed` and sample sizes share their draws: averaging the replicates
    of several models (seeds) gives the interval of their mean.

    Returns:
        (PAD, its (n_bootstrap,) replicates), both clipped to [0, 2].
    """
    xa = _float_2d(x, "x")
    ya = _float_2d(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {xa.shape[1]} and {ya.shape[1]}")
    if xa.shape[0] < 2 or ya.shape[0] < 2:
        raise ValueError(f"each domain needs at least 2 rows, got {xa.shape[0]} and {ya.shape[0]}")
    wrong_x, wrong_y = _domain_errors(xa, ya, seed)
    rng = np.random.default_rng(bootstrap_seed)
    ex = wrong_x[rng.integers(0, len(wrong_x), size=(n_bootstrap, len(wrong_x)))].mean(1)
    ey = wrong_y[rng.integers(0, len(wrong_y), size=(n_bootstrap, len(wrong_y)))].mean(1)
    pad = float(np.clip(2.0 * (1.0 - (float(wrong_x.mean()) + float(wrong_y.mean()))), 0.0, 2.0))
    return pad, np.clip(2.0 * (1.0 - (ex + ey)), 0.0, 2.0)


# --------------------------------------------------------------------------------------------------
# 5. BatchNorm statistics gap
# --------------------------------------------------------------------------------------------------


def bn_statistics_gap(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> list[dict]:
    """Gap between each BatchNorm2d layer's running (source) statistics and the target activations.

    The images go through the model in eval mode (so BN normalises with the source statistics, as at
    deployment, and no running statistic is updated); a forward pre-hook on each ``BatchNorm2d`` collects the
    per-channel mean mu_t and (population) variance var_t of the activations entering it. With the source
    statistics mu_s = running_mean, var_s = running_var and the layer's eps, per layer and averaged over
    channels:

    * ``mean_gap``: |mu_t - mu_s| / sqrt(var_s + eps), the standardised mean shift;
    * ``var_log_ratio``: |log((var_t + eps) / (var_s + eps))|;
    * ``gaussian_kl``: the symmetric (Jeffreys) divergence KL(N_t || N_s) + KL(N_s || N_t) between the
      per-channel Gaussians, = (v_t + d^2) / (2 v_s) + (v_s + d^2) / (2 v_t) - 1 with v = var + eps.

    This is the covariate-shift signal behind AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch
    Normalization for Practical Domain Adaptation", ICLR-W 2017) and BN-statistics adaptation (Schneider et
    al., NeurIPS 2020). Layers without running statistics (``track_running_stats=False``) are skipped. The
    model's parameters, buffers and each module's train/eval flag are left as they were.

    Args:
        model: a torch module containing ``BatchNorm2d`` layers.
        images: (N, C, H, W) tensor of target images (moved batch by batch to the model's device).
        batch_size: images per forward pass (>= 1).

    Returns:
        One dict per ``BatchNorm2d`` layer with running statistics, in ``model.named_modules()`` order:
        ``{"layer", "mean_gap", "var_log_ratio", "gaussian_kl"}``. Empty when the model has none.

    Raises:
        ValueError: images not a 4-D tensor, empty, or containing NaN/inf; batch_size < 1.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be a 4-D (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (0 images)")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError("images contains NaN or infinite values")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    layers = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.BatchNorm2d) and mod.running_mean is not None and mod.running_var is not None
    ]
    if not layers:
        return []

    device = module_device(model)
    moments = {name: ChannelMoments() for name, _ in layers}
    handles = []
    for name, mod in layers:

        def hook(_module: torch.nn.Module, inputs: tuple, _acc: ChannelMoments = moments[name]) -> None:
            _acc.update(inputs[0])

        handles.append(mod.register_forward_pre_hook(hook))

    flags = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        for mod, flag in flags.items():
            mod.training = flag

    out: list[dict] = []
    for name, mod in layers:
        acc = moments[name]
        if not acc.seen:
            continue  # layer not reached by the forward pass
        eps = float(mod.eps)
        mu_t = acc.mean.numpy()
        var_t = acc.variance.numpy()
        mu_s = mod.running_mean.detach().to("cpu", torch.float64).numpy()
        var_s = mod.running_var.detach().to("cpu", torch.float64).numpy()
        v_s = np.maximum(var_s, 0.0) + eps
        v_t = np.maximum(var_t, 0.0) + eps
        diff2 = (mu_t - mu_s) ** 2
        jeffreys = (v_t + diff2) / (2.0 * v_s) + (v_s + diff2) / (2.0 * v_t) - 1.0
        out.append(
            {
                "layer": name,
                "mean_gap": float(np.mean(np.abs(mu_t - mu_s) / np.sqrt(v_s))),
                "var_log_ratio": float(np.mean(np.abs(np.log(v_t / v_s)))),
                "gaussian_kl": float(np.mean(jeffreys)),
            }
        )
    return out


def bn_gap_interval(
    models: list[torch.nn.Module],
    images: torch.Tensor,
    *,
    n_bootstrap: int,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 64,
) -> dict | None:
    """`bn_statistics_gap`'s mean gap (|mu_t - mu_s| / sqrt(var_s + eps), averaged over channels, then over
    layers), averaged over `models`, with a percentile bootstrap interval over the images.

    Each image's per-channel mean of the activations entering each ``BatchNorm2d`` is kept; every image has
    the same number of pixels per layer, so the target mean mu_t is the mean of the image means, and a
    replicate reweights the images with one multinomial draw (the same draws for every model: paired).

    Returns:
        {"value", "ci_low", "ci_high", "layers", "images"}; None when no model has a BatchNorm2d layer.
    """
    n = int(images.shape[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap) / n  # (B, n)
    full, reps, n_layers = [], [], 0
    for model in models:
        layers = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.BatchNorm2d) and mod.running_mean is not None and mod.running_var is not None
        ]
        if not layers:
            continue
        means: dict[str, list[np.ndarray]] = {name: [] for name, _ in layers}
        handles = []
        for name, mod in layers:

            def hook(_m: torch.nn.Module, inputs: tuple, _out: list = means[name]) -> None:
                _out.append(inputs[0].detach().to("cpu", torch.float64).mean(dim=(2, 3)).numpy())

            handles.append(mod.register_forward_pre_hook(hook))
        flags = {mod: mod.training for mod in model.modules()}
        device = module_device(model)
        try:
            model.eval()
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    model(images[start : start + batch_size].to(device))
        finally:
            for h in handles:
                h.remove()
            for mod, flag in flags.items():
                mod.training = flag
        layer_full, layer_reps = [], []
        for name, mod in layers:
            if not means[name]:
                continue
            m = np.concatenate(means[name])  # (n, C)
            mu_s = mod.running_mean.detach().to("cpu", torch.float64).numpy()
            sd_s = np.sqrt(np.maximum(mod.running_var.detach().to("cpu", torch.float64).numpy(), 0.0) + float(mod.eps))
            layer_full.append(float(np.mean(np.abs(m.mean(0) - mu_s) / sd_s)))
            layer_reps.append(np.mean(np.abs(weights @ m - mu_s) / sd_s, axis=1))
        full.append(float(np.mean(layer_full)))
        reps.append(np.mean(layer_reps, axis=0))
        n_layers = len(layer_full)
    if not full:
        return None
    rep = np.mean(reps, axis=0)
    alpha = (1 - confidence) / 2
    return {
        "value": float(np.mean(full)),
        "ci_low": float(np.quantile(rep, alpha)),
        "ci_high": float(np.quantile(rep, 1 - alpha)),
        "layers": n_layers,
        "images": n,
    }


# --------------------------------------------------------------------------------------------------
# 6. weight drift
# --------------------------------------------------------------------------------------------------


def _default_group(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def weight_drift(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Relative L2 drift ||w_after - w_before|| / ||w_before|| of groups of parameters.

    The norm of a group is the L2 norm of all its tensors concatenated. This is the weight-space
    forgetting proxy behind L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks", ICML 2018), which penalises exactly ||w - w_source||^2.

    Args:
        before: state dict (name -> tensor) of the source / pre-fine-tuning weights.
        after: state dict of the fine-tuned weights.
        groups: group name -> parameter names. When None, one group per top-level prefix (the part before
            the first '.'), or per first two parts when the second is an index (``blocks.3.conv.weight`` ->
            ``blocks.3``, ``layer1.0.conv1.weight`` -> ``layer1.0``).

    Returns:
        Group name -> relative drift (0.0 when unchanged; ``inf`` when ||w_before|| = 0 but the weights
        moved; ``nan`` for an explicit group with no usable tensor), plus ``"_skipped"``: the number of
        distinct keys left out because they are missing on one side, not floating point (e.g.
        ``num_batches_tracked``) or of different shapes (e.g. a replaced classifier head).

    Raises:
        ValueError: both dicts empty, a value that is not a tensor, a float tensor with NaN, or a group
            called ``"_skipped"``.
    """
    if not isinstance(before, Mapping) or not isinstance(after, Mapping):
        raise ValueError("before and after must be mappings of parameter name -> tensor")
    if not before and not after:
        raise ValueError("before and after are both empty")
    for side, sd in (("before", before), ("after", after)):
        for key, val in sd.items():
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"{side}[{key!r}] is a {type(val).__name__}, not a torch.Tensor")

    skipped: set[str] = set()

    def usable(key: str) -> bool:
        if key not in before or key not in after:
            return False
        a, b = before[key], after[key]
        if not (a.is_floating_point() and b.is_floating_point()):
            return False
        return tuple(a.shape) == tuple(b.shape)

    if groups is None:
        resolved: dict[str, list[str]] = {}
        for key in list(before) + [k for k in after if k not in before]:
            if usable(key):
                resolved.setdefault(_default_group(key), []).append(key)
            else:
                skipped.add(key)
    else:
        if "_skipped" in groups:
            raise ValueError("'_skipped' is reserved and cannot be a group name")
        resolved = {}
        for gname, names in groups.items():
            if isinstance(names, str):
                raise ValueError(f"groups[{gname!r}] must be a list of parameter names, not a string")
            kept = []
            for key in names:
                if usable(key):
                    kept.append(key)
                else:
                    skipped.add(key)
            resolved[gname] = kept

    result: dict[str, float] = {}
    for gname, names in resolved.items():
        if not names:
            result[gname] = float("nan")
            continue
        diff_sq = 0.0
        base_sq = 0.0
        for key in names:
            w0 = before[key].detach().to("cpu", torch.float64)
            w1 = after[key].detach().to("cpu", torch.float64)
            if torch.isnan(w0).any():
                raise ValueError(f"before[{key!r}] contains NaN values")
            if torch.isnan(w1).any():
                raise ValueError(f"after[{key!r}] contains NaN values")
            diff_sq += float(torch.sum((w1 - w0) ** 2))
            base_sq += float(torch.sum(w0**2))
        if base_sq == 0.0:
            result[gname] = 0.0 if diff_sq == 0.0 else float("inf")
        else:
            result[gname] = math.sqrt(diff_sq) / math.sqrt(base_sq)
    result["_skipped"] = float(len(skipped))
    return result


# --------------------------------------------------------------------------------------------------
# 7. prediction agreement
# --------------------------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def prediction_agreement(logits_before: np.ndarray, logits_after: np.ndarray) -> dict[str, float]:
    """Agreement between two models' predictions on the same inputs (forgetting proxy without source labels).

    Top-1 agreement is the fraction of rows whose argmax is unchanged; the divergence is the symmetric
    (Jeffreys) KL(p || q) + KL(q || p) = sum_k (p_k - q_k)(log p_k - log q_k) between the softmaxes, averaged
    over rows, computed from log-softmax (stable for large logits). Output-space drift on source inputs is
    the quantity Learning without Forgetting keeps small (Li & Hoiem, "Learning without Forgetting", ECCV
    2016 / TPAMI 2018).

    Args:
        logits_before: (n, k) logits of the source model (numpy array or tensor).
        logits_after: (n, k) logits of the fine-tuned model on the same n inputs, same k classes.

    Returns:
        ``{"top1_agreement", "mean_symmetric_kl"}``: agreement in [0, 1] and the mean divergence (>= 0).

    Raises:
        ValueError: not 2-D, empty, different shapes, NaN or infinite values.
    """
    za = _float_2d(logits_before, "logits_before", allow_1d=False)
    zb = _float_2d(logits_after, "logits_after", allow_1d=False)
    if za.shape != zb.shape:
        raise ValueError(f"logits_before and logits_after must have the same shape, got {za.shape} and {zb.shape}")
    lp = _log_softmax(za)
    lq = _log_softmax(zb)
    sym_kl = np.sum((np.exp(lp) - np.exp(lq)) * (lp - lq), axis=1)
    agreement = float(np.mean(np.argmax(za, axis=1) == np.argmax(zb, axis=1)))
    return {"top1_agreement": agreement, "mean_symmetric_kl": float(max(0.0, np.mean(sym_kl)))}


# --------------------------------------------------------------------------------------------------
# 8. train/validation gap
# --------------------------------------------------------------------------------------------------

_HISTORY_KEYS = ("train_accuracy", "val_accuracy", "train_loss", "val_loss")


def train_val_gap(history: Sequence[Mapping[str, float]]) -> dict[str, float | int]:
    """Generalisation gap of a training run, at the best-validation epoch and at the last epoch.

    Accuracy gap = train_accuracy - val_accuracy and loss gap = val_loss - train_loss (both positive when
    over-fitting), the usual generalisation-gap definition (e.g. Zhang et al., "Understanding deep learning
    requires rethinking generalization", ICLR 2017). The best epoch is `training.rules.best_row`'s: the checkpoint
    `fit` kept (highest val_accuracy, a tie broken by the lower val_loss, then the earlier epoch).

    Args:
        history: one mapping per epoch, in order, each with ``train_accuracy``, ``val_accuracy``,
            ``train_loss`` and ``val_loss``.

    Returns:
        ``{"best_epoch", "best_val_accuracy", "accuracy_gap_at_best", "loss_gap_at_best", "last_epoch",
        "accuracy_gap_last", "loss_gap_last", "val_accuracy_drop"}``; the two epochs are 0-based positions
        in ``history`` (ints), ``val_accuracy_drop`` = best val_accuracy - last val_accuracy.

    Raises:
        ValueError: empty history, a row that is not a mapping, a missing key, or a NaN/non-numeric value.
    """
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError("history must be a list of per-epoch dicts")
    if len(history) == 0:
        raise ValueError("history is empty")
    rows = np.empty((len(history), 4), dtype=np.float64)
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise ValueError(f"history[{i}] is a {type(row).__name__}, not a dict")
        for j, key in enumerate(_HISTORY_KEYS):
            if key not in row:
                raise ValueError(f"history[{i}] has no {key!r}")
            try:
                val = float(row[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"history[{i}][{key!r}] is not a number: {row[key]!r}") from exc
            if math.isnan(val):
                raise ValueError(f"history[{i}][{key!r}] is NaN")
            rows[i, j] = val
    train_acc, val_acc, train_loss, val_loss = rows.T
    # The best epoch is `training.rules.best_row`'s (the checkpoint kept), never a second definition.
    keyed = [
        {"val_accuracy": va, "val_loss": vl, "_i": i} for i, (va, vl) in enumerate(zip(val_acc, val_loss, strict=True))
    ]
    best = int(best_row(keyed)["_i"])
    last = len(history) - 1
    return {
        "best_epoch": best,
        "best_val_accuracy": float(val_acc[best]),
        "accuracy_gap_at_best": float(train_acc[best] - val_acc[best]),
        "loss_gap_at_best": float(val_loss[best] - train_loss[best]),
        "last_epoch": last,
        "accuracy_gap_last": float(train_acc[last] - val_acc[last]),
        "loss_gap_last": float(val_loss[last] - train_loss[last]),
        "val_accuracy_drop": float(val_acc[best] - val_acc[last]),
    }

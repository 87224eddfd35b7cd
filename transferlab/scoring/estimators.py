"""Transferability estimators: how well a frozen source model will transfer to a target task, before tuning.

Each estimator scores one (source model, target dataset) pair from what the source model produces on the
target data: its penultimate-layer features (LogME, H-score, shrinkage H-score, kNN and linear-probe
accuracy, SFDA) or its own classifier's logits (LEEP, NCE). Higher is better for every estimator here; the
flag on `Estimator` exists so that callers rank sources without special-casing names.

Estimators are registered with `@register_estimator` into `ESTIMATORS` and share one signature,
``fn(features_or_logits, labels, *, seed) -> float``. An estimator that has no meaningful value on the given
inputs (e.g. H-score once the features can span every centred labelling) raises `UndefinedEstimate` with the
reason. `score_all` runs all (or some) of them and returns ``None`` for an undefined estimate and for
logit-based estimators when no source logits are available (e.g. a backbone with no head);
`score_all_with_reasons` also says why each ``None`` is there.

All estimators work in float64, are deterministic given ``seed`` and tolerate classes with very few samples.
Labels are integers, normally ``0..C-1``; any integer ids are accepted and re-encoded internally, so every
estimator is invariant to relabelling the classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "UndefinedEstimate",
    "get_estimator",
    "hscore",
    "hscore_shrinkage",
    "knn_accuracy",
    "leep",
    "linear_probe_accuracy",
    "logme",
    "nce",
    "register_estimator",
    "score_all",
    "score_all_with_reasons",
    "sfda",
]

NEEDS = ("features", "logits")


class UndefinedEstimate(Exception):  # noqa: N818 - an outcome, not a failure: the estimate does not exist here
    """The estimator has no meaningful value on these inputs; ``reason`` says why (reported beside a null).

    Not a ValueError: the inputs are valid, and a caller that catches bad input must not swallow this.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Estimator:
    """A registered transferability estimator.

    Attributes:
        name: Registry key.
        fn: ``fn(features_or_logits, labels, *, seed) -> float``.
        needs: ``"features"`` (penultimate features) or ``"logits"`` (source classifier logits).
        higher_is_better: Whether a larger score predicts better transfer.
        paper: Citation of the method.
        definition: One sentence saying what is computed, on which data (written into metrics/score.json so
            that two numbers with similar names are not confused); the first docstring line by default.
    """

    name: str
    fn: Callable[..., float]
    needs: str
    higher_is_better: bool = True
    paper: str = ""
    definition: str = ""


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(
    name: str, needs: str, paper: str, higher_is_better: bool = True, definition: str = ""
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator registering ``fn`` in `ESTIMATORS` under ``name``; returns ``fn`` unchanged.

    Args:
        name: Registry key; must be new.
        needs: ``"features"`` or ``"logits"``.
        paper: Citation of the method.
        higher_is_better: Whether a larger score predicts better transfer.
        definition: What is computed, in one sentence (default: the first line of ``fn``'s docstring).

    Returns:
        The decorator.

    Raises:
        ValueError: ``needs`` is not one of ``"features"``/``"logits"`` or ``name`` is already registered.
    """
    if needs not in NEEDS:
        raise ValueError(f"estimator {name!r}: needs must be one of {list(NEEDS)}, got {needs!r}")
    if name in ESTIMATORS:
        raise ValueError(f"estimator {name!r} is already registered")

    def decorator(fn: Callable[..., float]) -> Callable[..., float]:
        text = definition or (fn.__doc__ or "").strip().split("\n")[0]
        ESTIMATORS[name] = Estimator(
            name=name, fn=fn, needs=needs, higher_is_better=higher_is_better, paper=paper, definition=text
        )
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """Look up a registered estimator.

    Args:
        name: Registry key.

    Returns:
        The `Estimator`.

    Raises:
        KeyError: Unknown name; the message lists the valid names, sorted.
    """
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown transferability estimator {name!r}; valid names: {', '.join(sorted(ESTIMATORS))}"
        ) from None


def score_all_with_reasons(
    features: np.ndarray,
    labels: np.ndarray,
    source_logits: np.ndarray | None,
    seed: int,
    names: list[str] | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Run every registered estimator (or those named) on one source/target pair; say why any is missing.

    Args:
        features: ``(n, d)`` source-model features of the target samples.
        labels: ``(n,)`` integer target labels.
        source_logits: ``(n, Z)`` logits of the source classifier on the target samples, or ``None``.
        seed: Seed passed to every estimator.
        names: Estimators to run, in this order; all registered ones (sorted) when ``None``.

    Returns:
        ``({name: score or None}, {name: reason})``: ``None`` where the estimate is undefined on these inputs
        (`UndefinedEstimate`) or needs source logits that are not there; the reasons name only those.

    Raises:
        KeyError: An unknown name in ``names``.
        ValueError: Invalid features, logits or labels.
    """
    selected = [get_estimator(n) for n in (sorted(ESTIMATORS) if names is None else names)]
    scores: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for est in selected:
        if est.needs == "logits" and source_logits is None:
            scores[est.name] = None
            reasons[est.name] = "needs source-classifier logits, which this source model does not have"
            continue
        try:
            scores[est.name] = est.fn(source_logits if est.needs == "logits" else features, labels, seed=seed)
        except UndefinedEstimate as exc:
            scores[est.name] = None
            reasons[est.name] = exc.reason
    return scores, reasons


def score_all(
    features: np.ndarray,
    labels: np.ndarray,
    source_logits: np.ndarray | None,
    seed: int,
    names: list[str] | None = None,
) -> dict[str, float | None]:
    """Run every registered estimator (or those named) on one source/target pair.

    Args:
        features: ``(n, d)`` source-model features of the target samples.
        labels: ``(n,)`` integer target labels.
        source_logits: ``(n, Z)`` logits of the source classifier on the target samples, or ``None``.
        seed: Seed passed to every estimator.
        names: Estimators to run, in this order; all registered ones (sorted) when ``None``.

    Returns:
        ``{name: score}``; ``None`` for an undefined estimate and for logit-based estimators when
        ``source_logits`` is ``None`` (`score_all_with_reasons` says which and why).

    Raises:
        KeyError: An unknown name in ``names``.
        ValueError: Invalid features, logits or labels.
    """
    return score_all_with_reasons(features, labels, source_logits, seed, names)[0]


# --------------------------------------------------------------------------------------------- helpers


def _validate(x: np.ndarray, labels: np.ndarray, what: str = "features") -> tuple[np.ndarray, np.ndarray, int]:
    """Check inputs and return (x as float64, labels encoded 0..C-1, C).

    Raises:
        ValueError: ``x`` not 2-D, empty or non-finite; labels not 1-D integers; length mismatch; < 2 classes.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n_samples, n_dims), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must be non-empty, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{what} must be finite: {int(bad.sum())} NaN/inf value(s) in {rows.size} row(s), "
            f"first at row {int(rows[0])}"
        )
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"length mismatch: {what} has {x.shape[0]} rows but labels has {y.shape[0]} entries")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
        y = y.astype(np.int64)
    classes, y_enc = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(
            f"labels must contain at least 2 classes, got {classes.size} ({classes.tolist()}); "
            "transferability is undefined for a single class"
        )
    return x, y_enc.astype(np.int64), int(classes.size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable against overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _class_means(f: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Replace each row of ``f`` by the mean of its class: the matrix of E[f | y] per sample."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    sums = np.zeros((n_classes, f.shape[1]))
    np.add.at(sums, y, f)
    return (sums / counts[:, None])[y]


def _standardize(f: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance columns; constant columns are only centred."""
    std = f.std(axis=0)
    std[std == 0] = 1.0
    return (f - f.mean(axis=0)) / std


# ------------------------------------------------------------------------------------------ estimators


def _logme_evidence(
    y: np.ndarray,
    u: np.ndarray,
    s: np.ndarray,
    s2: np.ndarray,
    d: int,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> float:
    """Maximised log evidence per sample of Bayesian linear regression y ~ F m, for one target column.

    ``F = U diag(s) V^T`` (thin SVD, ``s2 = s**2``). Prior m ~ N(0, alpha^-1 I), noise N(0, beta^-1).
    """
    n = y.shape[0]
    uty = u.T @ y  # coordinates of y in the column space of F
    floor = np.finfo(np.float64).eps * max(float(y @ y), 1.0)
    alpha, beta = 1.0, 1.0

    def posterior(alpha: float, beta: float) -> tuple[float, float, float]:
        # m = beta (alpha I + beta F^T F)^-1 F^T y, written in the V basis.
        coef = beta * s * uty / (alpha + beta * s2)
        m2 = max(float(coef @ coef), floor)
        res = y - u @ (s * coef)
        r2 = max(float(res @ res), floor)
        gamma = float(np.sum(beta * s2 / (alpha + beta * s2)))
        return m2, r2, gamma

    lam = alpha / beta
    for _ in range(max_iter):
        m2, r2, gamma = posterior(alpha, beta)
        alpha = gamma / m2 if gamma > 0 else 1.0 / m2
        beta = max(n - gamma, np.finfo(np.float64).eps) / r2
        new_lam = alpha / beta
        converged = abs(new_lam - lam) / lam < tol
        lam = new_lam
        if converged:
            break
    m2, r2, _ = posterior(alpha, beta)
    # log|A| with A = alpha I + beta F^T F: the d - rank null directions contribute log(alpha) each.
    logdet = float(np.sum(np.log(alpha + beta * s2))) + (d - s2.size) * np.log(alpha)
    evidence = (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * r2
        - alpha / 2 * m2
        - logdet / 2
    )
    return float(evidence / n)


@register_estimator(
    "logme",
    needs="features",
    paper="You, Liu, Wang, Long. LogME: Practical Assessment of Pre-trained Models for Transfer Learning. ICML 2021",
)
def logme(features: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """LogME: average maximised log marginal evidence of a Bayesian linear model on the features.

    For each class a one-vs-rest 0/1 target is regressed on the raw features; alpha (prior precision) and
    beta (noise precision) are found by the fixed-point iterations of You et al., ICML 2021, using one SVD
    of the feature matrix. The score is the log evidence divided by n, averaged over classes.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        The LogME score (higher is better; typically in about [-2, 2]).

    Raises:
        ValueError: Invalid features or labels.
    """
    del seed
    f, y, n_classes = _validate(features, labels)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s[0] * max(f.shape) * np.finfo(np.float64).eps  # numerical rank; s is sorted descending
    u, s = u[:, keep], s[keep]
    s2 = s**2
    d = f.shape[1]
    scores = [_logme_evidence((y == c).astype(np.float64), u, s, s2, d) for c in range(n_classes)]
    return float(np.mean(scores))


@register_estimator(
    "leep",
    needs="logits",
    paper="Nguyen, Hassner, Seeger, Archambeau. LEEP: A New Measure to Evaluate Transferability of "
    "Learned Representations. ICML 2020",
)
def leep(logits: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """LEEP: log expected empirical prediction of the source classifier turned into a target classifier.

    With theta = softmax(logits), the empirical joint is P(y, z) = 1/n sum_i theta_iz [y_i = y], the
    conditional P(y | z) = P(y, z) / P(z), and LEEP = 1/n sum_i log sum_z P(y_i | z) theta_iz.

    Args:
        logits: ``(n, Z)`` source-classifier logits on the target samples.
        labels: ``(n,)`` integer target labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        LEEP score, <= 0 (0 is the maximum).

    Raises:
        ValueError: Invalid logits or labels.
    """
    del seed
    z, y, n_classes = _validate(logits, labels, what="source logits")
    theta = _softmax(z)
    n = theta.shape[0]
    joint = np.zeros((n_classes, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= n
    p_z = joint.sum(axis=0)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)  # P(y | z)
    eep = np.einsum("iz,iz->i", theta, cond[y])
    return float(np.mean(np.log(np.maximum(eep, np.finfo(np.float64).tiny))))


@register_estimator(
    "nce",
    needs="logits",
    paper="Tran, Nguyen, Hassner. Transferability and Hardness of Supervised Classification Tasks. ICCV 2019",
)
def nce(logits: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """NCE: negative conditional entropy -H(Y | Z) of target labels given the source's hard predictions.

    Z = argmax of the source logits (ties go to the lowest index); entropies use the natural log.

    Args:
        logits: ``(n, Z)`` source-classifier logits on the target samples.
        labels: ``(n,)`` integer target labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        NCE, <= 0; 0 exactly when the labels are a function of the source prediction.

    Raises:
        ValueError: Invalid logits or labels.
    """
    del seed
    logit, y, n_classes = _validate(logits, labels, what="source logits")
    z = np.argmax(logit, axis=1)
    n = y.shape[0]
    joint = np.zeros((n_classes, logit.shape[1]))
    np.add.at(joint, (y, z), 1.0)
    joint /= n
    p_z = joint.sum(axis=0)
    nz = joint > 0
    cond = joint[nz] / np.broadcast_to(p_z, joint.shape)[nz]
    return float(np.sum(joint[nz] * np.log(cond)))


@register_estimator(
    "hscore",
    needs="features",
    paper="Bao, Li, Huang, Zheng, Wang, Chen. An Information-Theoretic Approach to Transferability in Task "
    "Transfer Learning. ICIP 2019",
)
def hscore(features: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])), the Fisher-like separability of the classes in feature space.

    Computed from the thin SVD of the centred features F = U S V^T: tr((F^T F)^+ F^T M F) = ||M U||_F^2, with
    M the projector that replaces each row by its class mean (M is symmetric and idempotent). This is the
    plain definition, evaluated in the n x n (dual) space when d > n.

    Undefined when the numerical rank r of the centred features reaches n - 1 (e.g. d >= n - 1 for generic
    features): U then spans every centred vector, M U U^T = M, and the score equals tr(M) = C - 1 for *any*
    features, noise included, so it carries no information about the features (Gaussian noise of 1000 x 1280
    with 10 classes scores exactly 9.0). The rank uses the usual tolerance s_max * max(n, d) * eps.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        H-score, >= 0 (at most min(d, C - 1) up to rounding).

    Raises:
        ValueError: Invalid features or labels.
        UndefinedEstimate: rank(centred features) >= n - 1, where the score saturates at C - 1.
    """
    del seed
    f, y, n_classes = _validate(features, labels)
    n = f.shape[0]
    f = f - f.mean(axis=0)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(f.shape) * np.finfo(np.float64).eps
    rank = int(np.sum(s > tol))
    if rank >= n - 1:
        raise UndefinedEstimate(
            f"rank(features)={rank} >= n-1={n - 1}: H-score saturates at C-1={n_classes - 1} for any features"
        )
    g = _class_means(u[:, :rank], y, n_classes)  # M U
    return float(np.sum(g * g))


@register_estimator(
    "hscore_shrinkage",
    needs="features",
    paper="Ibrahim, Ponomareva, Mazumder. Newer is not always better: Rethinking transferability metrics, "
    "their peculiarities, stability and performance. ICLR 2022 (ECML-PKDD 2022)",
)
def hscore_shrinkage(features: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """Shrinkage-regularised H-score: tr(cov_LW(f)^-1 (1 - alpha) cov(E[f | y])).

    The feature covariance is replaced by its Ledoit-Wolf estimate, (1 - alpha) S + alpha mu I, with
    shrinkage alpha chosen in closed form; the class-conditional covariance is scaled by (1 - alpha) as in
    Ibrahim et al. Both covariances use the 1/n normalisation, so alpha = 0 gives the plain H-score.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        Shrinkage H-score, >= 0.

    Raises:
        ValueError: Invalid features or labels.
    """
    from sklearn.covariance import LedoitWolf  # sklearn imported on use: stages import this module cheaply

    del seed
    f, y, n_classes = _validate(features, labels)
    f = f - f.mean(axis=0)
    lw = LedoitWolf(assume_centered=True, store_precision=False).fit(f)
    alpha = float(lw.shrinkage_)
    g = _class_means(f, y, n_classes)
    cov_g = g.T @ g / f.shape[0]
    return float(np.trace(np.linalg.pinv(lw.covariance_, hermitian=True) @ ((1.0 - alpha) * cov_g)))


@register_estimator(
    "knn_accuracy",
    needs="features",
    paper="k-nearest-neighbour leave-one-out accuracy (e.g. Kornblith, Shlens, Le. Do Better ImageNet "
    "Models Transfer Better? CVPR 2019)",
    definition="train split only: leave-one-out 5-nearest-neighbour accuracy (Euclidean, standardized cached "
    "features).",
)
def knn_accuracy(features: np.ndarray, labels: np.ndarray, *, seed: int, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (Euclidean distance on standardized features).

    Each sample is classified by a majority vote of its k nearest other samples; a tied vote goes to the
    tied class whose member is nearest, so the result does not depend on label ids. Ties in distance are
    broken by sample index. Leave-one-out needs no randomness.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: Unused (leave-one-out is deterministic); accepted for the common signature.
        k: Number of neighbours, capped at n - 1.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: Invalid features or labels, or ``k < 1``.
    """
    del seed
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    f, y, n_classes = _validate(features, labels)
    f = _standardize(f)
    n = f.shape[0]
    k = min(k, n - 1)
    sq = np.einsum("ij,ij->i", f, f)
    correct = 0
    chunk = 1024
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = np.arange(start, stop)
        dist = sq[rows, None] + sq[None, :] - 2.0 * (f[rows] @ f.T)
        dist[np.arange(rows.size), rows] = np.inf  # leave the sample itself out
        nbrs = np.argsort(dist, axis=1, kind="stable")[:, :k]
        nbr_labels = y[nbrs]
        b = rows.size
        counts = np.zeros((b, n_classes))
        np.add.at(counts, (np.repeat(np.arange(b), k), nbr_labels.ravel()), 1.0)
        first = np.full((b, n_classes), k, dtype=np.int64)  # rank of the nearest neighbour of each class
        for j in range(k - 1, -1, -1):
            first[np.arange(b), nbr_labels[:, j]] = j
        pred = np.argmax(counts * (k + 1) + (k - first), axis=1)
        correct += int(np.sum(pred == y[rows]))
    return correct / n


@register_estimator(
    "linear_probe_accuracy",
    needs="features",
    paper="Linear evaluation protocol (e.g. Kornblith, Shlens, Le. Do Better ImageNet Models Transfer "
    "Better? CVPR 2019)",
    # Three "linear probe" numbers exist for the same features; say which one this is.
    definition="train split only: stratified 5-fold cross-validated accuracy of a closed-form ridge classifier "
    "(L2 strength by leave-one-out) on standardized cached features. Not the train@linear_probe head (AdamW on "
    "the train split, early-stopped on val, accuracy on test) that the agreement stage trains as ground truth.",
)
def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, *, seed: int, n_splits: int = 5) -> float:
    """Stratified k-fold cross-validated accuracy of a linear probe on standardized features.

    The probe is a ridge (least-squares) classifier whose L2 strength is picked by efficient leave-one-out
    inside each training fold (``RidgeClassifierCV``): the same linear decision rule family as logistic
    regression, in closed form, so scoring a 1,280-d candidate takes seconds instead of the minutes lbfgs
    needs on 1,000 x 1,280 features.

    Uses ``min(n_splits, smallest class size)`` folds, but at least 2; the scaler is fitted inside each
    fold. A training fold that happens to contain a single class predicts that class. The accuracy is
    pooled over all out-of-fold predictions.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: ``random_state`` of the fold shuffling and of the classifier.
        n_splits: Maximum number of folds (>= 2).

    Returns:
        Cross-validated accuracy in [0, 1].

    Raises:
        ValueError: Invalid features or labels, or ``n_splits < 2``.
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    f, y, _ = _validate(features, labels)
    min_count = int(np.bincount(y).min())
    splits = max(2, min(n_splits, min_count))
    cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    with warnings.catch_warnings():
        # A singleton class cannot be in every fold; sklearn warns, and the fold logic below copes.
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        folds = list(cv.split(f, y))
    for train, test in folds:
        train_classes = np.unique(y[train])
        if train_classes.size < 2:
            pred[test] = train_classes[0]
            continue
        model = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 4, 11)))
        model.fit(f[train], y[train])
        pred[test] = model.predict(f[test])
    return float(np.mean(pred == y))


def _sfda_posteriors(
    f: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float | None = None
) -> tuple[np.ndarray, float, int]:
    """p(y | x) of SFDA's regularised Fisher classifier on its own training samples, the shrinkage used and
    the numerical rank of the within-class scatter S_w.

    SFDA projects onto every generalised eigenvector V of (S_b, S_w~) (V^T S_w~ V = I) and scores class c by
    x^T V V^T mu_c - mu_c^T V V^T mu_c / 2 + log pi_c. With all d eigenvectors kept, V V^T = S_w~^-1, so this
    is the linear discriminant with the shrunk within-class covariance
    S_w~ = (1 - lambda) S_w + lambda tr(S_w)/d I, and S_b drops out. S_w~^-1 mu_c is applied through the thin
    SVD of the within-class centred features (n x n work when d > n): on the span of S_w's eigenvectors it
    divides by the shrunk eigenvalues, on the rest by lambda tr(S_w)/d. The features are centred first: the
    discriminant's posteriors do not change under a common shift, and the out-of-span part stays small.

    Raises:
        UndefinedEstimate: zero within-class scatter (every sample equals its class mean).
    """
    n, d = f.shape
    f = f - f.mean(axis=0)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    priors = counts / n
    means = np.zeros((n_classes, d))
    np.add.at(means, y, f)
    means /= counts[:, None]
    within = f - means[y]  # S_w = sum_c pi_c cov_c (1/n_c normalisation) = within^T within / n
    _, s, vt = np.linalg.svd(within, full_matrices=False)
    eig = s**2 / n  # the non-zero eigenvalues of S_w, descending
    mu = float(eig.sum()) / d  # tr(S_w) / d
    if mu <= 0:
        raise UndefinedEstimate("within-class scatter is zero (every sample equals its class mean): SFDA is undefined")
    if shrinkage is None:
        # Shao et al.: lambda = exp(-a * largest eigenvalue of S_w), a = 5, floored at 1e-10. The official
        # code estimates that eigenvalue with 3 power iterations; the SVD above gives it exactly.
        shrinkage = max(float(np.exp(-5.0 * eig[0])), 1e-10)
    keep = s > s[0] * max(n, d) * np.finfo(np.float64).eps
    vt, eig = vt[keep], eig[keep]
    floor = shrinkage * mu  # the shrunk eigenvalue of every direction outside the span of S_w
    coords = means @ vt.T  # (C, r)
    w = (coords / ((1.0 - shrinkage) * eig + floor)) @ vt  # S_w~^-1 mu_c on the span
    if vt.shape[0] < d:
        w += (means - coords @ vt) / floor  # ... and on its orthogonal complement
    logits = f @ w.T - 0.5 * np.einsum("cd,cd->c", means, w) + np.log(priors)
    return _softmax(logits), shrinkage, int(vt.shape[0])


@register_estimator(
    "sfda",
    needs="features",
    paper="Shao, Zhao, Ge, Lu, Li, Wang, Luo. Not All Models Are Equal: Predicting Model Transferability in a "
    "Self-challenging Fisher Space. ECCV 2022",
)
def sfda(features: np.ndarray, labels: np.ndarray, *, seed: int) -> float:
    """SFDA: mean probability of the true class under a regularised Fisher classifier, after ConfMix.

    1. Fit the regularised Fisher discriminant (see `_sfda_posteriors`) with the adaptive shrinkage
       lambda = max(exp(-5 sigma_max(S_w)), 1e-10) and read p(y | x) on the training samples.
    2. Self-challenge (ConfMix): soften those probabilities with a second softmax, as the authors' code
       does, and move each sample towards the mean of the *other* classes' means by one minus its
       softened true-class probability: x <- p x + (1 - p) mean_{c != y} mu_c. Uncertain samples become
       harder.
    3. Refit on the mixed features with the same lambda; the score is the mean p(y_i | x_i).

    Invariant to relabelling the classes, permuting or rotating the feature dimensions, shifting them; not to
    rescaling them (lambda depends on the scale of S_w, as in the paper).

    Undefined when the within-class scatter already has its largest possible rank, n - C, and d exceeds it
    (e.g. d >= n - C + 1 for generic features): the class means then differ along directions in which no
    sample varies, the discriminant divides by the tiny shrinkage floor there, and every labelling is
    separated perfectly; Gaussian noise of 200 x 400 with 10 classes scores 1.0.

    Args:
        features: ``(n, d)`` features of the target samples.
        labels: ``(n,)`` integer class labels.
        seed: Unused (the method is deterministic); accepted for the common signature.

    Returns:
        SFDA score in (0, 1].

    Raises:
        ValueError: Invalid features or labels.
        UndefinedEstimate: zero within-class scatter, or rank(S_w) = n - C < d (saturation, see above).
    """
    del seed
    f, y, n_classes = _validate(features, labels)
    n, d = f.shape
    probs, shrinkage, rank = _sfda_posteriors(f, y, n_classes)
    if n - n_classes <= rank < d:
        raise UndefinedEstimate(
            f"rank(within-class scatter)={rank} >= n-C={n - n_classes} and < d={d}: SFDA separates any labelling "
            "perfectly and saturates at 1"
        )
    conf = _softmax(probs)[np.arange(n), y][:, None]
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    means = np.zeros((n_classes, f.shape[1]))
    np.add.at(means, y, f)
    means /= counts[:, None]
    others = (means.sum(axis=0) - means) / (n_classes - 1)  # mean of the other classes' means
    mixed = conf * f + (1.0 - conf) * others[y]
    probs, _, _ = _sfda_posteriors(mixed, y, n_classes, shrinkage=shrinkage)
    return float(np.mean(probs[np.arange(n), y]))

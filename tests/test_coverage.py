"""Does the nominal 95% interval of a gain cover the true gain? A simulation with a known truth.

Each simulated experiment is one comparison as the pipeline runs it: 2,000 test samples of 10 classes, model A
and model B trained with k seeds each (2, the default `train.seeds`, and 3). A seed's model has a true accuracy
drawn around its recipe's mean, ``p_i = mu + seed_sd * z``, with seed standard deviations like the default
run's (0.5 to 2 percentage points); on each test sample it is right with probability p_i, and the models'
errors are correlated across seeds and models through a shared per-sample difficulty (hard samples are hard
for everybody), which is what makes the test-sample bootstrap paired. The true gain is ``mu_A - mu_B``: the
gain of the recipe, over training seeds and over the test distribution, which is what "transfer beats
scratch" and `transferlab review`'s "beyond noise" claim.

The intervals are computed exactly as `evaluation.stats.paired_bootstrap_gain` computes them (same bootstrap
draws, same seed term; `test_the_fast_path_is_paired_bootstrap_gain` checks that on a few experiments), with
accuracy as the metric and n_bootstrap = 200 instead of the pipeline's 2,000 to stay fast: fewer replicates
make the percentile end points noisier, which lowers coverage a little, so the check is if anything harsh.

Monte-Carlo error: with N experiments a coverage near 95% is measured to within sqrt(0.95 * 0.05 / N): about
0.7 points for the pooled N = 900, 1.8 points for one configuration's 150. The thresholds below leave two
(pooled) and three (per configuration) such standard errors under the nominal level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from transferlab.core.resampling import bootstrap_draws, percentile_interval
from transferlab.evaluation.stats import paired_bootstrap_gain, seed_component, widened_interval

N_TEST, N_CLASSES = 2000, 10
N_BOOTSTRAP = 200
EXPERIMENTS = 150  # per configuration
CONFIDENCE = 0.95
SHARED = 0.5  # share of a sample's correctness decided by its difficulty, common to every model and seed


@dataclass(frozen=True)
class Config:
    name: str
    mu_a: float
    mu_b: float
    sd_a: float  # true seed-to-seed SD of accuracy, before test-sample noise
    sd_b: float
    seeds: int

    @property
    def null(self) -> bool:
        return self.mu_a == self.mu_b


CONFIGS = [
    cfg
    for k in (2, 3)
    for cfg in (
        Config(f"lora_vs_scratch_k{k}", 0.88, 0.80, 0.02, 0.01, k),  # the widest seed spread: lora
        Config(f"null_lora_k{k}", 0.88, 0.88, 0.02, 0.02, k),  # a review of a change that changes nothing
        Config(f"null_stable_k{k}", 0.90, 0.90, 0.005, 0.005, k),
    )
]


def _correct(rng: np.random.Generator, difficulty: np.ndarray, mu: float, sd: float, k: int) -> np.ndarray:
    """(k, n) correctness of k seeds of one recipe: seed i is right on a sample with probability p_i."""
    p = np.clip(mu + sd * rng.standard_normal(k), 0.0, 1.0)
    own = rng.random((k, len(difficulty)))
    u = np.where(rng.random((k, len(difficulty))) < SHARED, difficulty[None, :], own)
    return u < p[:, None]


def _cfg_seed(cfg: Config) -> int:
    """A stable per-configuration seed (str hashes change per process)."""
    return CONFIGS.index(cfg) + 1


def _simulate(cfg: Config, e: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([_cfg_seed(cfg), e])
    difficulty = rng.random(N_TEST)
    ca = _correct(rng, difficulty, cfg.mu_a, cfg.sd_a, cfg.seeds)
    cb = _correct(rng, difficulty, cfg.mu_b, cfg.sd_b, cfg.seeds)
    return ca, cb


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(replicates, n) float: how often each test sample is drawn in each replicate."""
    m = len(idx)
    flat = (idx + (np.arange(m) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)


def _intervals(
    ca: np.ndarray, cb: np.ndarray, idx_new: np.ndarray, idx_old: np.ndarray, sa: np.ndarray, sb: np.ndarray
) -> dict[str, tuple[float, float]]:
    """The new ("seed_t") and the old ("seed_bootstrap") interval of the accuracy gain, from correctness and
    bootstrap draws: `idx_new` the test samples of the new method's replicates, (`idx_old`, `sa`, `sb`) the
    samples and seeds of the old one's.

    A replicate's accuracy of a seed is ``counts @ correct / n`` (the draws as counts: a product instead of
    gathering samples x replicates x seeds values).
    """
    n = ca.shape[1]
    fa, fb = ca.astype(np.float64), cb.astype(np.float64)
    per_a, per_b = fa.mean(axis=1), fb.mean(axis=1)

    counts = _counts(idx_new, n)
    replicates = counts @ (fa.mean(axis=0) - fb.mean(axis=0)) / n  # every seed kept
    se, df = seed_component(per_a, per_b)
    low, high, _ = widened_interval(replicates, se, df, CONFIDENCE)

    if idx_old is not idx_new:
        counts = _counts(idx_old, n)
    # (replicates, k): each seed on the drawn samples; one matrix-vector product per seed (a (replicates, n) x
    # (n, k) matrix product is many times slower with a multi-threaded BLAS on a busy machine).
    acc_a = np.stack([counts @ row for row in fa], axis=1) / n
    acc_b = np.stack([counts @ row for row in fb], axis=1) / n
    rows = np.arange(len(sa))[:, None]
    old = acc_a[rows, sa].mean(axis=1) - acc_b[rows, sb].mean(axis=1)
    old_low, old_high = percentile_interval(old, CONFIDENCE)
    return {"seed_t": (low, high), "seed_bootstrap": (float(old_low), float(old_high))}


@cache
def _coverage(cfg: Config) -> dict[str, float]:
    """Share of the configuration's experiments whose interval contains the true gain, per method.

    The bootstrap draws come from one ``rng.integers`` call per array (not `bootstrap_draws`' replicate-by-
    replicate stream, which is slow in Python on 2,000 samples x 200 replicates x 900 experiments): different
    random numbers, the same distribution; both methods use the same sample draws.
    """
    truth = cfg.mu_a - cfg.mu_b
    hits = {"seed_t": 0, "seed_bootstrap": 0}
    for e in range(EXPERIMENTS):
        ca, cb = _simulate(cfg, e)
        rng = np.random.default_rng([_cfg_seed(cfg), e, 1])
        idx = rng.integers(0, N_TEST, (N_BOOTSTRAP, N_TEST))
        sa, sb = rng.integers(0, cfg.seeds, (2, N_BOOTSTRAP, cfg.seeds))
        for method, (low, high) in _intervals(ca, cb, idx, idx, sa, sb).items():
            hits[method] += low <= truth <= high
    return {m: h / EXPERIMENTS for m, h in hits.items()}


def _mc_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def _labels(correct: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Predicted labels with the given correctness: a wrong prediction is one of the other 9 classes."""
    wrong = (y[None, :] + rng.integers(1, N_CLASSES, correct.shape)) % N_CLASSES
    return np.where(correct, y[None, :], wrong)


@pytest.mark.parametrize("e", [0, 1, 2])
def test_the_fast_path_is_paired_bootstrap_gain(e):
    """Given the library's bootstrap draws, the simulation's vectorised intervals are the library's, for both
    methods (up to float rounding: a matrix product sums in another order)."""
    cfg = CONFIGS[0]
    ca, cb = _simulate(cfg, e)
    rng = np.random.default_rng(e)
    y = rng.integers(0, N_CLASSES, N_TEST)
    a, b = _labels(ca, y, rng), _labels(cb, y, rng)
    (idx_new,) = next(bootstrap_draws(N_BOOTSTRAP, (N_TEST,), seed=e))
    idx_old, sa, sb = next(bootstrap_draws(N_BOOTSTRAP, (N_TEST, cfg.seeds, cfg.seeds), seed=e))
    fast = _intervals(ca, cb, idx_new, idx_old, sa, sb)
    for method in ("seed_t", "seed_bootstrap"):
        g = paired_bootstrap_gain(y, a, b, n_bootstrap=N_BOOTSTRAP, confidence=CONFIDENCE, seed=e, method=method)
        assert (g["ci_low"], g["ci_high"]) == pytest.approx(fast[method], abs=1e-12), method


def test_new_interval_covers_the_true_gain():
    cov = {cfg.name: _coverage(cfg)["seed_t"] for cfg in CONFIGS}
    pooled = float(np.mean(list(cov.values())))
    n_all = EXPERIMENTS * len(CONFIGS)
    assert pooled >= CONFIDENCE - 2 * _mc_se(CONFIDENCE, n_all) - 1e-12 and pooled >= 0.93, cov
    floor = CONFIDENCE - 3 * _mc_se(CONFIDENCE, EXPERIMENTS)
    assert all(c >= floor for c in cov.values()), (floor, cov)


def test_a_null_change_is_rarely_called_beyond_noise():
    """`transferlab review`'s rule: "beyond noise" when the interval excludes 0. With the same recipe on both
    sides (true gain 0) that is a false alarm, and should happen at most 5% of the time."""
    nulls = [cfg for cfg in CONFIGS if cfg.null]
    alarms = {cfg.name: 1.0 - _coverage(cfg)["seed_t"] for cfg in nulls}
    pooled = float(np.mean(list(alarms.values())))
    n_all = EXPERIMENTS * len(nulls)
    assert pooled <= 0.05 + 2 * _mc_se(0.05, n_all), alarms
    assert all(a <= 0.05 + 3 * _mc_se(0.05, EXPERIMENTS) for a in alarms.values()), alarms


def test_the_old_seed_bootstrap_under_covers():
    """The bug this method fixes, measured in the same simulation: resampling 2 seeds per side makes each
    side's mean a single seed in half the draws. If this fails, the simulation can no longer tell the methods
    apart and the two tests above prove nothing."""
    lora_k2 = [cfg for cfg in CONFIGS if cfg.seeds == 2 and cfg.sd_a == 0.02]  # lora vs scratch, lora vs lora
    old = float(np.mean([_coverage(cfg)["seed_bootstrap"] for cfg in lora_k2]))
    new = float(np.mean([_coverage(cfg)["seed_t"] for cfg in lora_k2]))
    # Three Monte-Carlo standard errors below 95%: not noise.
    assert old < CONFIDENCE - 3 * _mc_se(CONFIDENCE, EXPERIMENTS * len(lora_k2)) < new, (old, new)
    null = next(cfg for cfg in lora_k2 if cfg.null)
    assert 1.0 - _coverage(null)["seed_bootstrap"] > 0.05 + 3 * _mc_se(0.05, EXPERIMENTS)

"""The bootstrap's resampling, once for every layer: the index draws (`bootstrap_draws`) and the percentile
interval (`percentile_interval`).

`evaluation.stats.paired_bootstrap_gain` (the gain of one model over another: summary.json, the diagnosis,
`transferlab review`) and `scoring.agreement.bootstrap_accuracies` (the achieved accuracies a ranking is
checked against) resample with these. They sit in `core` because scoring and evaluation are siblings that
may not import each other.

Each replicate draws, in a fixed order, one set of indices per axis (test samples, training seeds, ...) from
one seeded numpy generator, so a result depends only on the seed and the sizes: the order of the axes is
part of the stream, and changing it changes every interval.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Upper bound on the elements of one block of draws a caller materialises (int64: 32 MB).
BLOCK_ELEMENTS = 4_000_000


def bootstrap_draws(
    n_bootstrap: int, sizes: Sequence[int], *, seed: int, block: int | None = None
) -> Iterator[tuple[np.ndarray, ...]]:
    """Bootstrap index draws, a block of replicates at a time.

    For each replicate, in order, and for each axis of `sizes` in order, `size` indices are drawn with
    replacement from ``range(size)`` by ``rng.integers(0, size, size)`` on one ``np.random.default_rng(seed)``.
    An axis of size 1 always draws index 0, and numpy consumes no state for a one-value range, so adding a
    one-element axis (a model with a single training seed) leaves the other axes' draws unchanged.

    Args:
        n_bootstrap: replicates (>= 1).
        sizes: the length of each resampled axis (each >= 1), in drawing order.
        seed: the generator's seed.
        block: replicates per yielded block (default: as many as fit `BLOCK_ELEMENTS` int64 indices).

    Yields:
        One tuple per block: for each axis, an int64 array ``(replicates in the block, size)``.

    Raises:
        ValueError: n_bootstrap, a size or block below 1.
    """
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"every resampled axis needs at least one element, got sizes {sizes}")
    if block is None:
        block = max(1, BLOCK_ELEMENTS // max(1, sum(sizes)))
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    rng = np.random.default_rng(seed)
    for start in range(0, int(n_bootstrap), block):
        m = min(block, int(n_bootstrap) - start)
        out = tuple(np.empty((m, s), dtype=np.int64) for s in sizes)
        for i in range(m):
            for arr, s in zip(out, sizes, strict=True):
                arr[i] = rng.integers(0, s, s)
        yield out


def percentile_interval(values: np.ndarray, confidence: float, axis: int | None = None) -> tuple[Any, Any]:
    """The two-sided percentile interval of bootstrap replicates (Efron & Tibshirani 1993, ch. 13).

    Args:
        values: the replicates.
        confidence: coverage, in (0, 1).
        axis: the replicates' axis (None: all values).

    Returns:
        (low, high): numpy's default (linear) quantiles at (1 - confidence) / 2 and 1 - (1 - confidence) / 2;
        floats, or arrays when `axis` leaves other axes.

    Raises:
        ValueError: confidence outside (0, 1).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - float(confidence)
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0], axis=axis)
    return low, high

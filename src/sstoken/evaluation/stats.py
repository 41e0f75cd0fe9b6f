"""Paired statistics for comparing training methods: the mean difference and its bootstrap interval over seeds and
held-out items, shared by ``sstoken compare`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence


def paired_bootstrap(method: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], iters: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference (method − reference) and its 95% interval, resampling seeds and items.

    Both are [seed][item] arrays over the same items; a method without seeds (the untuned base model) is one
    row, paired with every seed of the reference.
    """
    import numpy as np

    a = np.asarray(method, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = np.repeat(a, b.shape[0], axis=0)
    diff = a - b
    rng = np.random.default_rng(seed)
    n_seeds, n_items = diff.shape
    samples = np.empty(iters)
    for i in range(iters):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_items, n_items)
        samples[i] = np.nanmean(diff[np.ix_(rows, cols)])
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(np.nanmean(diff)), float(low), float(high)

"""Paired statistics for comparing training methods: the mean difference and its bootstrap interval over seeds and
held-out items, shared by ``sstoken compare`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence


def _paired_arrays(method: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]):
    """(method, reference) as [seed][item] float arrays; a method without seeds (one row, the untuned base model) is
    repeated for every seed of the reference."""
    import numpy as np

    a, b = np.asarray(method, dtype=float), np.asarray(reference, dtype=float)
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = np.repeat(a, b.shape[0], axis=0)
    return a, b


def paired_bootstrap(method: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], iters: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference (method − reference) and its 95% interval, resampling seeds and items.

    Both are [seed][item] arrays over the same items; a method without seeds (the untuned base model) is one
    row, paired with every seed of the reference.
    """
    import numpy as np

    a, b = _paired_arrays(method, reference)
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


def paired_bootstrap_average(method: Mapping[str, Sequence[Sequence[float]]],
                             reference: Mapping[str, Sequence[Sequence[float]]], iters: int = 2000,
                             seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference of the average over tasks, and its 95% interval, resampling seeds and, within each
    task, items. Both map a task to a [seed][item] array; a seedless method is paired as in :func:`paired_bootstrap`.
    """
    import numpy as np

    tasks = list(reference)
    a, b = {}, {}
    for t in tasks:
        a[t], b[t] = _paired_arrays(method[t], reference[t])
    n_seeds = b[tasks[0]].shape[0]
    # NaN items (unscored) are left out, as in paired_bootstrap.
    point = float(np.mean([np.nanmean(a[t] - b[t]) for t in tasks]))
    rng = np.random.default_rng(seed)
    samples = np.empty(iters)
    for i in range(iters):
        s = rng.integers(0, n_seeds, n_seeds)
        per_task = []
        for t in tasks:
            n_items = a[t].shape[1]
            j = rng.integers(0, n_items, n_items)
            per_task.append(np.nanmean(a[t][np.ix_(s, j)] - b[t][np.ix_(s, j)]))
        samples[i] = np.mean(per_task)
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return point, float(low), float(high)


def compare_runs(results: Sequence[Mapping], baseline: str, tasks: Sequence[str] = (),
                 order: Sequence[str] | None = None, seedless: Collection[str] = ()) -> dict[str, dict]:
    """Per method, from one result per (method, seed): the mean and spread over seeds, and the paired difference
    from ``baseline`` with its 95% bootstrap interval over seeds and held-out items.

    A result is ``{"method", "seed", "eval": {"held_out_nll": [one value per held-out row], "tasks": {task:
    {"score", "items": [one value per item]}}}}``; every result scores the same rows and items, in the same order.
    Seed s of a method is paired with seed s of the baseline (same data order and initialisation), over the seeds
    both have; a ``seedless`` method (the untuned base model: one result) is paired with every seed of the baseline.

    Returns, per method in ``order`` (default: as first seen): ``seeds``; ``held_out_nll`` (``mean`` and ``std``
    over seeds of the per-seed mean, and that ``per_seed`` mean); for each of ``tasks`` the score's ``mean`` and
    ``std``, and their ``average``; and, for every method but the baseline when the baseline was run, ``delta``:
    for the held-out NLL, each task and the task average, ``mean`` (method − baseline), ``ci95`` and ``per_seed``
    (the mean paired difference of each paired seed).
    """
    import numpy as np

    by_method: dict[str, list[Mapping]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    for runs in by_method.values():
        runs.sort(key=lambda r: r["seed"])
    reference_runs = by_method.get(baseline)
    names = [m for m in (order if order is not None else by_method) if m in by_method]
    summary = {}
    for method in names:
        runs = by_method[method]
        reference = reference_runs or []
        if reference_runs is not None and method not in seedless:
            seeds = {r["seed"] for r in runs} & {r["seed"] for r in reference_runs}
            runs = [r for r in runs if r["seed"] in seeds]
            reference = [r for r in reference_runs if r["seed"] in seeds]
        nlls = [float(np.nanmean(r["eval"]["held_out_nll"])) for r in runs]
        entry = {"seeds": [r["seed"] for r in runs],
                 "held_out_nll": {"mean": float(np.mean(nlls)), "std": float(np.std(nlls)), "per_seed": nlls}}
        if tasks:
            entry["tasks"] = {}
            for task in tasks:
                per_seed = [r["eval"]["tasks"][task]["score"] for r in runs]
                entry["tasks"][task] = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed))}
            averages = [np.mean([r["eval"]["tasks"][t]["score"] for t in tasks]) for r in runs]
            entry["average"] = {"mean": float(np.mean(averages)), "std": float(np.std(averages))}
        if reference and method != baseline:
            entry["delta"] = _paired_deltas(runs, reference, tasks)
        summary[method] = entry
    return summary


def _paired_deltas(runs: Sequence[Mapping], reference: Sequence[Mapping], tasks: Sequence[str]) -> dict[str, dict]:
    """:func:`compare_runs`' ``delta`` of one method: runs and reference sorted by seed, paired seed by seed."""
    import numpy as np

    def scores(key):  # (method, reference) as [seed][item] lists
        return [key(r["eval"]) for r in runs], [key(r["eval"]) for r in reference]

    def per_seed(method, ref):
        a, b = _paired_arrays(method, ref)
        return np.nanmean(a - b, axis=1)

    by_task = {t: scores(lambda e, t=t: e["tasks"][t]["items"]) for t in tasks}
    delta = {t: (*paired_bootstrap(*by_task[t]), per_seed(*by_task[t])) for t in tasks}
    if tasks:
        average = paired_bootstrap_average({t: m for t, (m, _) in by_task.items()},
                                           {t: r for t, (_, r) in by_task.items()})
        delta["average"] = (*average, np.mean([per_seed(*by_task[t]) for t in tasks], axis=0))
    nll = scores(lambda e: e["held_out_nll"])
    delta["held_out_nll"] = (*paired_bootstrap(*nll), per_seed(*nll))
    return {key: {"mean": mean, "ci95": [low, high], "per_seed": [float(v) for v in seeds]}
            for key, (mean, low, high, seeds) in delta.items()}

"""Paired statistics shared by `sstoken compare` and the real-data benchmark, against hand-computed cases."""

from __future__ import annotations

import pytest

from sstoken.evaluation.stats import compare_runs, paired_bootstrap, paired_bootstrap_average


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    reference = [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    method = [[v + 0.25 for v in row] for row in reference]
    mean, low, high = paired_bootstrap(method, reference, iters=200)
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_paired_bootstrap_pairs_a_seedless_method_with_every_seed():
    base = [[1.0, 0.0]]
    full = [[1.0, 1.0], [0.0, 0.0]]
    mean, low, high = paired_bootstrap(base, full, iters=500)
    # Differences per (seed, item): [0, -1] and [1, 0] -> mean 0; the interval spans both signs.
    assert mean == pytest.approx(0.0)
    assert low < 0 < high


def test_resampling_seeds_widens_the_interval_that_items_alone_give():
    # Seed 0 helps by 0.5 on every item, seed 1 hurts by 0.5: one seed looks certain, two seeds do not.
    reference = [[1.0] * 8, [1.0] * 8]
    method = [[1.5] * 8, [0.5] * 8]
    _, low_one, high_one = paired_bootstrap(method[:1], reference[:1], iters=300)
    mean, low, high = paired_bootstrap(method, reference, iters=300)
    assert low_one == pytest.approx(0.5) and high_one == pytest.approx(0.5)
    assert mean == pytest.approx(0.0) and low == pytest.approx(-0.5) and high == pytest.approx(0.5)


# A resample that draws only the unscored item has no mean: numpy says so, and the percentiles skip it.
@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_average_over_tasks_of_constant_differences():
    reference = {"a": [[0.0, 1.0], [1.0, 0.0]], "b": [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]}
    method = {"a": [[0.5, 1.5], [1.5, 0.5]], "b": [[0.25] * 3, [1.25] * 3]}
    assert paired_bootstrap_average(method, reference, iters=100) == pytest.approx((0.375, 0.375, 0.375))
    # An unscored (NaN) item is left out, as paired_bootstrap leaves it out, not spread over the whole average.
    method["a"][0][0] = float("nan")
    assert paired_bootstrap_average(method, reference, iters=100) == pytest.approx((0.375, 0.375, 0.375))
    assert paired_bootstrap([[float("nan"), 1.5]], [[0.0, 1.0]], iters=50) == pytest.approx((0.5, 0.5, 0.5))


def _result(method, seed, task_items, nll):
    return {"method": method, "seed": seed,
            "eval": {"held_out_nll": nll,
                     "tasks": {t: {"metric": "acc", "score": sum(v) / len(v), "items": v}
                               for t, v in task_items.items()}}}


def test_compare_runs_means_stds_per_seed_points_and_deltas():
    results = [
        _result("sstoken", 1, {"a": [1, 1], "b": [1, 0]}, [3.0, 3.0]),
        _result("full", 0, {"a": [1, 0], "b": [0, 0]}, [2.0, 2.0]),
        _result("full", 1, {"a": [1, 1], "b": [0, 0]}, [2.0, 4.0]),
        _result("sstoken", 0, {"a": [1, 1], "b": [1, 0]}, [1.0, 1.0]),
        _result("base", 0, {"a": [0, 0], "b": [0, 0]}, [5.0, 5.0]),
    ]
    summary = compare_runs(results, "full", ["a", "b"], order=["base", "full", "sstoken"], seedless=("base",))
    assert list(summary) == ["base", "full", "sstoken"]
    assert summary["full"]["tasks"]["a"] == {"mean": 0.75, "std": 0.25}
    assert summary["sstoken"]["average"]["mean"] == pytest.approx(0.75)
    assert summary["full"]["held_out_nll"] == {"mean": 2.5, "std": 0.5, "per_seed": [2.0, 3.0]}
    assert summary["sstoken"]["seeds"] == [0, 1] and summary["sstoken"]["held_out_nll"]["per_seed"] == [1.0, 3.0]
    assert "delta" not in summary["full"]
    delta = summary["sstoken"]["delta"]
    assert delta["a"]["mean"] == pytest.approx(0.25) and delta["a"]["per_seed"] == [0.5, 0.0]
    assert delta["average"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert delta["held_out_nll"]["mean"] == pytest.approx(-0.5)
    assert delta["held_out_nll"]["per_seed"] == [-1.0, 0.0]  # seed 0: 1 - 2; seed 1: 3 - 3
    assert delta["held_out_nll"]["ci95"][0] <= -0.5 <= delta["held_out_nll"]["ci95"][1]
    # The untuned model (one result) is paired with both seeds of the baseline.
    assert summary["base"]["delta"]["average"]["mean"] == pytest.approx(-(0.75 + 0.0) / 2)
    assert summary["base"]["delta"]["held_out_nll"]["per_seed"] == [3.0, 2.0]


def test_compare_runs_pairs_only_the_seeds_both_methods_have():
    results = [_result("full", 0, {}, [1.0]), _result("full", 1, {}, [2.0]), _result("full", 2, {}, [3.0]),
               _result("random", 1, {}, [2.5]), _result("random", 2, {}, [3.5])]
    summary = compare_runs(results, "full")
    assert summary["random"]["seeds"] == [1, 2]
    assert summary["random"]["delta"]["held_out_nll"]["mean"] == pytest.approx(0.5)
    assert "tasks" not in summary["full"] and "average" not in summary["random"]["delta"]
    assert "delta" not in compare_runs(results, "dft")["random"]  # no baseline run: nothing to pair with

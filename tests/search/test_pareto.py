"""The front's dominance rule: plain Pareto dominance at zero tolerance (against a brute-force
reference), and latencies within the tolerance counted equal, without ever emptying the front."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdcompress.search.front import pareto

OBJECTIVES = ("size", "latency_b1", "latency")


def _dominated_plainly(points, i):
    p = points[i]
    return any(all(q[o] <= p[o] for o in OBJECTIVES) and any(q[o] < p[o] for o in OBJECTIVES)
               for j, q in enumerate(points) if j != i)


def _random_points(rng, n):
    # few distinct values, so ties and exact duplicates happen
    return [{o: float(rng.integers(1, 6)) for o in OBJECTIVES} for _ in range(n)]


def test_zero_tolerance_is_plain_pareto_dominance_keeping_the_first_of_equal_points():
    rng = np.random.default_rng(0)
    for _ in range(300):
        points = _random_points(rng, int(rng.integers(1, 9)))
        expected = []
        for i, p in enumerate(points):
            if _dominated_plainly(points, i):
                continue
            if any(points[j] == p for j in range(i)):  # an equal point came first
                continue
            expected.append(i)
        assert pareto(points, OBJECTIVES) == expected


def test_latencies_within_the_tolerance_count_as_equal():
    smaller_a_little_slower = {"size": 50.3, "latency_b1": 0.019, "latency": 0.307}
    larger_a_little_faster = {"size": 50.4, "latency_b1": 0.018, "latency": 0.304}
    points = [larger_a_little_faster, smaller_a_little_slower]
    # plain dominance cannot tell them apart: each is better at something
    assert pareto(points, OBJECTIVES) == [0, 1]
    # within 6% the latencies are a tie, and the smaller one dominates
    assert pareto(points, OBJECTIVES, tolerance=0.06) == [1]
    # a latency faster by more than the tolerance still keeps a point on the front
    much_faster = dict(larger_a_little_faster, latency=0.250)
    assert pareto([much_faster, smaller_a_little_slower], OBJECTIVES, tolerance=0.06) == [0, 1]
    # sizes are exact: no tolerance on them
    twice_as_large = {"size": 100.6, "latency_b1": 0.019, "latency": 0.307}
    assert pareto([twice_as_large, smaller_a_little_slower], OBJECTIVES, tolerance=0.9) == [1]
    assert pareto([{"size": 50.0, "latency": 1.0}, {"size": 50.1, "latency": 1.0}],
                  ["size", "latency"], tolerance=0.5) == [0]


def test_a_tolerant_front_is_never_empty_and_every_point_left_off_has_a_reason():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 9))
        points = [{"size": float(rng.integers(1, 4)),
                   "latency_b1": float(rng.uniform(1.0, 1.2)),
                   "latency": float(rng.uniform(1.0, 1.2))} for _ in range(n)]
        tolerance = 0.1
        kept = pareto(points, OBJECTIVES, tolerance=tolerance)
        assert kept and kept == sorted(set(kept))
        plain = pareto(points, OBJECTIVES)
        assert set(kept) <= set(plain)  # the tolerance only ever takes points off the front
        for i in set(range(n)) - set(kept):
            p = points[i]
            # a kept point is no larger, within the tolerance as fast, and strictly better once
            # (or the same point, met first)
            assert any(all(points[j][o] <= p[o] * (1 + tolerance * o.startswith("latency"))
                           for o in OBJECTIVES)
                       and (any(points[j][o] < p[o] for o in OBJECTIVES) or points[j] == p)
                       for j in kept)


def test_a_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance must be >= 0, but got -0.1"):
        pareto([{"size": 1.0}], ["size"], tolerance=-0.1)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_tolerant_front_does_not_depend_on_the_order_of_the_trials(order):
    points = [{"size": 1.0, "latency": 1.04}, {"size": 2.0, "latency": 1.0},
              {"size": 3.0, "latency": 0.5}]
    shuffled = [points[i] for i in order]
    kept = {order[i] for i in pareto(shuffled, ["size", "latency"], tolerance=0.05)}
    assert kept == {0, 2}

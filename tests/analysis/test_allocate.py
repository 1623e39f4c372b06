"""The budget allocator: optimal against brute force, never dominated, budget met to one step."""

from __future__ import annotations

import itertools
import random

import pytest

from kdcompress.analysis.allocate import Option, allocate, cost_range, lower_hull, pareto
from kdcompress.errors import LayerError


def _brute_force(options: dict[str, list[Option]], budget: float) -> tuple[float, float]:
    """(least total drop, its cost) over every allocation within the budget."""
    best = None
    for combo in itertools.product(*options.values()):
        cost = sum(o.cost for o in combo)
        if cost <= budget:
            drop = sum(o.drop for o in combo)
            if best is None or drop < best[0] - 1e-12:
                best = (drop, cost)
    assert best is not None
    return best


def _random_instance(rng: random.Random, layers: int, settings: int) -> dict[str, list[Option]]:
    options = {}
    for i in range(layers):
        costs = rng.sample(range(1, 200), settings)
        # a decreasing curve with noise: some options end up dominated, as measured curves do
        options[f"l{i}"] = [Option(c, c, round(max(0.0, 30 - c / 7 + rng.uniform(-6, 6)), 1))
                            for c in costs]
    return options


def _dominated(option: Option, others: list[Option]) -> bool:
    return any(o.cost <= option.cost and o.drop <= option.drop
               and (o.cost < option.cost or o.drop < option.drop) for o in others)


#: Three layers; fc1's rank 6 costs more than rank 8 would save (dominated by rank 8: more
#: parameters for a larger drop), conv's rank 3 is dominated by rank 2 (same cost, larger drop).
CONSTRUCTED = {
    "fc1": [Option(2, 100, 9.0), Option(4, 200, 3.0), Option(6, 350, 2.5), Option(8, 300, 1.0),
            Option(None, 1000, 0.0)],
    "fc2": [Option(2, 50, 1.0), Option(4, 80, 0.4), Option(None, 160, 0.0)],
    "conv": [Option(2, 60, 4.0), Option(3, 60, 5.0), Option(4, 90, 1.5), Option(None, 200, 0.0)],
}


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_constructed_example_never_picks_a_dominated_option(method: str) -> None:
    low, high = cost_range(CONSTRUCTED)
    assert (low, high) == (210, 1360)
    for budget in range(low, high + 1, 5):
        result = allocate(CONSTRUCTED, budget, method=method)
        assert result.cost <= budget
        for name, option in result.choice.items():
            assert not _dominated(option, CONSTRUCTED[name]), (budget, name, option)
        assert result.settings()["fc1"] != 6 and result.settings()["conv"] != 3


def test_constructed_example_meets_the_budget_within_one_step() -> None:
    """No single layer can move to its next (non-dominated) option and stay within budget."""
    for method in ("exact", "greedy"):
        for budget in (210, 400, 555, 700, 1000, 1360, 5000):
            result = allocate(CONSTRUCTED, budget, method=method)
            for name, option in result.choice.items():
                front = pareto(CONSTRUCTED[name])
                up = front.index(option) + 1
                if up < len(front):
                    assert result.cost - option.cost + front[up].cost > budget, (method, budget)


def test_known_optimum_of_the_constructed_example() -> None:
    # 555: fc1 rank 8 + fc2 rank 4 + conv dense costs 580, over; fc1 8 + fc2 dense + conv 4
    # (550, drop 2.5) loses to fc1 8 + fc2 2 + conv dense (550, drop 2.0)
    result = allocate(CONSTRUCTED, 555, method="exact")
    assert result.settings() == {"fc1": 8, "fc2": 2, "conv": None}
    assert (result.cost, result.drop) == (550, 2.0)
    assert result.method == "exact" and result.bound == result.drop


@pytest.mark.parametrize("seed", range(40))
def test_exact_matches_brute_force_and_greedy_is_bracketed(seed: int) -> None:
    rng = random.Random(seed)
    options = _random_instance(rng, layers=rng.randint(1, 4), settings=rng.randint(1, 5))
    low, high = cost_range(options)
    budget = rng.uniform(low, high * 1.1)
    best_drop, _ = _brute_force(options, budget)
    exact = allocate(options, budget, method="exact")
    greedy = allocate(options, budget, method="greedy")
    assert exact.cost <= budget and greedy.cost <= budget
    assert exact.drop == pytest.approx(best_drop, abs=1e-9)
    # the LP bound is below every allocation; greedy is never better than the optimum
    assert greedy.bound <= best_drop + 1e-6
    assert greedy.drop >= best_drop - 1e-9
    for result in (exact, greedy):
        for name, option in result.choice.items():
            assert not _dominated(option, options[name])


def test_auto_falls_back_to_greedy_past_max_states() -> None:
    rng = random.Random(7)
    options = _random_instance(rng, layers=6, settings=5)
    low, high = cost_range(options)
    auto = allocate(options, (low + high) / 2, max_states=3)
    assert auto.method == "greedy"
    with pytest.raises(LayerError, match="max_states=3"):
        allocate(options, (low + high) / 2, method="exact", max_states=3)
    assert allocate(options, (low + high) / 2).method == "exact"


def test_ties_in_drop_are_broken_by_tiebreak_and_use_the_budget() -> None:
    """Equal measured drops: the lower reconstruction error (tiebreak) wins, budget permitting."""
    options = {"a": [Option(1, 10, 0.0, tiebreak=0.5), Option(2, 20, 0.0, tiebreak=0.2),
                     Option(3, 30, 0.0, tiebreak=0.1)],
               "b": [Option(1, 10, 0.0, tiebreak=0.9), Option(2, 20, 0.0, tiebreak=0.1)]}
    for method in ("exact", "greedy"):
        assert allocate(options, 40, method=method).settings() == {"a": 2, "b": 2}
        assert allocate(options, 50, method=method).settings() == {"a": 3, "b": 2}


def test_lower_hull_is_convex_and_skips_dominated_points() -> None:
    points = [Option(i, c, d) for i, (c, d) in enumerate(
        [(1, 10.0), (2, 7.0), (3, 6.5), (4, 3.0), (5, 2.9), (6, 3.5), (8, 0.0)])]
    hull = lower_hull(points)
    assert [o.setting for o in hull] == [0, 1, 3, 6]
    slopes = [(a.drop - b.drop) / (b.cost - a.cost)
              for a, b in zip(hull[:-1], hull[1:], strict=True)]
    assert slopes == sorted(slopes, reverse=True)


def test_errors_name_the_budget_and_the_reachable_range() -> None:
    with pytest.raises(LayerError, match=r"budget of 100 is below .*reachable range 210 to 1360"):
        allocate(CONSTRUCTED, 100)
    with pytest.raises(LayerError, match="layer 'x' has no option"):
        allocate({"x": []}, 10)
    with pytest.raises(LayerError, match="method must be one of"):
        allocate(CONSTRUCTED, 500, method="dp")

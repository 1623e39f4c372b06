"""Per-layer budgets: one option per layer, the total cost within a budget, the least total drop.

The problem is a multiple-choice knapsack: each layer offers options (a TT rank, a pruning
ratio) with a cost (parameters, MACs, channels kept) and a predicted accuracy drop, and the
drops of different layers are taken to add up (the sensitivity analysis measures each layer
alone). :func:`allocate` solves it

* exactly, by dynamic programming over the Pareto frontier of (cost, drop) of partial
  allocations, layer after layer, while that frontier stays below ``max_states`` entries (every
  model of this project's size: a few layers with a few dozen options each);
* otherwise greedily on the lower convex hull of each layer's curve: start from each layer's
  best option and repeatedly step down the layer whose next hull point saves cost at the least
  drop per unit saved (the order of the hull segments' slopes), until the budget is met; then
  spend what is left of the budget on the single-layer upgrades that lower the drop most. The
  fractional solution of the same greedy (the linear-programming bound of the knapsack, [1]_)
  is returned as ``bound``: no allocation can predict a smaller drop.

Neither ever picks a dominated option (one costing at least as much as another option of the
same layer for at least the same drop). Options whose drops tie (a validation subset measures
drops in steps of one sample) are told apart by ``tiebreak`` (the relative reconstruction
error of a TT layer, say), which only orders equal drops.

References
----------
.. [1] P. Sinha, A. A. Zoltners, "The Multiple-Choice Knapsack Problem", Operations Research
   27(3), 1979.

Examples
--------
>>> options = {"fc1": [Option(4, 100, 2.0), Option(8, 200, 0.5), Option(None, 900, 0.0)],
...            "fc2": [Option(4, 50, 0.3), Option(None, 300, 0.0)]}
>>> result = allocate(options, budget=450)
>>> result.settings(), result.cost, round(result.drop, 6), result.method
({'fc1': 8, 'fc2': 4}, 250, 0.8, 'exact')
>>> result = allocate(options, budget=600)
>>> result.settings(), result.cost, result.drop
({'fc1': 8, 'fc2': None}, 500, 0.5)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcompress.errors import LayerError

__all__ = ["Option", "Allocation", "allocate", "pareto", "lower_hull", "cost_range",
           "ALLOCATORS"]

log = logging.getLogger(__name__)

#: ``method`` of :func:`allocate`: ``"auto"`` is exact while the frontier stays small.
ALLOCATORS = ("auto", "exact", "greedy")
#: Weight of ``tiebreak`` next to ``drop``: far below any drop a validation subset can measure.
_TIE = 1e-9


@dataclass(frozen=True)
class Option:
    """One choice for one layer.

    Attributes
    ----------
    setting : Any
        What the caller applies (a rank, a ratio, ``None`` for "leave the layer as it is").
    cost : float
        What the choice costs (parameters, MACs, channels kept); the budget bounds their sum.
    drop : float
        Predicted accuracy drop, in points (+ = worse).
    tiebreak : float
        Orders options of equal ``drop`` (smaller is better); it never outweighs a drop.
    """

    setting: Any
    cost: float
    drop: float
    tiebreak: float = 0.0

    @property
    def value(self) -> float:
        """What the allocator minimises: the drop, ties broken by ``tiebreak``."""
        return self.drop + _TIE * self.tiebreak


@dataclass(frozen=True)
class Allocation:
    """The result of :func:`allocate`.

    Attributes
    ----------
    choice : dict of str to Option
        The chosen option of every layer, in the order the layers were given.
    cost, drop : float
        Their total cost and total predicted drop.
    budget : float
        The budget the cost had to stay within.
    method : str
        ``"exact"`` (dynamic programming) or ``"greedy"`` (convex hull).
    bound : float
        A lower bound of the total drop of any allocation within the budget (equal to ``drop``
        when the method is exact).
    """

    choice: dict[str, Option]
    cost: float
    drop: float
    budget: float
    method: str
    bound: float

    def settings(self) -> dict[str, Any]:
        """The chosen setting of every layer."""
        return {name: option.setting for name, option in self.choice.items()}


def pareto(options: Sequence[Option]) -> list[Option]:
    """The options no other option dominates, by increasing cost (and so decreasing drop).

    An option is dominated when another one costs no more and predicts no larger drop (ties on
    both: the first given is kept).

    Examples
    --------
    >>> [o.setting for o in pareto([Option("a", 1, 5.0), Option("b", 2, 6.0), Option("c", 3, 1.0)])]
    ['a', 'c']
    """
    ordered = sorted(options, key=lambda o: (o.cost, o.value))
    kept: list[Option] = []
    for option in ordered:
        if not kept or option.value < kept[-1].value:
            if kept and option.cost == kept[-1].cost:
                continue
            kept.append(option)
    return kept


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of the non-dominated options in the (cost, drop) plane.

    Along it the drop saved per unit of cost added shrinks from point to point, which is what
    makes stepping down the hull greedily sound.

    Examples
    --------
    >>> points = [Option(1, 1, 9.0), Option(2, 2, 8.5), Option(3, 3, 2.0), Option(4, 4, 0.0)]
    >>> [o.setting for o in lower_hull(points)]
    [1, 3, 4]
    """
    hull: list[Option] = []
    for option in pareto(options):
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], option) <= 0:
            hull.pop()
        hull.append(option)
    return hull


def _cross(a: Option, b: Option, c: Option) -> float:
    """> 0 when ``b`` lies strictly below the segment from ``a`` to ``c``."""
    return (b.cost - a.cost) * (c.value - a.value) - (b.value - a.value) * (c.cost - a.cost)


def cost_range(options: Mapping[str, Sequence[Option]]) -> tuple[float, float]:
    """The least and the largest total cost any allocation can have."""
    _check_options(options)
    return (sum(min(o.cost for o in opts) for opts in options.values()),
            sum(max(o.cost for o in opts) for opts in options.values()))


def allocate(options: Mapping[str, Sequence[Option]], budget: float, *, method: str = "auto",
             max_states: int = 200_000) -> Allocation:
    """Choose one option per layer, total cost within ``budget``, least total predicted drop.

    Parameters
    ----------
    options : dict of str to list of Option
        Every layer's choices; each layer needs at least one.
    budget : float
        The largest total cost allowed.
    method : {"auto", "exact", "greedy"}
        ``"exact"``: dynamic programming over the Pareto frontier (optimal; fails when the
        frontier grows past ``max_states``); ``"greedy"``: the convex-hull greedy (never
        dominated, within one hull step of the budget); ``"auto"``: exact while it fits.
    max_states : int
        Largest Pareto frontier the exact method keeps.

    Returns
    -------
    Allocation

    Raises
    ------
    LayerError
        A layer has no option, the method is unknown, or no allocation fits the budget (the
        message gives the reachable range of total costs).
    """
    if method not in ALLOCATORS:
        raise LayerError(f"allocate: method must be one of {ALLOCATORS}, but got {method!r}")
    low, high = cost_range(options)
    if budget < low:
        raise LayerError(f"allocate: a budget of {budget:g} is below the least total cost any "
                         f"allocation reaches ({low:g}; reachable range {low:g} to {high:g}): "
                         "raise the budget or offer cheaper options")
    fronts = {name: pareto(opts) for name, opts in options.items()}
    if method != "greedy":
        picks = _exact(fronts, budget, max_states)
        if picks is not None:
            result = _result(fronts, picks, budget, "exact")
            return Allocation(result.choice, result.cost, result.drop, budget, "exact",
                              result.drop)
        if method == "exact":
            raise LayerError(f"allocate: the exact method's frontier grew past max_states="
                             f"{max_states}; use method='greedy' or 'auto'")
        log.info("allocate: frontier past %d states, using the convex-hull greedy", max_states)
    return _greedy(fronts, budget)


def _check_options(options: Mapping[str, Sequence[Option]]) -> None:
    if not options:
        raise LayerError("allocate: no layer to allocate a budget to")
    for name, opts in options.items():
        if not opts:
            raise LayerError(f"allocate: layer '{name}' has no option")


def _exact(fronts: dict[str, list[Option]], budget: float, max_states: int
           ) -> tuple[int, ...] | None:
    """Index into each layer's Pareto list of the optimum, or None past ``max_states``."""
    names = list(fronts)
    # least cost of the layers still to come, so that no partial state can overrun the budget
    rest = [0.0] * (len(names) + 1)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + fronts[names[i]][0].cost
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for i, name in enumerate(names):
        grown = [(cost + o.cost, value + o.value, picks + (j,))
                 for cost, value, picks in states
                 for j, o in enumerate(fronts[name])
                 if cost + o.cost + rest[i + 1] <= budget]
        grown.sort(key=lambda s: (s[0], s[1]))
        states = []
        for state in grown:  # keep the Pareto frontier: the value falls as the cost rises
            if not states or state[1] < states[-1][1]:
                if states and state[0] == states[-1][0]:
                    continue
                states.append(state)
        if len(states) > max_states:
            return None
    return min(states, key=lambda s: (s[1], s[0]))[2]


def _result(fronts: dict[str, list[Option]], picks: Sequence[int], budget: float,
            method: str, bound: float | None = None) -> Allocation:
    choice = {name: fronts[name][j] for name, j in zip(fronts, picks, strict=True)}
    cost = sum(o.cost for o in choice.values())
    drop = sum(o.drop for o in choice.values())
    return Allocation(choice, cost, drop, budget, method, drop if bound is None else bound)


def _greedy(fronts: dict[str, list[Option]], budget: float) -> Allocation:
    hulls = {name: lower_hull(front) for name, front in fronts.items()}
    pos = {name: len(hull) - 1 for name, hull in hulls.items()}
    cost = sum(hull[-1].cost for hull in hulls.values())
    value = sum(hull[-1].value for hull in hulls.values())
    bound = value
    while cost > budget:
        slope, name = min(((_slope(hulls[n], pos[n]), n) for n in hulls if pos[n] > 0),
                          key=lambda s: s[0])
        upper, lower = hulls[name][pos[name]], hulls[name][pos[name] - 1]
        saved = upper.cost - lower.cost
        if cost - saved <= budget:  # the LP optimum takes this segment fractionally
            bound = value + (cost - budget) * slope
        cost, value = cost - saved, value + lower.value - upper.value
        pos[name] -= 1
    picks = {name: fronts[name].index(hulls[name][pos[name]]) for name in fronts}
    _spend_slack(fronts, picks, budget)
    result = _result(fronts, [picks[n] for n in fronts], budget, "greedy")
    return Allocation(result.choice, result.cost, result.drop, budget, "greedy",
                      min(bound, result.drop))


def _slope(hull: list[Option], i: int) -> float:
    """Drop added per unit of cost saved by stepping from hull point ``i`` to ``i - 1``."""
    return (hull[i - 1].value - hull[i].value) / (hull[i].cost - hull[i - 1].cost)


def _spend_slack(fronts: dict[str, list[Option]], picks: dict[str, int], budget: float) -> None:
    """Upgrade single layers (any Pareto option) while the budget allows, best gain first."""
    cost = sum(fronts[n][j].cost for n, j in picks.items())
    while True:
        best: tuple[float, str, int] | None = None
        for name, front in fronts.items():
            here = front[picks[name]]
            for j in range(picks[name] + 1, len(front)):
                if cost + front[j].cost - here.cost > budget:
                    break
                gain = here.value - front[j].value
                if best is None or gain > best[0]:
                    best = (gain, name, j)
        if best is None:
            return
        _, name, j = best
        cost += fronts[name][j].cost - fronts[name][picks[name]].cost
        picks[name] = j

"""Drawing a pipeline's DAG so that every edge can be seen.

Stages sit in columns by topological generation. An edge between neighbouring columns is a
straight arrow; an edge that skips columns (the teacher feeding a distillation three stages on)
is drawn as an arc, bent away from the straight line that the chain in between occupies, and
bent further the more columns it skips, so no arrow hides under another. Node labels are boxes
sized to their text.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np

__all__ = ["layout", "draw"]


def layout(g: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], dict[tuple[str, str], float]]:
    """Positions of the nodes and the curvature of each edge (0 for a straight arrow).

    Curvature follows matplotlib's ``arc3`` convention: the control point of a quadratic Bezier
    is offset from the edge's midpoint by ``rad`` times its length.
    """
    pos: dict[str, tuple[float, float]] = {}
    for column, nodes in enumerate(nx.topological_generations(g)):
        nodes = sorted(nodes, key=lambda n: g.nodes[n].get("index", 0))
        for row, node in enumerate(nodes):
            pos[node] = (float(column), (len(nodes) - 1) / 2 - row)
    rads: dict[tuple[str, str], float] = {}
    bend = 1
    for a, b in sorted(g.edges, key=lambda e: (pos[e[0]][0], pos[e[1]][0])):
        rad = 0.0
        if _blocked(pos, a, b, 0.0):
            # the smallest arc that clears every other node, on the preferred side first
            tries = [side * 0.12 * step for step in range(1, 25) for side in (bend, -bend)]
            rad = next((r for r in tries if not _blocked(pos, a, b, r)), tries[-2])
            bend = -1 if rad > 0 else 1  # the next skip bends the other way
        rads[(a, b)] = rad
    return pos, rads


def _curve(p: np.ndarray, q: np.ndarray, rad: float, n: int = 40) -> np.ndarray:
    mid = (p + q) / 2
    d = q - p
    control = mid + rad * np.array([d[1], -d[0]])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p + 2 * (1 - t) * t * control + t ** 2 * q


#: Half the width and height around a node's centre that an edge must not cross (data units;
#: columns are 1 apart, and a label box is about 0.7 wide and 0.4 high).
CLEARANCE = (0.45, 0.32)


def _blocked(pos: dict[str, tuple[float, float]], a: str, b: str, rad: float) -> bool:
    """Whether the edge a->b drawn with ``rad`` crosses another node's box."""
    curve = _curve(np.array(pos[a]), np.array(pos[b]), rad, n=200)
    for node, (x, y) in pos.items():
        if node in (a, b):
            continue
        if np.any((np.abs(curve[:, 0] - x) < CLEARANCE[0])
                  & (np.abs(curve[:, 1] - y) < CLEARANCE[1])):
            return True
    return False


def draw(g: nx.DiGraph, path: str | Path) -> None:
    """Draw the DAG into an image file (PNG, SVG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos, rads = layout(g)
    columns = 1 + max((x for x, _ in pos.values()), default=0)
    height = max([abs(y) for _, y in pos.values()] + [abs(r) for r in rads.values()] + [0.5])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * columns), 2.0 + 2.4 * height))
    xs = [x for x, _ in pos.values()]
    ys = [y for _, y in pos.values()]
    ys += [y for (a, b), rad in rads.items()
           for y in _curve(np.array(pos[a]), np.array(pos[b]), rad)[:, 1]]
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
    ax.axis("off")
    boxes = {node: ax.text(x, y, f"{node}\n{g.nodes[node].get('function', '')}", ha="center",
                           va="center", fontsize=9, zorder=3,
                           bbox={"boxstyle": "round,pad=0.4", "fc": "#dbe9f6", "ec": "#4a6f94"})
             for node, (x, y) in pos.items()}
    fig.canvas.draw()  # lay the boxes out: each arrow is cut where it enters and leaves them
    to_data = ax.transData.inverted()
    extents = {n: to_data.transform(t.get_bbox_patch().get_window_extent().get_points())
               for n, t in boxes.items()}
    for (a, b), rad in rads.items():
        curve = _curve(np.array(pos[a]), np.array(pos[b]), rad, n=200)
        outside = ~(_inside(curve, extents[a]) | _inside(curve, extents[b]))
        if outside.sum() < 2:
            continue  # boxes touch: nothing to draw between them
        part = curve[outside]
        ax.plot(part[:, 0], part[:, 1], color="#4a6f94", lw=1.2, zorder=2)
        ax.annotate("", xy=part[-1], xytext=part[-2], zorder=2,
                    arrowprops={"arrowstyle": "-|>", "color": "#4a6f94", "lw": 1.2,
                                "shrinkA": 0, "shrinkB": 0, "mutation_scale": 14})
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _inside(points: np.ndarray, box: np.ndarray, pad: float = 0.02) -> np.ndarray:
    (x0, y0), (x1, y1) = box
    return ((points[:, 0] >= x0 - pad) & (points[:, 0] <= x1 + pad)
            & (points[:, 1] >= y0 - pad) & (points[:, 1] <= y1 + pad))

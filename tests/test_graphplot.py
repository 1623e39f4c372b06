"""The DAG drawing: no arrow runs under another stage's box or over another arrow."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from kdcompress.graphplot import CLEARANCE, _curve, draw, layout


def flagship() -> nx.DiGraph:
    g = nx.DiGraph()
    chain = ["teacher", "student", "student_kd", "pruned", "fp32", "int8"]
    for i, n in enumerate(chain):
        g.add_node(n, function="f", index=i)
    g.add_edges_from(zip(chain, chain[1:], strict=False))
    g.add_edges_from([("teacher", "student_kd"), ("teacher", "pruned")])
    return g


def diamond_with_skips() -> nx.DiGraph:
    g = nx.DiGraph()
    for i, n in enumerate("abcdef"):
        g.add_node(n, function="f", index=i)
    g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e"), ("e", "f"),
                      ("a", "e"), ("a", "f"), ("b", "f")])
    return g


@pytest.mark.parametrize("graph", [flagship, diamond_with_skips])
def test_no_edge_crosses_another_stage(graph):
    g = graph()
    pos, rads = layout(g)
    assert set(rads) == set(g.edges)
    for (a, b), rad in rads.items():
        curve = _curve(np.array(pos[a]), np.array(pos[b]), rad, n=400)
        for node, (x, y) in pos.items():
            if node not in (a, b):
                hits = (np.abs(curve[:, 0] - x) < CLEARANCE[0]) & \
                       (np.abs(curve[:, 1] - y) < CLEARANCE[1])
                assert not hits.any(), f"{a}->{b} runs under {node}"


def test_edges_that_skip_stages_are_arcs_on_alternating_sides():
    pos, rads = layout(flagship())
    assert rads[("teacher", "student")] == 0.0
    skips = [rads[("teacher", "student_kd")], rads[("teacher", "pruned")]]
    assert all(r != 0 for r in skips) and skips[0] * skips[1] < 0  # one above, one below
    curves = [_curve(np.array(pos["teacher"]), np.array(pos[b]), rads[("teacher", b)])
              for b in ("student_kd", "pruned")]
    assert min(c[:, 1].min() for c in curves) < -CLEARANCE[1]
    assert max(c[:, 1].max() for c in curves) > CLEARANCE[1]


def test_draw_writes_an_image(tmp_path):
    draw(flagship(), tmp_path / "dag.png")
    assert (tmp_path / "dag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

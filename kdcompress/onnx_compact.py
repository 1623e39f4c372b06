"""Smaller ONNX files for the same computation: what ``quantize_onnx(compact=True)`` writes.

The int8 graph of a small model is mostly not weights. In the QDQ graph of the pruned TT
MobileNet of ``benchmarks/recipes_mnist.py`` the int8 weights are 13.7 KB of a 126 KB file: every
output channel also carries a float32 weight scale, an int8 weight zero point, an int32 bias, a
float32 bias scale and an int32 bias zero point (17 bytes), and each of the 325 nodes a name of
30-50 characters and five Conv attributes spelling out their defaults. :func:`compact_graph`
removes what the computation does not need:

* tensor names become a few hexadecimal digits (the graph's inputs and outputs keep theirs),
  in ``value_info`` too: the shapes it holds stay, because ONNX Runtime needs some of them to
  fuse (without them a ViT's int8 graph lost a ``SkipLayerNormalization``);
* nodes not in ``keep_names`` lose their names: the quantizer's own ``QuantizeLinear`` /
  ``DequantizeLinear`` nodes, whose names only repeat their tensor's;
* the zero point of a ``DequantizeLinear`` of a constant (a weight or a bias) is dropped when it
  is all zeros (symmetric int8 weights, int32 biases) and the node feeds only ops in
  :data:`ZERO_POINT_FREE_CONSUMERS` -- ONNX's default zero point is 0. Measured with ONNX Runtime
  1.32: the graph it builds at load time (fused ``QLinearConv``, ``QLinearMatMul``...) is the
  same op for op with or without these zero points for Conv, MatMul and Add, but not for Gemm
  (it then stays fp32), so Gemm keeps them;
* Conv attributes equal to ONNX's defaults (``auto_pad="NOTSET"``, ``group=1``, strides and
  dilations of 1, zero pads) are dropped.

That graph: 126,225 -> 56,340 bytes, outputs bit-identical. Written by hand:
onnxslim and onnxoptimizer simplify graphs but keep names, zero points and attributes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

from kdcompress.errors import StageError

__all__ = ["compact_graph", "refuse_control_flow", "ZERO_POINT_FREE_CONSUMERS"]

#: Ops whose ``DequantizeLinear`` inputs may lose an all-zero constant zero point without
#: changing what ONNX Runtime fuses them into (Gemm is not among them: see the module docstring).
ZERO_POINT_FREE_CONSUMERS = frozenset({"Conv", "MatMul", "Add"})

_CONV_DEFAULTS = {
    "auto_pad": lambda v: v == b"NOTSET",
    "group": lambda v: v == 1,
    "strides": lambda v: all(x == 1 for x in v),
    "dilations": lambda v: all(x == 1 for x in v),
    "pads": lambda v: not any(v),
}


def refuse_control_flow(graph: Any, path: Path) -> None:
    """Refuse a graph whose nodes carry subgraphs (If/Loop/Scan): they read outer names.

    Raises
    ------
    StageError
        Names the file and the ops.
    """
    ops = sorted({node.op_type for node in graph.node
                  if any(a.g.node or a.graphs for a in node.attribute)})
    if ops:
        raise StageError(f"compact: {path.name} has control flow ({', '.join(ops)}), whose "
                         "subgraphs read outer names; leave compact off for this graph")


def compact_graph(path: str | Path, keep_names: Collection[str] = ()) -> dict[str, int]:
    """Rewrite the ONNX file ``path`` in place in the compact form described above.

    Parameters
    ----------
    path : path
        The ONNX file.
    keep_names : collection of str
        Node names to keep (``quantize_onnx`` passes the fp32 parent's, so that the compute
        nodes keep the names that ``max_drop``'s records and the exporter gave them); other
        nodes are left unnamed.

    Returns
    -------
    dict
        ``bytes_before``, ``bytes_after``, and how many zero-point tensors (``zero_points``)
        and Conv attributes (``attributes``) were dropped.

    Raises
    ------
    StageError
        The graph has control flow (:func:`refuse_control_flow`).
    """
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    before = path.stat().st_size
    proto = onnx.load(str(path))
    graph = proto.graph
    refuse_control_flow(graph, path)
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, set[str]] = defaultdict(set)
    for node in graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)

    dropped: set[str] = set()
    attributes = 0
    keep = set(keep_names)
    for node in graph.node:
        if node.name not in keep:
            node.name = ""
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3
                and node.input[0] in initializers and node.input[2] in initializers
                and consumers[node.output[0]] <= ZERO_POINT_FREE_CONSUMERS
                and not numpy_helper.to_array(initializers[node.input[2]]).any()):
            dropped.add(node.input[2])
            del node.input[2]
        if node.op_type == "Conv":
            kept = [a for a in node.attribute if not (
                a.name in _CONV_DEFAULTS
                and _CONV_DEFAULTS[a.name](helper.get_attribute_value(a)))]
            attributes += len(node.attribute) - len(kept)
            del node.attribute[:]
            node.attribute.extend(kept)

    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name in dropped - used]:
        graph.initializer.remove(tensor)

    io_names = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if name in io_names else names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"bytes_before": before, "bytes_after": path.stat().st_size,
            "zero_points": len(dropped), "attributes": attributes}

"""The ``quantize_onnx`` stage: int8 ONNX graphs with ONNX Runtime's quantization tools.

Two modes, picked by what runs fast on a CPU:

* ``static`` -- QDQ format, signed int8 activations and weights (S8S8), per-channel weights,
  activation ranges calibrated on training samples. ONNX Runtime fuses each
  ``DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear`` group into an int8 kernel, which uses
  VNNI / AMX instructions where the CPU has them. The right choice for convolutions.
* ``dynamic`` -- weights of MatMul/Gemm stored in int8, activation ranges computed on the fly
  per batch. No calibration. Convolutions are left in fp32: dynamic quantization of Conv
  (``ConvInteger``) ran 2.4-11x *slower* than fp32 on the CPUs we measured.
* ``auto`` -- ``static`` if the graph has a Conv, else ``dynamic``.

Convolutions with a tiny reduction (``C_in * kh * kw < 32``, typically the first layer on
grey-scale or RGB images) are a special case: int8 kernels pad that dimension, and whether the
int8 version beats fp32 depends on the layer's width (measured here: 1.7x slower with 16 output
channels, 7% faster with 32). ``static`` mode therefore builds the graph both ways, times them side
by side, and keeps the faster one (``kept_fp32`` in the report). Calibration and this timing use
training inputs (``Task.calibration``); the test split is never read here.

``max_drop=POINTS`` bounds the validation accuracy int8 may cost: when the full int8 graph loses
more than that against its fp32 parent, compute nodes go back to fp32 (``nodes_to_exclude``) one
at a time, the node whose int8 alone costs the most validation accuracy first
(:mod:`kdcompress.analysis.int8`), each step re-scored, until the graph is within budget. All the
graphs share one calibration (:class:`Int8Graphs`). A node left in fp32 whose input comes from a
``DequantizeLinear`` gets a single-input ``Sum`` in front of it (:func:`keep_fp32`): without it
ONNX Runtime quantizes such a node anyway when it loads the graph (its ``WeightBiasQuantization``
optimisation, with a per-tensor weight scale). The fp32, full int8 and reverted graphs are then
timed side by side, and the stage warns when the reverted graph keeps less than 80% of full
int8's speed-up.

``reduce_range`` stores weights in 7 bits instead of 8. On x86-64 CPUs without VNNI/AMX, ONNX
Runtime's int8 kernels add pairs of uint8 x int8 products in 16-bit registers
(``vpmaddubsw``), which saturate with full 8-bit weights: measured here (AVX2, no VNNI) the logits
of a small MLP and CNN were 16-17% off (relative L2) in both modes, against 1.2-1.9% with 7-bit
weights. ``"auto"`` (default) turns it on exactly there, from ``/proc/cpuinfo``
(``details.reduce_range`` and ``reduce_range_reason``); quantize on the kind of CPU that will
serve the model, or set it yourself.

ONNX Runtime's quantizer logs through the root logger (``WARNING:root:...``) and prints
calibration progress; while it runs, all of that goes to the report as ``quantizer_log`` instead
of the terminal, and the lines that mean a part of the graph was not quantized as asked become
warnings of the stage.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext, resolve_context, stage_metric
from kdcompress.data import Task
from kdcompress.declare import Choice, Float, Int, check_arguments, stage
from kdcompress.errors import StageError
from kdcompress.metrics import MeasureConfig, latency_side_by_side, time_calls
from kdcompress.onnx_compact import compact_graph, refuse_control_flow
from kdcompress.scoring import Metric, MetricLike

__all__ = ["quantize_onnx", "Int8Graphs", "keep_fp32", "QuantizerLog", "explain_slow_int8",
           "int8_reduce_range",
           "slow_int8_reasons", "quantized_nodes", "small_convs", "cpu_int8_features",
           "QUANTIZE_MODES", "CALIBRATION_METHODS"]

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("static", "dynamic", "auto", "none")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
GRAPH_FILE = "model.onnx"
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_DYNAMIC_OPS = ("MatMul", "Gemm")
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_CALIBRATION_BATCH = 64
_MIN_CONV_REDUCTION = 32  # C_in * kh * kw below this: int8 may lose to fp32; timed
_SPEEDUP_KEPT = 0.8  # a reverted graph keeping less of full int8's speed-up is flagged
_LOG_LIMIT = 100  # quantizer_log keeps this many lines, then counts the rest
#: Quantizer messages that mean part of the graph is not quantized as asked: they become warnings.
_LOG_MATTERS = ("not quantized", "skip to quantize", "failed", "exceeds the range",
                "already quantized")


@stage(role="quantize", checks={
    "mode": Choice(QUANTIZE_MODES),
    "calibration": Choice(CALIBRATION_METHODS),
    "samples": Int(min=1),
    "per_channel": Choice([True, False]),
    "max_drop": Float(ge=0, optional=True),
    "reduce_range": Choice(["auto", True, False]),
    "compact": Choice([True, False]),
})
def quantize_onnx(
    model: OnnxModel, *, mode: str = "static", calibration: str = "minmax", samples: int = 256,
    per_channel: bool = True, max_drop: float | None = None,
    reduce_range: bool | str = "auto", compact: bool = False,
    metric: MetricLike | None = None, data: Task | None = None,
    ctx: StageContext | None = None,
) -> OnnxModel:
    """Quantize an fp32 ONNX graph to int8 with ONNX Runtime.

    Parameters
    ----------
    model : OnnxModel
        The fp32 graph (the output of ``export_onnx``); it is read, never changed.
    mode : {"static", "dynamic", "auto", "none"}
        See the module docstring; ``auto`` picks ``static`` when the graph has convolutions.
        ``none`` quantizes nothing: the result is a copy of ``model``, so that a search
        parameter (``mode=ks.choice(["static", "none"])``) can weigh int8 against the fp32
        graph on measured latency and accuracy. The other settings are then unused, and
        ``max_drop`` is met by construction.
    calibration : {"minmax", "entropy", "percentile"}
        How ``static`` mode turns observed activations into int8 ranges.
    samples : int
        Number of training inputs (>= 1) used for calibration (``static`` mode).
    per_channel : bool
        One scale per output channel of each weight (more accurate, as fast).
    max_drop : float, optional
        Validation accuracy, in points, the int8 graph may lose against ``model``. When full
        int8 loses more, compute nodes go back to fp32 one at a time, the one whose int8 alone
        costs the most validation accuracy first (:func:`kdcompress.analysis.int8.node_costs`),
        until the graph is within ``max_drop``; no further. ``None`` (default): quantize every
        node, whatever it costs.
    reduce_range : {"auto", True, False}
        7-bit weights (see the module docstring). ``"auto"``: on x86-64 CPUs without VNNI/AMX,
        where 8-bit weights saturate ONNX Runtime's int8 kernels.
    compact : bool
        Write the smallest file for the same computation (:func:`kdcompress.onnx_compact.
        compact_graph`): short tensor names, unnamed quantizer nodes, no
        all-zero zero points of weights and biases, no Conv attributes at their defaults. A
        small model's int8 file is mostly not weights: the int8 graph of a pruned TT
        ``models.mobilenet(width=16)`` went from 126.2 KB to 56.3 KB, its outputs bit-identical.
        The compute nodes keep their names. Off by default: long names help when reading a
        graph.
    metric : str or callable, optional
        What ``max_drop`` is measured in: the pipeline's metric (given by the pipeline, so that
        the stage's cache key holds it); top-1 accuracy on a direct call without it. Unused
        without ``max_drop``.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    OnnxModel
        ``model.onnx`` in the stage's work folder, in QDQ format (``static``) or with
        ``MatMulInteger``/``DynamicQuantizeMatMul`` nodes (``dynamic``). When ``max_drop`` sent
        every quantized node back to fp32, a copy of ``model``.

    Raises
    ------
    PipelineError
        A setting breaks its rule (unknown ``mode`` or ``calibration``, ``samples < 1``,
        ``max_drop < 0``).
    StageError
        ``model`` is not an ONNX graph, ONNX Runtime's quantizer failed, or ``max_drop`` is set
        and the task has no validation split.

    Examples
    --------
    >>> int8 = quantize_onnx(fp32, mode="static", samples=256, data=task)  # doctest: +SKIP
    >>> int8.size_bytes < fp32.size_bytes  # doctest: +SKIP
    True
    >>> int8 = quantize_onnx(fp32, max_drop=0.3, data=task)  # doctest: +SKIP
    """
    check_arguments(quantize_onnx, {"mode": mode, "calibration": calibration, "samples": samples,
                                    "per_channel": per_channel, "max_drop": max_drop,
                                    "reduce_range": reduce_range, "compact": compact})
    _check_model(model)
    if mode == "none":  # nothing to quantize: the parent graph need not be read
        return _unquantized(model, resolve_context(ctx, "quantize_onnx", data))
    parent = _load_graph(model.path)  # read once: control flow, op types, compute node names
    if compact:  # refuse before quantizing, not after
        refuse_control_flow(parent, model.path)
    fp32_ops = {node.op_type for node in parent.node}
    fp32_names = {node.name for node in parent.node}
    del parent  # its weights need not stay in memory while quantizing
    ctx = resolve_context(ctx, "quantize_onnx", data)
    if max_drop is not None:
        _validation(ctx.data, max_drop)  # no validation split: fail before quantizing
    np.random.seed(ctx.seed)
    torch.manual_seed(ctx.seed)
    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if mode == "auto":
        mode = "static" if {"Conv", "ConvTranspose"} & fp32_ops else "dynamic"
    ctx.record("mode", mode)

    qlog = QuantizerLog()
    inputs = ctx.data.calibration(samples, seed=ctx.seed) if mode == "static" else None
    path = workdir / GRAPH_FILE
    everything_reverted = False
    graphs = Int8Graphs(model, mode=mode, inputs=inputs, calibration=calibration,
                        per_channel=per_channel, reduce_range=reduce_range, qlog=qlog,
                        warn=ctx.warn)
    ctx.record("reduce_range", graphs.reduce_range)
    ctx.record("reduce_range_reason", graphs.reduce_range_reason)
    try:
        if mode == "static":
            kept = _quantize_static_fastest(graphs, path, ctx)
            ctx.record("format", "QDQ")
            ctx.record("calibration", calibration)
            ctx.record("calibration_samples", min(samples, len(ctx.data.train)))  # type: ignore
        else:
            graphs.build(path)
            kept = []
            ctx.record("format", "QOperator (dynamic)")
        if max_drop is not None:
            everything_reverted = _meet_budget(model, graphs, path, kept, max_drop, ctx,
                                               stage_metric(metric, ctx))
    finally:
        graphs.close()
        ctx.record("quantizer_log", qlog.lines())
    for line in qlog.important():
        ctx.warn(f"ONNX Runtime's quantizer: {line}")
    ctx.record("per_channel", per_channel)
    if compact:
        ctx.record("compact", compact_graph(path, keep_names=fp32_names))
    result = OnnxModel(path)
    counts = _record_nodes(result, ctx)
    if not counts["quantized"] and not everything_reverted:
        ctx.warn(f"no node was quantized ({mode} mode quantizes "
                 f"{'Conv/MatMul/Gemm' if mode == 'static' else 'MatMul/Gemm'}; the graph has "
                 f"{sorted(fp32_ops & set(_COMPUTE_OPS)) or 'none of them'})")
    if "Conv" in fp32_ops and mode == "dynamic":
        ctx.warn("dynamic mode leaves convolutions in fp32 (dynamic ConvInteger is slower than "
                 "fp32 on CPUs); use mode='static' to quantize them")
    _check_speed(model, result, ctx)
    return result


# ----------------------------------------------------------------------------------------------
# steps


def _unquantized(model: OnnxModel, ctx: StageContext) -> OnnxModel:
    """``mode="none"``: a copy of the parent graph in the stage's work folder."""
    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = model.copy_to(workdir, GRAPH_FILE)
    ctx.record("mode", "none")
    ctx.record("format", "fp32 (mode='none': the parent graph, not quantized)")
    _record_nodes(result, ctx)
    return result


def _record_nodes(result: OnnxModel, ctx: StageContext) -> dict[str, dict[str, int]]:
    """Record the result's int8 and fp32 compute nodes (:func:`quantized_nodes`); return them."""
    counts = quantized_nodes(result)
    ctx.record("quantized_nodes", counts["quantized"])
    ctx.record("fp32_compute_nodes", counts["fp32"])
    return counts


def _check_model(model: Any) -> None:
    if not isinstance(model, OnnxModel):
        raise StageError(f"quantize_onnx: expects an ONNX model (the output of export_onnx), but "
                         f"got {type(model).__name__}; add an export_onnx stage before it")


def _load_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _validation(task: Task, max_drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split ``max_drop`` is judged on; an error naming the fix without one."""
    if task.val is None:
        raise StageError(f"quantize_onnx: max_drop={max_drop} is judged on the validation split, "
                         f"but task '{task.name}' has none; give it one (x_val/y_val in "
                         "data.from_tensors, val= in data.from_datasets) or drop max_drop")
    return task.arrays("val")


def _preprocess(source: Path, target: Path, warn: Callable[[str], None],
                qlog: QuantizerLog) -> None:
    """``quant_pre_process``: shape inference and fp32 graph optimisation before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with qlog.capture():
            quant_pre_process(str(source), str(target), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference fails on some graphs; ONNX's is enough
        log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
        try:
            with qlog.capture():
                quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        except Exception as exc2:
            warn(f"quant_pre_process failed ({type(exc2).__name__}: {exc2}); quantizing the "
                 "graph as exported")
            shutil.copyfile(source, target)


class _Calibration(CalibrationDataReader):
    """A CalibrationDataReader over the task's calibration samples, in batches."""

    def __init__(self, input_name: str, x: torch.Tensor, batch_size: int) -> None:
        array = x.float().numpy()
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: array[i:i + batch_size]} for i in range(0, len(array), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _gemm_to_matmul(path: Path) -> None:
    """Rewrite Gemm nodes as MatMul + Add, as ``quantize_dynamic`` does first (ONNX Runtime's own
    ``ONNXModel.replace_gemm_with_matmul``), so that node names are those the quantizer sees."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    proto = onnx.load(str(path))
    if any(node.op_type == "Gemm" for node in proto.graph.node):
        model = ONNXModel(proto)
        model.replace_gemm_with_matmul()
        onnx.save(model.model, str(path))


def _calibration_cache_supported() -> bool:
    """Whether ``quantize_static`` can save and reload its activation ranges (newer releases)."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


class Int8Graphs:
    """Int8 versions of one fp32 graph under one setting of ``quantize_onnx``, calibrated once.

    The graph is pre-processed once (``quant_pre_process``) into a scratch folder. :meth:`build`
    writes an int8 graph with some compute nodes left in fp32 (``exclude``, ONNX Runtime's
    ``nodes_to_exclude``) or only some quantized (``only``, its ``nodes_to_quantize``). In
    ``static`` mode the first build computes the activation ranges and saves them to a calibration
    cache (``quantize_static(calibration_cache_path=...)``), which every later build loads instead
    of running calibration again: graphs that differ only in their node sets share one
    calibration. With an ONNX Runtime whose ``quantize_static`` lacks that argument, every build
    calibrates; :attr:`calibrations` counts the passes either way.

    Parameters
    ----------
    model : OnnxModel
        The fp32 graph; it is read, never changed.
    mode : {"static", "dynamic"}
        As in :func:`quantize_onnx`.
    inputs : torch.Tensor, optional
        Calibration inputs (``static`` mode), e.g. ``Task.calibration(256)``.
    calibration : {"minmax", "entropy", "percentile"}
        As in :func:`quantize_onnx`.
    per_channel : bool
        As in :func:`quantize_onnx`.
    reduce_range : {"auto", True, False}
        As in :func:`quantize_onnx`; :attr:`reduce_range` holds the choice and
        :attr:`reduce_range_reason` why.
    qlog : QuantizerLog, optional
        Receives the quantizer's output (a new one by default).
    warn : callable, optional
        Receives warnings (a stage passes ``ctx.warn``).

    Examples
    --------
    >>> with Int8Graphs(fp32, inputs=task.calibration(256)) as graphs:  # doctest: +SKIP
    ...     names = [name for name, op in graphs.nodes()]
    ...     mixed = graphs.build(tmp / "mixed.onnx", exclude=names[:1])
    """

    def __init__(self, model: OnnxModel, *, mode: str = "static",
                 inputs: torch.Tensor | None = None, calibration: str = "minmax",
                 per_channel: bool = True, reduce_range: bool | str = "auto",
                 qlog: QuantizerLog | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if mode not in ("static", "dynamic"):
            raise StageError(f"Int8Graphs: mode must be 'static' or 'dynamic', but got {mode!r}")
        if mode == "static" and (inputs is None or not len(inputs)):
            raise StageError("Int8Graphs: static mode needs calibration inputs (inputs=...)")
        self.mode, self.inputs = mode, inputs
        self.calibration, self.per_channel = calibration, per_channel
        self.reduce_range, self.reduce_range_reason = int8_reduce_range(reduce_range)
        self.qlog = qlog or QuantizerLog()
        self.calibrations = 0
        self._scratch = tempfile.TemporaryDirectory(prefix="kdcompress-int8-")
        self.source = Path(self._scratch.name) / "preprocessed.onnx"
        self._cache = Path(self._scratch.name) / "calibration.json"
        self._use_cache = mode == "static" and _calibration_cache_supported()
        _preprocess(model.path, self.source, warn or log.warning, self.qlog)
        if mode == "dynamic":
            _gemm_to_matmul(self.source)
        # the pre-processed graph never changes: its quantizable nodes are read once
        proto = self.proto()
        if mode == "dynamic":
            weights = _weight_matmuls(proto)
            self._nodes = [(n.name, n.op_type) for n in proto.graph.node if n.name in weights]
            # MatMuls between two activations (attention scores) stay fp32 in every build
            self._between_activations = [n.name for n in proto.graph.node
                                         if n.op_type in _DYNAMIC_OPS and n.name not in weights]
        else:
            self._nodes = [(n.name, n.op_type) for n in proto.graph.node
                           if n.op_type in _COMPUTE_OPS]
            self._between_activations = []

    def __enter__(self) -> Int8Graphs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the scratch folder (the pre-processed graph and the calibration cache)."""
        self._scratch.cleanup()

    def proto(self) -> Any:
        """The pre-processed fp32 graph (without external data)."""
        import onnx

        return onnx.load(str(self.source), load_external_data=False)

    def nodes(self) -> list[tuple[str, str]]:
        """``(name, op_type)`` of the compute nodes this mode quantizes, in graph order.

        The names are those of the pre-processed graph, the names ``exclude`` and ``only`` take.
        """
        return list(self._nodes)

    def build(self, target: Path, *, exclude: Iterable[str] = (),
              only: Iterable[str] | None = None) -> OnnxModel:
        """Write the int8 graph to ``target``: all compute nodes but ``exclude``, or ``only``."""
        exclude, only = list(exclude), None if only is None else list(only)
        if only is not None and not only:
            raise StageError("Int8Graphs.build: only=[] would quantize nothing; pass None to "
                             "quantize every node")
        names = {name for name, _ in self.nodes()}
        unknown = sorted((set(exclude) | set(only or ())) - names)
        if unknown:
            raise StageError(f"Int8Graphs.build: {unknown} are not {self.mode}-quantizable nodes "
                             f"of the graph (those are {sorted(names)})")
        try:
            with self.qlog.capture():
                if self.mode == "static":
                    self._static(target, exclude, only)
                else:
                    self._dynamic(target, exclude, only)
        except Exception as exc:
            raise StageError(f"quantize_onnx: {self.mode} quantization failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        if exclude or only is not None:
            keep_fp32(target, set(exclude) if only is None else (names - set(only)) | set(exclude))
        return OnnxModel(target)

    def _static(self, target: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.calibration]
        reader = None
        if not (self._use_cache and self._cache.is_file()):
            input_name = self.proto().graph.input[0].name
            reader = _Calibration(input_name, self.inputs, _CALIBRATION_BATCH)  # type: ignore
            self.calibrations += 1
        cache = {"calibration_cache_path": str(self._cache)} if self._use_cache else {}
        quantize_static(str(self.source), str(target), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=None, per_channel=self.per_channel,
                        reduce_range=self.reduce_range,
                        nodes_to_exclude=exclude, nodes_to_quantize=only,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                        **cache)

    def _dynamic(self, target: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # ONNX Runtime's default (MatMulConstBOnly) quantizes a MatMul only when its weight is
        # the second input, which leaves fp32 every TT core contracted from the left (the core
        # is the first input there). Weights on either side are quantized here; MatMuls between
        # two activations (attention scores) stay fp32, as under the default.
        quantize_dynamic(str(self.source), str(target), op_types_to_quantize=list(_DYNAMIC_OPS),
                         per_channel=self.per_channel, reduce_range=self.reduce_range,
                         weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude + self._between_activations,
                         nodes_to_quantize=only,
                         extra_options={"MatMulConstBOnly": False})


def _weight_matmuls(proto: Any) -> set[str]:
    """Names of the MatMul/Gemm nodes with a weight (an initializer) among their two inputs."""
    initializers = {t.name for t in proto.graph.initializer}
    return {n.name for n in proto.graph.node
            if n.op_type in _DYNAMIC_OPS and any(i in initializers for i in n.input[:2])}


def keep_fp32(path: Path, nodes: Iterable[str]) -> list[str]:
    """Make the fp32 compute ``nodes`` of a QDQ graph stay fp32 when ONNX Runtime runs it.

    A Conv, ConvTranspose or Gemm that the quantizer left in fp32 but whose input comes from a
    ``DequantizeLinear`` (its producer runs in int8) is quantized anyway when a session loads the
    graph: ONNX Runtime's ``WeightBiasQuantization`` optimisation gives it a per-tensor int8
    weight, which can cost more accuracy than the per-channel weight it was excluded to avoid
    (measured here: a Gemm excluded this way kept 12% accuracy instead of 93%). A single-input
    ``Sum`` (an identity, which no optimisation removes) between the ``DequantizeLinear`` and
    the node keeps it in fp32 for a copy of its input.

    Returns the names of the nodes guarded this way; ``path`` is rewritten when there are any.
    """
    import onnx
    from onnx import helper

    wanted = set(nodes)
    proto = onnx.load(str(path))
    producers = {out: n.op_type for n in proto.graph.node for out in n.output}
    guarded: list[str] = []
    rewritten = []
    for node in proto.graph.node:
        if (node.name in wanted and node.op_type in _COMPUTE_OPS and node.input
                and producers.get(node.input[0]) == "DequantizeLinear"):
            source = node.input[0]
            node.input[0] = f"{node.name}_fp32_input"
            rewritten.append(helper.make_node("Sum", [source], [node.input[0]],
                                              name=f"{node.name}_keep_fp32"))
            guarded.append(node.name)
        rewritten.append(node)
    if guarded:
        proto.graph.ClearField("node")
        proto.graph.node.extend(rewritten)
        onnx.save(proto, str(path))
    return guarded


def _quantize_static_fastest(graphs: Int8Graphs, target: Path, ctx: StageContext) -> list[str]:
    """Static QDQ; with small-reduction convs, also without quantizing them, keeping the faster.

    Returns the nodes kept in fp32 (``[]`` or the small convolutions).
    """
    small = small_convs(graphs.proto())
    graphs.build(target)
    ctx.record("kept_fp32", [])
    if not small:
        return []
    alternative = target.with_name("small_convs_fp32.onnx")
    try:
        graphs.build(alternative, exclude=small)
        x = ctx.data.calibration(_CALIBRATION_BATCH, seed=ctx.seed).float().numpy()
        t_all, t_mixed = _side_by_side([OnnxModel(target), OnnxModel(alternative)], x, 1.0)
    except Exception as exc:  # the all-int8 graph is already there: keep it
        log.info("comparison with fp32 small convolutions skipped: %s", exc)
        alternative.unlink(missing_ok=True)
        return []
    ctx.record("small_convs_ms", {"int8": round(1e3 * t_all, 3), "fp32": round(1e3 * t_mixed, 3)})
    if t_mixed < 0.97 * t_all:
        alternative.replace(target)
        ctx.record("kept_fp32", small)
        return small
    alternative.unlink(missing_ok=True)
    return []


def _meet_budget(model: OnnxModel, graphs: Int8Graphs, path: Path, kept: list[str],
                 max_drop: float, ctx: StageContext, metric: Metric) -> bool:
    """Move the costliest nodes back to fp32 until validation accuracy is within ``max_drop``.

    Replaces the graph at ``path`` when nodes go back; records what went back and why, and how
    much of full int8's speed-up is left. Returns whether every quantized node went back.
    """
    from kdcompress.analysis.int8 import revert_to_budget  # kdcompress.analysis imports us

    x, y = _validation(ctx.data, max_drop)
    candidates = [(name, op) for name, op in graphs.nodes() if name not in kept]
    with tempfile.TemporaryDirectory(prefix="kdcompress-int8-budget-") as tmp:
        full = OnnxModel(shutil.copyfile(path, Path(tmp) / "full_int8.onnx"))
        outcome = revert_to_budget(model, full, graphs, candidates, x, y, max_drop=max_drop,
                                   folder=Path(tmp), exclude=kept, metric=metric)
        ctx.record("max_drop", max_drop)
        ctx.record("max_drop_metric", metric.name)
        ctx.record("val_samples", len(y))
        ctx.record("val_accuracy_fp32", round(outcome.fp32, 6))
        ctx.record("val_accuracy_int8", round(outcome.int8, 6))
        ctx.record("val_accuracy", round(outcome.accuracy, 6))
        ctx.record("reverted", outcome.reverted)
        ctx.record("node_costs", [c.to_dict() for c in outcome.costs])
        ctx.record("calibration_passes", graphs.calibrations)
        if not outcome.reverted:
            return False
        if outcome.graph is None:
            path.unlink()
            model.copy_to(path.parent, path.name)
            lost = 100 * (outcome.fp32 - outcome.int8)
            ctx.warn(f"max_drop={max_drop}: full int8 lost {lost:.2f} validation points and "
                     f"all {len(candidates)} of its int8 compute nodes had to go back to fp32 "
                     "to stay within it; nothing of int8 is left (the result is a copy of the "
                     "fp32 graph). Raise max_drop, calibrate differently (calibration=, "
                     "samples=), or keep the fp32 graph")
            return True
        shutil.copyfile(outcome.graph.path, path)
        _speed_kept(model, full, OnnxModel(path), ctx)
    return False


def _speed_kept(fp32: OnnxModel, full: OnnxModel, reverted: OnnxModel, ctx: StageContext) -> None:
    """Time fp32, full int8 and reverted graphs interleaved; warn when the speed-up is lost.

    Records each graph's median latency (one thread, batch 1 and 64) and the fraction of full
    int8's speed-up over fp32 that the reverted graph keeps.
    """
    x = ctx.data.calibration(_CALIBRATION_BATCH, seed=ctx.seed).float()
    config = MeasureConfig(threads=1, warmup=3, repeats=20, min_seconds=0.2)
    graphs = {"fp32": fp32, "int8": full, "reverted": reverted}
    latency: dict[str, dict[str, float]] = {}
    kept: dict[str, float | None] = {}
    try:
        sessions = {k: g.session("cpu", threads=1) for k, g in graphs.items()}
        for batch in (1, 64):
            feed = x.repeat(-(-batch // len(x)), *([1] * (x.ndim - 1)))[:batch].numpy()
            feeds = [{s.get_inputs()[0].name: feed} for s in sessions.values()]
            calls = [lambda s=s, f=f: s.run(None, f)
                     for s, f in zip(sessions.values(), feeds, strict=True)]
            times = time_calls(calls, config)
            p50 = {k: t["p50"] for k, t in zip(graphs, times, strict=True)}
            latency[f"batch_{batch}"] = p50
            gain = p50["fp32"] - p50["int8"]
            kept[f"batch_{batch}"] = round((p50["fp32"] - p50["reverted"]) / gain, 3) \
                if gain > 0 else None
    except Exception as exc:  # timing is advice; never fail the stage over it
        log.info("reverted graph's speed check skipped: %s", exc)
        return
    ctx.record("revert_latency_ms", latency)
    ctx.record("speedup_kept", kept)
    share, b64 = kept["batch_64"], latency["batch_64"]
    if share is not None and share < _SPEEDUP_KEPT:
        ctx.warn(f"the reverted graph lost its int8 speed-up: it keeps {100 * share:.0f}% of full "
                 f"int8's at batch 64 (fp32 {b64['fp32']:.3f} ms, full int8 {b64['int8']:.3f} "
                 f"ms, reverted {b64['reverted']:.3f} ms, one thread): fp32 nodes between int8 "
                 "ones add conversions; consider the fp32 graph, or a larger max_drop")


# ----------------------------------------------------------------------------------------------
# ONNX Runtime's quantizer output: into the report, not the terminal


class _LineStream(io.TextIOBase):
    """A text stream that hands each complete line written to it to ``sink``."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__()
        self._sink = sink
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._sink(line)
        return len(text)

    def close(self) -> None:
        if self._partial:
            self._sink(self._partial)
            self._partial = ""
        super().close()


class QuantizerLog(logging.Handler):
    """What ONNX Runtime's quantizer logs and prints while :meth:`capture` is active, in order.

    The quantizer logs with ``logging.warning(...)`` on the root logger, which also installs a
    stderr handler for good (``logging.basicConfig``) when the root logger has none, and it prints
    calibration progress. Inside :meth:`capture`, records created on the root logger are diverted
    here by a filter on that logger (so no handler, the application's or pytest's, sees them),
    the ``onnxruntime`` loggers stop propagating, a ``NullHandler`` keeps ``basicConfig`` from
    running, and ``sys.stdout`` / ``sys.stderr`` are redirected; all of it is undone on exit.
    Records of other loggers (kdcompress's own) are not touched.

    Examples
    --------
    >>> qlog = QuantizerLog()
    >>> with qlog.capture():
    ...     logging.warning("Please consider pre-processing")
    ...     print("Collecting tensor data ...")
    >>> qlog.lines()
    ['WARNING root: Please consider pre-processing', 'Collecting tensor data ...']
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._lines: list[str] = []
        self._important: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        self._add(line, important=record.levelno >= logging.ERROR)

    def _add(self, line: str, important: bool = False) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        self._lines.append(line)
        lower = line.lower()
        if (important or any(m in lower for m in _LOG_MATTERS)) and line not in self._important:
            self._important.append(line)

    def lines(self) -> list[str]:
        """Every captured line, the first ``_LOG_LIMIT`` of them and a count of the rest."""
        if len(self._lines) <= _LOG_LIMIT:
            return list(self._lines)
        return [*self._lines[:_LOG_LIMIT], f"... {len(self._lines) - _LOG_LIMIT} more lines"]

    def important(self) -> list[str]:
        """The distinct lines that say part of the graph was not quantized as asked, or errors."""
        return list(self._important)

    @contextlib.contextmanager
    def capture(self) -> Iterator[QuantizerLog]:
        """Route the quantizer's output here for the duration; restore logging state after."""
        root = logging.getLogger()
        ort = logging.getLogger("onnxruntime")

        def divert(record: logging.LogRecord) -> bool:
            self.handle(record)
            return False

        guard = logging.NullHandler()
        propagate = ort.propagate
        root.addFilter(divert)
        root.addHandler(guard)
        ort.addHandler(self)
        ort.propagate = False
        out, err = _LineStream(self._add), _LineStream(self._add)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield self
        finally:
            out.close()
            err.close()
            ort.propagate = propagate
            ort.removeHandler(self)
            root.removeHandler(guard)
            root.removeFilter(divert)


# ----------------------------------------------------------------------------------------------
# what was quantized, and why int8 may not be faster


def small_convs(proto: Any) -> list[str]:
    """Names of Conv nodes whose reduction ``C_in/groups * kh * kw`` is below 32.

    The packed int8 GEMM pads that reduction, so their int8 version may be slower than fp32;
    static quantization times the graph with and without them in int8.
    """
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        dims = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if dims and len(dims) >= 3 and int(np.prod(dims[1:])) < _MIN_CONV_REDUCTION:
            names.append(node.name)
    return names


def quantized_nodes(model: OnnxModel) -> dict[str, dict[str, int]]:
    """Count compute nodes that run in int8 and those left in fp32, by op type.

    In QDQ graphs a compute node (Conv, MatMul, Gemm) counts as quantized when its data input and
    its weight both come from ``DequantizeLinear``: ONNX Runtime then fuses it into an int8 kernel.
    Integer operators (``QLinearConv``, ``MatMulInteger``, ...) always count as quantized.

    Returns
    -------
    dict
        ``{"quantized": {op: n}, "fp32": {op: n}}``.
    """
    import onnx

    proto = onnx.load(str(model.path), load_external_data=False)
    dq_outputs = {out for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  for out in n.output}
    quantized: dict[str, int] = {}
    fp32: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in _INT8_OPS:
            quantized[node.op_type] = quantized.get(node.op_type, 0) + 1
        elif node.op_type in _COMPUTE_OPS:
            int8 = len(node.input) >= 2 and all(i in dq_outputs for i in node.input[:2])
            bucket = quantized if int8 else fp32
            bucket[node.op_type] = bucket.get(node.op_type, 0) + 1
    return {"quantized": dict(sorted(quantized.items())), "fp32": dict(sorted(fp32.items()))}


def cpu_int8_features() -> list[str]:
    """The int8 dot-product instruction sets of this CPU (VNNI, AMX), from ``/proc/cpuinfo``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return [f for f in wanted if f in flags]


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def int8_reduce_range(setting: bool | str = "auto", *, machine: str | None = None,
                      features: list[str] | None = None) -> tuple[bool, str]:
    """Whether to quantize weights in 7 bits (``reduce_range``), and why.

    Parameters
    ----------
    setting : {"auto", True, False}
        ``True``/``False`` are taken as given; ``"auto"`` decides from the CPU.
    machine, features : optional
        The CPU architecture (``platform.machine()``) and its int8 dot-product instruction sets
        (:func:`cpu_int8_features`); read from this machine when not given.

    Returns
    -------
    (bool, str)
        The choice and a sentence saying why.
    """
    if setting is True or setting is False:
        return setting, "set by the caller"
    if setting != "auto":
        raise StageError(f"quantize_onnx: reduce_range must be 'auto', True or False, but got "
                         f"{setting!r}")
    machine = (machine if machine is not None else platform.machine()).lower()
    features = cpu_int8_features() if features is None else features
    if machine in _X86 and not features:
        return True, ("this x86-64 CPU has no VNNI/AMX: its int8 kernels add pairs of products "
                      "in 16 bits, which saturate with 8-bit weights, so weights use 7 bits")
    if machine in _X86:
        return False, f"this CPU has {', '.join(features)}: 8-bit weights do not saturate"
    return False, f"8-bit weights on {machine or 'this CPU'}"


def slow_int8_reasons(fp32: OnnxModel, int8: OnnxModel, *,
                      fp32_latency: float | None = None) -> list[str]:
    """What, in an int8 graph and on this CPU, usually keeps int8 from beating fp32.

    Parameters
    ----------
    fp32, int8 : OnnxModel
        The parent graph and its quantized version.
    fp32_latency : float, optional
        The parent's latency in seconds; below 0.1 ms per-call overhead is named as a cause.

    Returns
    -------
    list of str
        One sentence per likely cause, most fundamental first; empty when none is found.
    """
    import onnx

    reasons = []
    if not cpu_int8_features():
        reasons.append("this CPU has no int8 dot-product instructions (VNNI/AMX), so int8 kernels "
                       "gain little over fp32 FMA")
    ops = [n.op_type for n in onnx.load(str(int8.path), load_external_data=False).graph.node]
    if "ConvInteger" in ops:
        reasons.append("convolutions were quantized dynamically (ConvInteger), which is slower "
                       "than fp32; use mode='static'")
    if {"QLinearConv", "QLinearMatMul"} & set(ops):
        reasons.append("the graph is in QOperator format; QDQ lets ONNX Runtime pick fused int8 "
                       "kernels")
    counts = quantized_nodes(int8)
    small = len(small_convs(onnx.load(str(fp32.path), load_external_data=False)))
    if sum(counts["fp32"].values()) > small:
        reasons.append(f"compute nodes left in fp32 {counts['fp32']} force int8<->fp32 "
                       "conversions between quantized ones")
    q = ops.count("QuantizeLinear") + ops.count("DynamicQuantizeLinear")
    compute = sum(counts["quantized"].values())
    if compute and q > 2 * compute:
        reasons.append(f"{q} QuantizeLinear nodes for {compute} quantized compute nodes: "
                       "activations are re-quantized often (ops between quantized ones that "
                       "have no int8 kernel)")
    if fp32_latency is not None and fp32_latency < 1e-4:
        reasons.append("the model is so small that per-call overhead, not arithmetic, dominates")
    return reasons


def explain_slow_int8(fp32: OnnxModel, int8: OnnxModel, *, fp32_latency: float,
                      int8_latency: float, batch: int | None = None,
                      reasons: list[str] | None = None) -> str | None:
    """A warning when ``int8`` is not faster than its ``fp32`` parent, with the likely reasons.

    Parameters
    ----------
    fp32, int8 : OnnxModel
        The parent graph and its quantized version.
    fp32_latency, int8_latency : float
        Their latencies in seconds, measured the same way.
    batch : int, optional
        The batch size they were timed at, named in the message.
    reasons : list of str, optional
        :func:`slow_int8_reasons` for these graphs at ``fp32_latency``, when already computed.

    Returns
    -------
    str or None
        ``None`` when int8 is at least 5% faster, else a message naming what to look at.

    Examples
    --------
    >>> explain_slow_int8(fp32, int8, fp32_latency=1e-3, int8_latency=1.2e-3)  # doctest: +SKIP
    'int8 is 1.20x the latency of fp32 (not faster on this CPU). Likely: ...'
    """
    if int8_latency < 0.95 * fp32_latency:
        return None
    if reasons is None:
        reasons = slow_int8_reasons(fp32, int8, fp32_latency=fp32_latency)
    why = "; ".join(reasons) if reasons else "no obvious cause: profile both graphs"
    ratio = int8_latency / fp32_latency
    at = "" if batch is None else f" at batch {batch}"
    return f"int8 is {ratio:.2f}x the latency of fp32{at} (not faster on this CPU). Likely: {why}"


def _side_by_side(models: list[OnnxModel], x: np.ndarray, budget_s: float) -> list[float]:
    """Median latency in seconds of each graph on ``x`` (one thread), timed in turns side by side
    with the report's ruler (:func:`kdcompress.metrics.latency_side_by_side`) for about
    ``budget_s``."""
    config = MeasureConfig(threads=1, batch_sizes=(len(x),), warmup=1, repeats=5,
                           max_repeats=50, min_seconds=budget_s / len(models))
    timed = latency_side_by_side(models, torch.from_numpy(x), config)
    return [t[f"batch_{len(x)}"]["p50"] / 1e3 for t in timed]


def _check_speed(fp32: OnnxModel, int8: OnnxModel, ctx: StageContext) -> None:
    """Time both graphs at batch 64 and at batch 1 (one thread, about a second and half a
    second); warn when int8 is not faster at either, naming the batch where it loses most.

    Records the likely reasons int8 would be slow here as ``slow_reason``, which the report shows
    whenever its own measurement finds int8 no faster than its parent.
    """
    x = ctx.data.calibration(_CALIBRATION_BATCH, seed=ctx.seed).float().numpy()
    timed: dict[int, tuple[float, float]] = {}
    try:
        for batch, inputs, budget_s in ((_CALIBRATION_BATCH, x, 1.0), (1, x[:1], 0.5)):
            f32, i8 = _side_by_side([fp32, int8], inputs, budget_s)
            timed[batch] = (f32, i8)
    except Exception as exc:  # timing is advice; never fail the stage over it
        log.info("int8 speed check skipped: %s", exc)
    # the batch where int8 loses most names the reasons (per-call overhead shows at batch 1)
    worst = max(timed, key=lambda b: timed[b][1] / timed[b][0]) if timed else None
    reasons = slow_int8_reasons(fp32, int8,
                                fp32_latency=None if worst is None else timed[worst][0])
    if reasons:
        ctx.record("slow_reason", "; ".join(reasons))
    for batch, (f32, i8) in timed.items():
        ctx.record(f"speedup_batch{batch}_1thread", round(f32 / i8, 3))
    if worst is None:
        return
    message = explain_slow_int8(fp32, int8, fp32_latency=timed[worst][0],
                                int8_latency=timed[worst][1], batch=worst, reasons=reasons)
    if message:
        ctx.warn(message)

"""The ``export_onnx`` stage: a torch model -> an ONNX graph with a dynamic batch axis, checked.

The graph is exported with the dynamo exporter (``torch.onnx.export(dynamo=True)``), simplified
(onnxslim when installed, else ONNX Runtime's offline basic optimisation, which keeps standard ONNX
ops only), and checked against PyTorch on the task's validation split (``Task.eval_split``; the
test split is only reported, never used to pass or fail a stage): the batch axis must be symbolic
and the graph must run at two batch sizes, and the outputs must agree within ``atol``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext, resolve_context
from kdcompress.data import Task
from kdcompress.declare import Choice, Float, Int, check_arguments, stage
from kdcompress.errors import StageError
from kdcompress.layers import TT_LAYERS, materialize
from kdcompress.training import predict_logits

__all__ = ["export_onnx", "TT_EXPORT_MODES", "MIN_OPSET", "parity", "onnx_node_count"]

log = logging.getLogger(__name__)

#: Values of ``tt_export``: keep TT layers as chains of small MatMuls, multiply them back into
#: dense weights, or pick per layer whichever runs faster.
TT_EXPORT_MODES = ("factorized", "dense", "auto")
GRAPH_FILE = "model.onnx"
_PARITY_SAMPLES = 512
_MAX_INLINE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with a margin
#: The lowest opset the dynamo exporter implements; below it, it converts after the fact, which
#: may fail and silently keep opset 18.
MIN_OPSET = 18


@stage(role="export", checks={
    "opset": Int(min=MIN_OPSET, optional=True),
    "tt_export": Choice(TT_EXPORT_MODES),
    "simplify": Choice([True, False]),
    "atol": Float(gt=0),
})
def export_onnx(
    model: nn.Module, *, opset: int | None = None, tt_export: str = "factorized",
    simplify: bool = True, atol: float = 1e-3, data: Task | None = None,
    ctx: StageContext | None = None,
) -> OnnxModel:
    """Export ``model`` to ONNX with a dynamic batch axis and check it against PyTorch.

    Parameters
    ----------
    model : nn.Module
        The model to export, used as given in eval mode (forward hooks are dropped from the copy
        that is exported, so distillation hooks never reach the graph).
    opset : int, optional
        ONNX opset, at least 18 (the exporter's lowest); the exporter's default when not given.
        Recorded in the report.
    tt_export : {"factorized", "dense", "auto"}
        How tensor-train layers are exported: as their chain of small contractions, multiplied
        back into one dense weight, or per layer whichever is faster on the device the pipeline
        runs on (``--device``: the GPU for a CUDA run; ``tt_export_timed_on`` in the details).
    simplify : bool
        Simplify the graph (onnxslim when installed, else ONNX Runtime's offline optimisation).
    atol : float
        Largest absolute difference (> 0) allowed between ONNX Runtime's and PyTorch's logits on
        the validation split (the training split when the task has none); above it the stage
        fails with the numbers.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    OnnxModel
        ``model.onnx`` in the stage's work folder.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``opset`` below 18, an unknown ``tt_export``, ``atol <= 0``).
    StageError
        The batch axis could not be kept symbolic (e.g. the model calls ``int(x.shape[0])``),
        the export failed, or ONNX Runtime disagrees with PyTorch beyond ``atol``.

    Examples
    --------
    >>> from kdcompress import data, models
    >>> task = data.digits()
    >>> fp32 = export_onnx(models.cnn(width=16).build((1, 8, 8), 10), data=task)  # doctest: +SKIP
    >>> fp32.predict(task.example(4)).shape  # doctest: +SKIP
    torch.Size([4, 10])
    """
    check_arguments(export_onnx, {"opset": opset, "tt_export": tt_export, "simplify": simplify,
                                  "atol": atol})
    ctx = resolve_context(ctx, "export_onnx", data)
    if not isinstance(model, nn.Module):
        raise StageError(f"export_onnx: expects a torch model (nn.Module), but got "
                         f"{type(model).__name__}")
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(model).cpu().eval()
    hooks = _drop_hooks(model)
    if hooks:
        ctx.record("hooks_removed", hooks)
    model, materialised = _materialize_tt(model, tt_export, ctx)
    ctx.record("tt_export", tt_export)
    ctx.record("materialised_tt_layers", materialised)

    workdir = Path(ctx.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "exported.onnx"
    example = ctx.data.example(2).float()
    _export(model, example, raw, opset)
    proto = _load(raw)
    ctx.record("opset", _opset_of(proto))
    _check_symbolic_batch(proto)
    nodes_before = onnx_node_count(proto)
    ctx.record("nodes_before", nodes_before)
    if simplify:
        proto, how = _simplify(proto, raw, ctx)
        ctx.record("simplified_with", how)
    ctx.record("gather_indices_narrowed", _narrow_gather_indices(proto))
    ctx.record("nodes_after", onnx_node_count(proto))
    ctx.record("op_counts", _op_counts(proto))

    path = workdir / GRAPH_FILE
    _save(proto, path)
    for leftover in (raw, raw.with_name(raw.name + ".data")):
        leftover.unlink(missing_ok=True)
    result = OnnxModel(path)

    split = ctx.data.eval_split  # passing or failing the stage is a decision: never the test split
    x = ctx.data.head(split, _PARITY_SAMPLES)
    max_diff, agreement = parity(model, result, x)
    ctx.record("parity_split", split)
    ctx.record("max_abs_diff", max_diff)
    ctx.record("argmax_agreement", agreement)
    if not max_diff <= atol:
        raise StageError(f"export_onnx: ONNX Runtime and PyTorch disagree on the {split} split: "
                         f"max abs difference {max_diff:.3g} > atol={atol:g} (argmax agreement "
                         f"{agreement:.4f}). Look for ops that behave differently in eval mode, "
                         "or raise atol if the difference is expected")
    return result


# ----------------------------------------------------------------------------------------------
# steps


def _drop_hooks(model: nn.Module) -> int:
    """Remove forward (pre-)hooks from every submodule of the (copied) model; return how many."""
    count = 0
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            count += len(hooks)
            hooks.clear()
    return count


def _materialize_tt(model: nn.Module, mode: str, ctx: StageContext) -> tuple[nn.Module, list[str]]:
    """Apply :func:`kdcompress.layers.materialize` when the model holds TT layers."""
    if not any(isinstance(m, TT_LAYERS) for m in model.modules()):
        return model, []
    example = ctx.data.example(64).float()  # "auto" times each layer at a serving-size batch
    if mode == "auto":  # timed where the model will be served: the pipeline's device
        ctx.record("tt_export_timed_on", str(ctx.device))
    model, names = materialize(model, mode=mode, example_input=example, threads=1,
                               device=ctx.device)
    return model.eval(), list(names)


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch")
    # the exporter logs one line per torchvision operator it cannot register and warns about its
    # own pytree internals: neither concerns the user's model
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), verbose=False, external_data=True)
    except Exception as exc:  # the exporter raises many types; name the stage and the cause
        raise StageError(f"export_onnx: torch.onnx.export failed for {type(model).__name__}: "
                         f"{type(exc).__name__}: {str(exc)[:2000]}") from exc
    finally:
        registration.setLevel(level)


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _opset_of(proto: Any) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_symbolic_batch(proto: Any) -> None:
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    if not dim or not dim[0].dim_param:
        fixed = dim[0].dim_value if dim else "none"
        raise StageError(f"export_onnx: the exported graph's input has a fixed batch size "
                         f"({fixed}) instead of a symbolic one. The model probably turns the batch "
                         "size into a Python int (int(x.shape[0]), x.size(0) used in range() or "
                         "as a shape argument); use x.flatten(1) or x.reshape(x.shape[0], -1) "
                         "with the tensor's own shape instead")


def onnx_node_count(proto: Any) -> int:
    """Number of nodes in a graph (top-level graph, not counting subgraphs)."""
    return len(proto.graph.node)


def _op_counts(proto: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _simplify(proto: Any, raw: Path, ctx: StageContext) -> tuple[Any, str]:
    """Simplify with onnxslim; if it fails on a graph, say so and use ORT's offline optimisation."""
    import onnxslim

    try:
        return onnxslim.slim(proto), "onnxslim"
    except Exception as exc:  # a simplifier bug must not lose the export
        ctx.warn(f"onnxslim failed ({type(exc).__name__}: {exc}); using ONNX Runtime's "
                 "offline optimisation instead")
    return _ort_optimize(raw), "onnxruntime"


def _narrow_gather_indices(proto: Any) -> int:
    """Store constant int64 Gather indices as int32 (lossless, half the bytes); returns how many.

    The exporter writes every index as int64; a pruned TT layer's input gather holds one index
    per padded input feature, the largest initializer of a small int8 model. Only initializers
    read by nothing but Gather nodes' indices, and whose values fit, are narrowed.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, slot))
    narrowed: set[str] = set()
    for k, init in enumerate(graph.initializer):
        if init.data_type != TensorProto.INT64 or readers.get(init.name) != {("Gather", 1)}:
            continue
        values = numpy_helper.to_array(init)
        info = np.iinfo(np.int32)
        if values.size and (values.min() < info.min or values.max() > info.max):
            continue
        narrowed.add(init.name)
        graph.initializer[k].CopyFrom(numpy_helper.from_array(values.astype(np.int32), init.name))
    for info_proto in graph.value_info:  # value_info may still declare them int64
        if info_proto.name in narrowed:
            info_proto.type.tensor_type.elem_type = TensorProto.INT32
    return len(narrowed)


def _ort_optimize(raw: Path) -> Any:
    import onnxruntime as ort

    out = raw.with_name("optimized.onnx")
    options = ort.SessionOptions()
    # basic = constant folding and redundant-node removal, standard ONNX ops only, so the graph
    # stays portable and quantizable; extended/all would write ORT-specific fused ops.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    proto = _load(out)
    out.unlink(missing_ok=True)
    return proto


def _save(proto: Any, path: Path) -> None:
    """Save as one file when it fits protobuf's limit (the file a user ships), else with data."""
    import onnx

    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    if proto.ByteSize() < _MAX_INLINE_BYTES:
        onnx.save_model(proto, str(path))
    else:
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        location=data_file.name, size_threshold=1024)


def parity(model: nn.Module, onnx_model: OnnxModel, x: torch.Tensor) -> tuple[float, float]:
    """Max abs difference and argmax agreement of PyTorch's and ONNX Runtime's logits on ``x``.

    Runs the graph at two batch sizes (1 and the rest in batches of up to 64 samples), so a graph
    whose batch size was fixed at export fails here too.
    """
    expected = predict_logits(model, x)
    sess = onnx_model.session()
    name = sess.get_inputs()[0].name
    array = x.float().numpy()
    outs: list[np.ndarray] = []
    try:
        outs.append(sess.run(None, {name: array[:1]})[0])
        for i in range(1, len(array), 64):
            outs.append(sess.run(None, {name: array[i:i + 64]})[0])
    except Exception as exc:
        raise StageError(f"export_onnx: the exported graph fails at batch sizes other than the "
                         f"traced one ({type(exc).__name__}: {str(exc)[:500]}). The model "
                         "probably uses its batch size as a Python int (int(x.shape[0])); "
                         "keep shapes as tensors (x.flatten(1))") from exc
    got = torch.from_numpy(np.concatenate(outs)).float()
    if got.shape != expected.shape:
        raise StageError(f"export_onnx: ONNX output has shape {tuple(got.shape)} but PyTorch's "
                         f"has {tuple(expected.shape)}")
    max_diff = float((got - expected).abs().max()) if len(x) else 0.0
    agreement = float((got.argmax(1) == expected.argmax(1)).float().mean()) if len(x) else 1.0
    return max_diff, agreement

"""Int8 sensitivity: each ONNX node alone in int8, against a brute-force ONNX Runtime reference."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdcompress import data, models
from kdcompress.analysis import int8_sensitivity
from kdcompress.artifacts import OnnxModel
from kdcompress.errors import DataError, LayerError, StageError
from kdcompress.stages import export_onnx, train
from kdcompress.stages.quantize import Int8Graphs, int8_reduce_range


def fragile_fc2(model: torch.nn.Module) -> torch.nn.Module:
    """The MLP with ``fc2`` destroyed by int8 and unchanged in fp32.

    Hidden unit 0 of ``fc1`` is always 0 (zero weights, bias -1, then ReLU); ``fc2`` reads it
    with weight 1000 in every row, so each row's int8 scale is 1000/127 and every other weight of
    ``fc2`` rounds to 0, while in fp32 the 1000s multiply zeros.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        fc1, fc2 = model.layers.fc1, model.layers.fc2
        fc1.weight[0] = 0.0
        fc1.bias[0] = -1.0
        fc2.weight[:, 0] = 1000.0
    return model


@pytest.fixture(scope="module")
def task(digits_task: data.Task) -> data.Task:
    return digits_task


@pytest.fixture(scope="module")
def fragile(task: data.Task) -> OnnxModel:
    mlp = train(models.mlp(hidden=(32, 32)), epochs=6, data=task)
    return export_onnx(fragile_fc2(mlp), data=task)


def _node_reading(graph: OnnxModel, weight: str) -> str:
    """The name of the node whose second input is the initializer ``weight``."""
    return next(n.name for n in onnx.load(str(graph.path)).graph.node
                if len(n.input) > 1 and n.input[1] == weight)


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray) -> None:
        self._items = iter([{name: x}])

    def get_next(self):
        return next(self._items, None)


def _brute_force(graph: OnnxModel, task: data.Task, node: str, samples: int, tmp_path) -> float:
    """``node`` alone quantized by ONNX Runtime's own tools, calibrated afresh, and run with the
    optimisation that would quantize its fp32 neighbours (WeightBiasQuantization) switched off."""
    pre, out = tmp_path / f"{node}_pre.onnx", tmp_path / f"{node}_int8.onnx"
    quant_pre_process(str(graph.path), str(pre))
    x_cal = task.calibration(256, seed=0).numpy()
    quantize_static(str(pre), str(out), _Reader(graph.input_name, x_cal),
                    quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_quantize=[node],
                    reduce_range=int8_reduce_range("auto")[0],  # as the analysis does here
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["WeightBiasQuantization"])
    x, y = task.arrays("val")
    logits = session.run(None, {graph.input_name: x[:samples].numpy()})[0]
    return float((logits.argmax(1) == y[:samples].numpy()).mean())


def test_cells_match_brute_force_and_single_out_the_fragile_node(fragile, task, tmp_path):
    cells = int8_sensitivity(fragile, task, samples=150)
    names = [c.layer for c in cells]
    assert len(names) == 3 and all(c.kind == "int8" and c.setting == "int8" for c in cells)
    x, y = task.arrays("val")
    baseline = float((fragile.predict(x[:150]).argmax(1) == y[:150]).float().mean())
    for cell in cells:
        reference = _brute_force(fragile, task, cell.layer, 150, tmp_path)
        assert cell.accuracy == pytest.approx(reference, abs=1e-9), cell.layer
        assert cell.drop == pytest.approx(100 * (baseline - reference), abs=1e-3)
        assert cell.params == fragile.num_params and cell.macs is None
    worst = max(cells, key=lambda c: c.drop)
    assert worst.layer == _node_reading(fragile, "layers.fc2.weight")
    assert worst.drop > 50
    assert all(c.drop < 5 for c in cells if c is not worst), cells


def test_one_calibration_serves_every_node(fragile, task, tmp_path):
    with Int8Graphs(fragile, inputs=task.calibration(256)) as graphs:
        for i, (name, _) in enumerate(graphs.nodes()):
            graphs.build(tmp_path / f"{i}.onnx", only=[name])
        graphs.build(tmp_path / "all.onnx")
        assert graphs.calibrations == 1


def test_an_excluded_node_stays_fp32_when_onnx_runtime_runs_it(fragile, task, tmp_path):
    node = _node_reading(fragile, "layers.fc2.weight")
    with Int8Graphs(fragile, inputs=task.calibration(256)) as graphs:
        mixed = graphs.build(tmp_path / "mixed.onnx", exclude=[node])
    proto = onnx.load(str(mixed.path))
    guard = next(n for n in proto.graph.node if n.name == f"{node}_keep_fp32")
    target = next(n for n in proto.graph.node if n.name == node)
    assert guard.op_type == "Sum" and target.input[0] == guard.output[0]
    assert target.input[1] == "layers.fc2.weight"  # the fp32 weight, not a DequantizeLinear's
    x, y = task.arrays("val")
    plain = ort.InferenceSession(str(mixed.path), providers=["CPUExecutionProvider"])
    without = ort.InferenceSession(str(mixed.path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["WeightBiasQuantization"])
    a = plain.run(None, {mixed.input_name: x.numpy()})[0]
    b = without.run(None, {mixed.input_name: x.numpy()})[0]
    np.testing.assert_array_equal(a, b)
    fp32 = fragile.predict(x)
    assert (a.argmax(1) == fp32.argmax(1).numpy()).mean() > 0.95


def test_nodes_picks_cells_and_an_unknown_node_is_named(fragile, task):
    head = _node_reading(fragile, "layers.head.weight")
    cells = int8_sensitivity(fragile, task, samples=40, nodes=[head])
    assert [c.layer for c in cells] == [head]
    with pytest.raises(LayerError, match=r"node 'node_linearr' is not a quantizable node of the "
                                         r"graph\. Did you mean 'node_linear'\?"):
        int8_sensitivity(fragile, task, samples=40, nodes=["node_linearr"])


def test_bad_input_is_named(fragile, task, tiny_task, trained_cnn):
    with pytest.raises(DataError, match="task 'tiny' has none"):
        int8_sensitivity(fragile, tiny_task)
    with pytest.raises(DataError, match="samples must be an integer >= 1, but got 0"):
        int8_sensitivity(fragile, task, samples=0)
    with pytest.raises(StageError, match="export it with kdcompress.stages.export_onnx first"):
        int8_sensitivity(trained_cnn, task)  # type: ignore[arg-type]


def test_building_with_an_unknown_node_is_an_error(fragile, task, tmp_path):
    with Int8Graphs(fragile, inputs=task.calibration(64)) as graphs, \
            pytest.raises(StageError, match=r"\['nope'\] are not static-quantizable nodes"):
        graphs.build(tmp_path / "x.onnx", exclude=["nope"])

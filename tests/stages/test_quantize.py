"""The quantize_onnx stage: static QDQ and dynamic int8, accuracy on the test split, reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcompress import data, models
from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext
from kdcompress.errors import StageError
from kdcompress.stages.export import export_onnx
from kdcompress.stages.quantize import explain_slow_int8, quantize_onnx, quantized_nodes
from kdcompress.stages.train import train


@pytest.fixture(scope="module")
def task() -> data.Task:
    return data.digits()


@pytest.fixture(scope="module")
def cnn_fp32(task: data.Task) -> OnnxModel:
    model = train(models.cnn(width=16, hidden=64), epochs=4, data=task)
    return export_onnx(model, data=task)


@pytest.fixture(scope="module")
def mlp_fp32(task: data.Task) -> OnnxModel:
    model = train(models.mlp(hidden=(64,)), epochs=4, data=task)
    return export_onnx(model, data=task)


def top1(model: OnnxModel, task: data.Task) -> float:
    x, y = task.arrays("test")
    return float((model.predict(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_keeps_accuracy_on_test_split(cnn_fp32, task, calibration):
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(cnn_fp32, mode="static", calibration=calibration, samples=128, ctx=ctx)
    assert int8.path == ctx.workdir / "model.onnx" and int8.path != cnn_fp32.path
    fp32_acc, int8_acc = top1(cnn_fp32, task), top1(int8, task)
    assert fp32_acc > 0.9
    assert int8_acc >= fp32_acc - 0.03, (fp32_acc, int8_acc)
    assert ctx.details["mode"] == "static" and ctx.details["format"] == "QDQ"
    # conv1 (1 input channel, 3x3: a reduction of 9) is timed in int8 and in fp32: either wins
    kept = len(ctx.details["kept_fp32"])
    assert set(ctx.details["small_convs_ms"]) == {"int8", "fp32"}
    assert ctx.details["quantized_nodes"] == {"Conv": 3 - kept, "Gemm": 2}
    assert ctx.details["fp32_compute_nodes"] == ({"Conv": 1} if kept else {})
    assert ctx.details["calibration_samples"] == 128
    assert int8.size_bytes < 0.45 * cnn_fp32.size_bytes
    assert ctx.details["speedup_batch64_1thread"] > 0
    if ctx.details["speedup_batch64_1thread"] < 1.0:
        assert ctx.details["slow_reason"] and ctx.warnings


def test_auto_picks_static_for_cnn_and_dynamic_for_mlp(cnn_fp32, mlp_fp32, task):
    ctx = StageContext.standalone("int8", task)
    quantize_onnx(cnn_fp32, mode="auto", ctx=ctx)
    assert ctx.details["mode"] == "static"
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(mlp_fp32, mode="auto", ctx=ctx)
    assert ctx.details["mode"] == "dynamic"
    assert sum(ctx.details["quantized_nodes"].values()) == 2
    assert top1(int8, task) >= top1(mlp_fp32, task) - 0.03


def test_dynamic_leaves_convolutions_fp32_and_says_so(cnn_fp32, task):
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(cnn_fp32, mode="dynamic", ctx=ctx)
    assert ctx.details["fp32_compute_nodes"] == {"Conv": 3}
    assert any("convolutions in fp32" in w for w in ctx.warnings)
    assert quantized_nodes(int8)["fp32"] == {"Conv": 3}


def test_bad_arguments(cnn_fp32, task):
    with pytest.raises(StageError, match="mode must be one of"):
        quantize_onnx(cnn_fp32, mode="int4", data=task)
    with pytest.raises(StageError, match="calibration must be one of"):
        quantize_onnx(cnn_fp32, calibration="kl", data=task)
    with pytest.raises(StageError, match="add an export_onnx stage"):
        quantize_onnx(nn.Linear(2, 2), data=task)  # type: ignore[arg-type]


def test_explain_slow_int8_names_reasons(cnn_fp32, task):
    ctx = StageContext.standalone("int8", task)
    dynamic = quantize_onnx(cnn_fp32, mode="dynamic", ctx=ctx)
    assert explain_slow_int8(cnn_fp32, dynamic, fp32_latency=1.0, int8_latency=0.5) is None
    message = explain_slow_int8(cnn_fp32, dynamic, fp32_latency=1.0, int8_latency=1.3)
    assert message is not None and "1.30x" in message and "'Conv': 3" in message


def test_input_graph_is_not_changed(cnn_fp32, task):
    before = cnn_fp32.path.read_bytes()
    quantize_onnx(cnn_fp32, mode="static", samples=32, data=task)
    assert cnn_fp32.path.read_bytes() == before
    x = task.example(3)
    assert cnn_fp32.predict(x).shape == torch.Size([3, 10])

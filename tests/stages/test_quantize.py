"""The quantize_onnx stage: static QDQ and dynamic int8, accuracy on the test split, reports."""

from __future__ import annotations

import logging
import re
import sys

import pytest
import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext
from kdcompress.declare import spec_of
from kdcompress.errors import PipelineError, StageError
from kdcompress.stages.export import export_onnx
from kdcompress.stages.quantize import (
    QuantizerLog,
    explain_slow_int8,
    quantize_onnx,
    quantized_nodes,
)
from kdcompress.stages.train import train


@pytest.fixture(scope="module")
def task(digits_task: data.Task) -> data.Task:
    return digits_task


@pytest.fixture(scope="module")
def cnn_fp32(cnn_onnx: OnnxModel) -> OnnxModel:
    return cnn_onnx


@pytest.fixture(scope="module")
def mlp_fp32(task: data.Task) -> OnnxModel:
    model = train(models.mlp(hidden=(64,)), epochs=4, data=task)
    return export_onnx(model, data=task)


def top1(model: OnnxModel, task: data.Task) -> float:
    x, y = task.arrays("test")
    return float((model.predict(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_keeps_accuracy_on_test_split(cnn_fp32, task, calibration, capsys):
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(cnn_fp32, mode="static", calibration=calibration, samples=128, ctx=ctx)
    # the histogram calibrators print their progress: it belongs to the report, not the terminal
    assert capsys.readouterr().out == ""
    log = ctx.details["quantizer_log"]
    assert isinstance(log, list)
    if calibration != "minmax":
        assert "Collecting tensor data and making histogram ..." in log
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


BAD_SETTINGS = [
    ({"mode": "int4"}, "mode must be one of 'static', 'dynamic', 'auto', but got 'int4'."),
    ({"mode": "statc"}, "mode must be one of 'static', 'dynamic', 'auto', but got 'statc'. "
                        "Did you mean 'static'?"),
    ({"calibration": "entropi"}, "calibration must be one of 'minmax', 'entropy', 'percentile', "
                                 "but got 'entropi'. Did you mean 'entropy'?"),
    ({"samples": 0}, "samples must be >= 1, but got 0"),
    ({"samples": 12.5}, "samples must be an integer, got 12.5"),
    ({"per_channel": "yes"}, "per_channel must be one of True, False, but got 'yes'."),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_bad_setting_fails_at_declaration_and_on_direct_call(cnn_fp32, task, kwargs, message):
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=teacher)
    with pytest.raises(PipelineError,
                       match=r"^stage 'int8' \(quantize_onnx\): " + re.escape(message) + "$"):
        pipeline.stage(quantize_onnx, out="int8", model=fp32, **kwargs)
    assert "int8" not in pipeline.stages
    with pytest.raises(PipelineError, match="^quantize_onnx: " + re.escape(message) + "$"):
        quantize_onnx(cnn_fp32, data=task, **kwargs)


def test_declaration_accepts_good_settings_and_names_the_role():
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=teacher)
    for i, mode in enumerate(("static", "dynamic", "auto")):
        pipeline.stage(quantize_onnx, out=f"int8_{i}", model=fp32, mode=mode,
                       calibration="percentile", samples=1, per_channel=False)
    assert spec_of(quantize_onnx).role == "quantize" and spec_of(quantize_onnx).compresses


def test_torch_model_is_rejected(task):
    with pytest.raises(StageError, match="add an export_onnx stage"):
        quantize_onnx(nn.Linear(2, 2), data=task)  # type: ignore[arg-type]


def _logging_state() -> tuple:
    root, ort = logging.getLogger(), logging.getLogger("onnxruntime")
    return (list(root.handlers), list(root.filters), root.level, list(ort.handlers),
            ort.propagate, ort.level)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("configured", [False, True], ids=["no-handlers", "app-handler"])
def test_quantizer_log_captures_root_records_and_prints_then_restores(monkeypatch, capsys,
                                                                     configured):
    app = _Collect()  # an application's own handler, or none: logging never configured
    monkeypatch.setattr(logging.getLogger(), "handlers", [app] if configured else [])
    before = _logging_state()
    qlog = QuantizerLog()
    with qlog.capture():
        logging.warning("Quantized bias `b` exceeds the range of a int32.")
        logging.getLogger("onnxruntime.quantization.shape_inference").warning("shape note")
        logging.getLogger("kdcompress.elsewhere").warning("not the quantizer's")
        print("Collecting tensor data", end="")
        print(" ...")
        sys.stderr.write("Number of tensors : 12\n")
    assert _logging_state() == before  # no basicConfig stderr handler left behind, filter removed
    assert qlog.lines() == [
        "WARNING root: Quantized bias `b` exceeds the range of a int32.",
        "WARNING onnxruntime.quantization.shape_inference: shape note",
        "Collecting tensor data ...",
        "Number of tensors : 12",
    ]
    assert qlog.important() == ["WARNING root: Quantized bias `b` exceeds the range of a int32."]
    assert capsys.readouterr() == ("", "")
    assert app.messages == (["not the quantizer's"] if configured else [])  # others untouched


def test_quantizer_warnings_land_in_the_report_not_the_terminal(mlp_fp32, task, capsys, caplog):
    int8 = quantize_onnx(mlp_fp32, mode="static", samples=32, data=task)
    capsys.readouterr()
    caplog.clear()
    handlers = list(logging.getLogger().handlers)
    ctx = StageContext.standalone("again", task)
    quantize_onnx(int8, mode="dynamic", ctx=ctx)  # ONNX Runtime: "already quantized?"
    out, err = capsys.readouterr()
    assert out == "" and "already quantized" not in err
    assert not [r for r in caplog.records
                if r.name == "root" or r.name.startswith("onnxruntime")]
    assert logging.getLogger().handlers == handlers
    line = next(x for x in ctx.details["quantizer_log"] if "already quantized" in x)
    assert line.startswith("WARNING root: Please check if the model is already quantized")
    assert f"ONNX Runtime's quantizer: {line}" in ctx.warnings


def test_automatic_choices_never_read_the_test_split(cnn_fp32, task, monkeypatch):
    reads: list[str] = []
    arrays = data.Task.arrays

    def spy(self: data.Task, split: str = "test"):
        reads.append(split)
        return arrays(self, split)

    monkeypatch.setattr(data.Task, "arrays", spy)
    ctx = StageContext.standalone("int8", task)
    quantize_onnx(cnn_fp32, mode="auto", samples=64, ctx=ctx)
    assert "small_convs_ms" in ctx.details  # the int8-or-fp32 timing ran
    assert reads and "test" not in reads, reads


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

"""The quantize_onnx stage: static QDQ and dynamic int8, accuracy on the test split, reports."""

from __future__ import annotations

import collections
import copy
import json
import logging
import re
import shutil
import sys

import onnx
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
    int8_reduce_range,
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
    speedups = [ctx.details["speedup_batch64_1thread"], ctx.details["speedup_batch1_1thread"]]
    assert all(v > 0 for v in speedups)
    if min(speedups) < 0.95:  # slower at either batch size: warned, naming that batch
        assert ctx.details["slow_reason"] and any("at batch" in w for w in ctx.warnings)


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
    ({"mode": "int4"}, "mode must be one of 'static', 'dynamic', 'auto', 'none', but got 'int4'."),
    ({"mode": "statc"}, "mode must be one of 'static', 'dynamic', 'auto', 'none', but got 'statc'. "
                        "Did you mean 'static'?"),
    ({"calibration": "entropi"}, "calibration must be one of 'minmax', 'entropy', 'percentile', "
                                 "but got 'entropi'. Did you mean 'entropy'?"),
    ({"samples": 0}, "samples must be >= 1, but got 0"),
    ({"samples": 12.5}, "samples must be an integer, got 12.5"),
    ({"per_channel": "yes"}, "per_channel must be one of True, False, but got 'yes'."),
    ({"max_drop": -0.5}, "max_drop must be >= 0, but got -0.5"),
    ({"max_drop": "0.3"}, "max_drop must be a number, got '0.3'"),
    ({"compact": "yes"}, "compact must be one of True, False, but got 'yes'."),
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


@pytest.mark.parametrize("max_drop", [None, 0.0])
def test_automatic_choices_never_read_the_test_split(cnn_fp32, task, monkeypatch, max_drop):
    reads: list[str] = []
    arrays = data.Task.arrays

    def spy(self: data.Task, split: str = "test"):
        reads.append(split)
        return arrays(self, split)

    monkeypatch.setattr(data.Task, "arrays", spy)
    ctx = StageContext.standalone("int8", task)
    quantize_onnx(cnn_fp32, mode="auto", samples=64, max_drop=max_drop, ctx=ctx)
    assert "small_convs_ms" in ctx.details  # the int8-or-fp32 timing ran
    assert reads and "test" not in reads, reads
    assert ("val" in reads) == (max_drop is not None)


def test_explain_slow_int8_names_reasons(cnn_fp32, task):
    ctx = StageContext.standalone("int8", task)
    dynamic = quantize_onnx(cnn_fp32, mode="dynamic", ctx=ctx)
    assert explain_slow_int8(cnn_fp32, dynamic, fp32_latency=1.0, int8_latency=0.5) is None
    message = explain_slow_int8(cnn_fp32, dynamic, fp32_latency=1.0, int8_latency=1.3)
    assert message is not None and "1.30x" in message and "'Conv': 3" in message
    message = explain_slow_int8(cnn_fp32, dynamic, fp32_latency=1.0, int8_latency=1.4, batch=1)
    assert message.startswith("int8 is 1.40x the latency of fp32 at batch 1 (not faster")


def test_input_graph_is_not_changed(cnn_fp32, task):
    before = cnn_fp32.path.read_bytes()
    quantize_onnx(cnn_fp32, mode="static", samples=32, data=task)
    assert cnn_fp32.path.read_bytes() == before
    x = task.example(3)
    assert cnn_fp32.predict(x).shape == torch.Size([3, 10])


def test_mode_none_keeps_the_parent_graph_so_a_search_can_weigh_int8_against_fp32(
        cnn_fp32, task, tmp_path):
    ctx = StageContext.standalone("int8", task)
    ctx.workdir = tmp_path / "int8"
    # max_drop is met by construction: nothing is quantized, nothing is scored
    kept = quantize_onnx(cnn_fp32, mode="none", max_drop=0.0, ctx=ctx)
    assert kept.path != cnn_fp32.path and kept.path.parent == tmp_path / "int8"
    assert kept.path.read_bytes() == cnn_fp32.path.read_bytes()
    x = task.example(16)
    assert torch.equal(kept.predict(x), cnn_fp32.predict(x))
    assert quantized_nodes(kept)["quantized"] == {} and quantized_nodes(kept)["fp32"]
    assert ctx.details["mode"] == "none" and ctx.details["quantized_nodes"] == {}
    assert not ctx.warnings  # not "no node was quantized": none was asked for


def test_mode_none_is_a_search_choice_beside_static():
    from kdcompress import search as ks

    pipeline = Pipeline("p", data=data.digits())
    teacher = pipeline.stage(train, out="teacher", model=models.mlp(hidden=(8,)), epochs=1)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=teacher)
    pipeline.stage(quantize_onnx, out="int8", model=fp32,
                   mode=ks.choice(["static", "none"], default="static"), max_drop=0.5)
    assert pipeline.concrete({"int8.mode": "none"}).stages["int8"].constants["mode"] == "none"


# ----------------------------------------------------------------------------------------------
# max_drop: int8 nodes back to fp32 until validation accuracy is within budget


def make_fragile(model: nn.Module, *, layers: tuple[str, ...] = ("fc2",)) -> nn.Module:
    """An MLP (hidden=(32, 32)) whose ``layers`` int8 destroys while fp32 is unchanged.

    A layer reading an input that is constant (a hidden unit made always 0, or a digits pixel
    that is always blank) gets weight 1000 on it in every row, its bias compensating: per-channel
    int8 then has a scale of 1000/127 per row and rounds every other weight to 0.
    """
    model = copy.deepcopy(model)
    fc1, fc2 = model.layers.fc1, model.layers.fc2
    with torch.no_grad():
        if "fc1" in layers:  # pixel 0 of the 8x8 digits is blank in every image
            blank = float(data.digits().arrays("train")[0][0, 0, 0, 0])
            fc1.weight[:, 0] += 1000.0
            fc1.bias -= 1000.0 * blank
        for reader, source in (("fc2", fc1), ("head", fc2)):
            if reader in layers:  # unit 0 of `source` is always 0 after its ReLU
                source.weight[0] = 0.0
                source.bias[0] = -1.0
                getattr(model.layers, reader).weight[:, 0] = 1000.0
    return model


@pytest.fixture(scope="module")
def mlp2(task: data.Task) -> nn.Module:
    return train(models.mlp(hidden=(32, 32)), epochs=6, data=task)


def node_reading(graph: OnnxModel, weight: str) -> str:
    """The name of the node whose second input is the initializer ``weight``."""
    return next(n.name for n in onnx.load(str(graph.path)).graph.node
                if len(n.input) > 1 and n.input[1] == weight)


def val_top1(model: OnnxModel, task: data.Task) -> float:
    x, y = task.arrays("val")
    return int((model.predict(x).argmax(1) == y).sum()) / len(y)


def test_max_drop_reverts_the_fragile_node_and_stops_there(mlp2, task):
    fp32 = export_onnx(make_fragile(mlp2), data=task)
    fc2 = node_reading(fp32, "layers.fc2.weight")
    full = quantize_onnx(fp32, mode="static", data=task)
    assert val_top1(full, task) < val_top1(fp32, task) - 0.5  # int8 destroys fc2
    ctx = StageContext.standalone("int8", task)
    # fc2 alone in int8 costs > 50 points; every other node costs < 2, and all of them together
    # about 2 (4 of 180 validation images): a budget of 3 points reverts fc2 and stops there
    int8 = quantize_onnx(fp32, mode="static", max_drop=3.0, ctx=ctx)
    d = ctx.details
    assert [r["node"] for r in d["reverted"]] == [fc2]
    assert d["reverted"][0]["drop"] > 50 and d["node_costs"][0]["node"] == fc2
    assert all(c["drop"] < 2.0 for c in d["node_costs"][1:])
    assert d["val_accuracy_fp32"] == pytest.approx(val_top1(fp32, task))
    assert d["val_accuracy_int8"] == pytest.approx(val_top1(full, task))
    assert d["val_accuracy"] == pytest.approx(val_top1(int8, task))  # the graph returned
    assert d["val_accuracy"] >= d["val_accuracy_fp32"] - 0.03
    assert d["reverted"][0]["accuracy_after"] == d["val_accuracy"]
    assert d["quantized_nodes"] == {"Gemm": 2} and d["fp32_compute_nodes"] == {"Gemm": 1}
    assert d["calibration_passes"] == 1
    node = next(n for n in onnx.load(str(int8.path)).graph.node if n.name == fc2)
    assert node.input[1] == "layers.fc2.weight"  # fc2 kept its fp32 weight
    assert set(d["speedup_kept"]) == {"batch_1", "batch_64"}
    assert set(d["revert_latency_ms"]["batch_64"]) == {"fp32", "int8", "reverted"}


def test_max_drop_in_dynamic_mode_reverts_the_fragile_node(mlp2, task):
    fp32 = export_onnx(make_fragile(mlp2), data=task)
    fc2 = node_reading(fp32, "layers.fc2.weight")
    ctx = StageContext.standalone("int8", task)
    quantize_onnx(fp32, mode="dynamic", max_drop=2.0, ctx=ctx)
    d = ctx.details
    # quantize_dynamic turns each Gemm into MatMul + Add first, naming the MatMul after the Gemm
    assert [r["node"] for r in d["reverted"]] == [f"{fc2}_MatMul"]
    assert d["val_accuracy"] >= d["val_accuracy_fp32"] - 0.02 > d["val_accuracy_int8"]
    assert d["quantized_nodes"] == {"MatMulInteger": 2} and d["fp32_compute_nodes"] == {"MatMul": 1}


def test_max_drop_met_by_full_int8_reverts_nothing(cnn_fp32, task):
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(cnn_fp32, mode="static", max_drop=5.0, ctx=ctx)
    d = ctx.details
    assert d["val_accuracy_fp32"] - d["val_accuracy_int8"] <= 0.05  # the premise
    assert d["reverted"] == [] and d["node_costs"] == []  # no node costed, none reverted
    assert d["val_accuracy"] == d["val_accuracy_int8"] == pytest.approx(val_top1(int8, task))
    kept = len(d["kept_fp32"])
    assert d["quantized_nodes"] == {"Conv": 3 - kept, "Gemm": 2}
    assert "speedup_kept" not in d


def test_max_drop_reverting_every_node_returns_the_fp32_graph_and_says_so(mlp2, task):
    fp32 = export_onnx(make_fragile(mlp2, layers=("fc1", "fc2", "head")), data=task)
    ctx = StageContext.standalone("int8", task)
    result = quantize_onnx(fp32, mode="static", max_drop=1.0, ctx=ctx)
    d = ctx.details
    assert len(d["reverted"]) == 3 and all(r["drop"] > 50 for r in d["reverted"])
    assert d["val_accuracy"] == d["val_accuracy_fp32"]
    assert quantized_nodes(result) == {"quantized": {}, "fp32": {"Gemm": 3}}
    x = task.example(16)
    assert torch.equal(result.predict(x), fp32.predict(x))
    assert sum("nothing of int8 is left" in w for w in ctx.warnings) == 1
    assert not any(w.startswith("no node was quantized") for w in ctx.warnings)


def test_max_drop_needs_a_validation_split(cnn_fp32, tiny_task, monkeypatch):
    monkeypatch.setattr("kdcompress.stages.quantize.Int8Graphs",
                        lambda *a, **k: pytest.fail("quantized before checking the data"))
    with pytest.raises(StageError, match=r"max_drop=0.3 is judged on the validation split, but "
                                         r"task 'tiny' has none"):
        quantize_onnx(cnn_fp32, max_drop=0.3, data=tiny_task)


def make_fc2_fragile(model: nn.Module) -> nn.Module:
    """A pipeline stage: :func:`make_fragile` on ``fc2``."""
    return make_fragile(model)


def test_report_shows_the_reverted_nodes(mlp2, task, fast_measure, tmp_path):
    fc2 = node_reading(export_onnx(make_fragile(mlp2), data=task), "layers.fc2.weight")
    pipeline = Pipeline("fragile", data=task)
    teacher = pipeline.stage(train, out="teacher", model=models.mlp(hidden=(32, 32)), epochs=6)
    fragile = pipeline.stage(make_fc2_fragile, out="fragile", model=teacher)
    fp32 = pipeline.stage(export_onnx, out="fp32", model=fragile)
    pipeline.stage(quantize_onnx, out="int8", model=fp32, mode="static", max_drop=3.0)
    pipeline.run(out=tmp_path / "run", measure=fast_measure, plot=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    details = next(r for r in report["stages"] if r["name"] == "int8")["details"]
    assert [r["node"] for r in details["reverted"]] == [fc2]
    assert details["val_accuracy"] >= details["val_accuracy_fp32"] - 0.03
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert f'- reverted: `[{{"node": "{fc2}", "op": "Gemm"' in markdown


def test_dynamic_quantizes_tt_cores_on_either_side_of_a_matmul(task):
    """A TT layer contracted from the left has its core as the MatMul's first input: ONNX
    Runtime's default would leave it fp32; every MatMul with a weight must become integer."""
    from kdcompress.layers.tt import TTLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), TTLinear(64, 64, in_modes=(4, 4, 4), out_modes=(4, 4, 4),
                                                 ranks=(1, 4, 4, 1)),
                          nn.ReLU(), nn.Linear(64, 10)).eval()
    fp32 = export_onnx(model, tt_export="factorized", data=task)
    proto = onnx.load(str(fp32.path))
    inits = {t.name for t in proto.graph.initializer}
    sides = [[i in inits for i in n.input[:2]] for n in proto.graph.node if n.op_type == "MatMul"]
    assert [True, False] in sides, "the test needs a core as a MatMul's first input"
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(fp32, mode="dynamic", ctx=ctx)
    q = onnx.load(str(int8.path))
    q_inits = {t.name for t in q.graph.initializer}
    left_fp32 = [n.name for n in q.graph.node
                 if n.op_type in ("MatMul", "Gemm") and any(i in q_inits for i in n.input[:2])]
    assert left_fp32 == []
    assert quantized_nodes(int8)["quantized"] == {"MatMulInteger": len(sides) + 1}  # + Linear
    x, _ = task.arrays("test")
    ref, out = fp32.predict(x), int8.predict(x)  # untrained: compare logits, not classes
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize(("machine", "features", "expected"), [
    ("x86_64", [], True),  # u8s8 kernels add product pairs in 16 bits: 8-bit weights saturate
    ("AMD64", [], True),
    ("x86_64", ["avx512_vnni"], False),
    ("x86_64", ["amx_int8", "avx_vnni"], False),
    ("aarch64", [], False),
    ("arm64", ["asimddp"], False),
])
def test_reduce_range_auto_follows_the_cpu(machine, features, expected):
    choice, reason = int8_reduce_range("auto", machine=machine, features=features)
    assert choice is expected and reason
    assert int8_reduce_range(True, machine=machine, features=features)[0] is True
    assert int8_reduce_range(False, machine=machine, features=features)[0] is False


def test_reduce_range_is_checked_before_quantizing(cnn_fp32, task):
    with pytest.raises(PipelineError, match="reduce_range"):
        quantize_onnx(cnn_fp32, reduce_range="yes", data=task)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_int8_logits_stay_close_to_fp32_on_this_cpu(mode, arch, task):
    """Against the fp32 graph: on x86 CPUs without VNNI full 8-bit weights saturate ONNX
    Runtime's int8 kernels (16-17% logit error measured on this untrained pair); the stage's
    ``reduce_range="auto"`` must keep int8 within a few per cent wherever the suite runs."""
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(32 * 64, 10))
    fp32 = export_onnx(model.eval(), data=task)
    ctx = StageContext.standalone("int8", task)
    int8 = quantize_onnx(fp32, mode=mode, ctx=ctx)
    assert ctx.details["reduce_range"] is int8_reduce_range("auto")[0]
    x, _ = task.arrays("test")
    ref, out = fp32.predict(x), int8.predict(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def recall_of_zero(logits: torch.Tensor, labels: torch.Tensor) -> float:
    zeros = labels == 0
    return float((logits.argmax(1)[zeros] == 0).float().mean())


def test_max_drop_is_measured_in_the_metric_it_is_given(mlp2, task):
    fp32 = export_onnx(make_fragile(mlp2), data=task)
    ctx = StageContext.standalone("int8", task)
    quantize_onnx(fp32, mode="static", max_drop=3.0, metric=recall_of_zero, ctx=ctx)
    d = ctx.details
    x, y = task.arrays("val")
    assert d["max_drop_metric"] == "recall_of_zero"
    assert d["val_accuracy_fp32"] == pytest.approx(recall_of_zero(fp32.predict(x), y))
    assert d["val_accuracy_fp32"] != pytest.approx(val_top1(fp32, task))  # not top-1
    assert d["val_accuracy"] >= d["val_accuracy_fp32"] - 0.03


def test_the_pipeline_s_metric_reaches_max_drop_and_keys_the_stage_s_cache(tmp_path, task):
    def build(metric):
        pipeline = Pipeline("metric_int8", data=task, seed=0, metric=metric)
        teacher = pipeline.stage(train, out="teacher", model=models.mlp(hidden=(16,)),
                                 epochs=1)
        fp32 = pipeline.stage(export_onnx, out="fp32", model=teacher)
        pipeline.stage(quantize_onnx, out="int8", model=fp32, max_drop=1.0)
        return pipeline

    build("accuracy").run(out=tmp_path / "run", plot=False)
    report = build(recall_of_zero).run(out=tmp_path / "run", plot=False)
    rows = {r.name: r for r in report.stages}
    assert rows["teacher"].cached and rows["fp32"].cached  # their results do not use it
    assert not rows["int8"].cached  # its choice does: a new metric, a new stage version
    assert rows["int8"].details["max_drop_metric"] == "recall_of_zero"


def _fused_ops(path) -> collections.Counter:
    """The ops of the graph ONNX Runtime builds from ``path`` at load time (after fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                               .graph.node)


def _compact_pair(fp32, task, mode, tmp_path):
    """One int8 graph and its compact copy (quantizing twice could time a different choice)."""
    from kdcompress.onnx_compact import compact_graph

    long = quantize_onnx(fp32, mode=mode, samples=64, data=task)
    path = tmp_path / "compact.onnx"
    shutil.copy(long.path, path)
    record = compact_graph(path, {n.name for n in onnx.load(str(fp32.path)).graph.node})
    return long, OnnxModel(path), record


def test_quantize_onnx_compact_records_what_it_saved(cnn_fp32, task):
    ctx = StageContext.standalone("int8", task)
    small = quantize_onnx(cnn_fp32, mode="static", samples=64, compact=True, ctx=ctx)
    record = ctx.details["compact"]
    assert record["bytes_after"] == small.size_bytes < record["bytes_before"]
    graph = onnx.load(str(small.path)).graph
    assert max(len(t.name) for t in graph.initializer) <= 4
    assert all(n.name == "" for n in graph.node if n.op_type.endswith("QuantizeLinear"))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_compact_shrinks_the_file_and_changes_no_output(cnn_fp32, mlp_fp32, task, mode,
                                                       tmp_path):
    fp32 = cnn_fp32 if mode == "static" else mlp_fp32
    long, small, record = _compact_pair(fp32, task, mode, tmp_path)
    assert small.size_bytes < 0.9 * long.size_bytes
    assert record["bytes_before"] == long.size_bytes and record["bytes_after"] == small.size_bytes
    x, _ = task.arrays("test")
    assert torch.equal(small.predict(x[:50]), long.predict(x[:50]))  # the same computation
    # ... run the same way: ONNX Runtime fuses the compact graph into the same kernels
    assert _fused_ops(small.path) == _fused_ops(long.path)
    a, b = onnx.load(str(long.path)).graph, onnx.load(str(small.path)).graph
    parent = {n.name for n in onnx.load(str(fp32.path)).graph.node}
    assert {n.name for n in b.node} - {""} == {n.name for n in a.node} & parent
    assert [v.name for v in a.input] == [v.name for v in b.input]
    assert [v.name for v in a.output] == [v.name for v in b.output]
    assert max(len(t.name) for t in b.initializer) <= 4
    assert len(b.value_info) == len(a.value_info)  # shapes ONNX Runtime may need to fuse
    onnx.checker.check_model(onnx.load(str(small.path)))
    if mode == "static":  # symmetric weights and int32 biases of the convolutions
        assert record["zero_points"] > 0 and record["attributes"] > 0


def test_compact_keeps_the_zero_points_ort_needs_to_fuse_gemm(cnn_fp32, task, tmp_path):
    _, small, _ = _compact_pair(cnn_fp32, task, "static", tmp_path)
    graph = onnx.load(str(small.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms  # the classifier
    for gemm in gemms:
        for name in gemm.input[1:]:
            assert len(producers[name].input) == 3  # weight and bias keep their zero points
    fused = _fused_ops(small.path)
    assert fused["QGemm"] == len(gemms) and not fused["Gemm"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_compact_vit_fuses_the_same_and_predicts_the_same(task, mode, tmp_path):
    torch.manual_seed(0)
    vit = models.transformer(dim=16, depth=2, heads=2, input_shape=(1, 8, 8),
                             num_classes=10).build().eval()
    fp32 = export_onnx(vit, data=task)
    long, small, record = _compact_pair(fp32, task, mode, tmp_path)
    assert (record["zero_points"] > 0) == (mode == "static")  # MatMul weights in QDQ
    assert _fused_ops(small.path) == _fused_ops(long.path)
    x, _ = task.arrays("test")
    assert torch.equal(small.predict(x[:20]), long.predict(x[:20]))


def test_compact_refuses_a_graph_with_control_flow(tmp_path):
    from onnx import TensorProto, helper

    from kdcompress.onnx_compact import compact_graph

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph), str(path))
    before = path.read_bytes()
    with pytest.raises(StageError, match=r"if.onnx has control flow \(If\)"):
        compact_graph(path)
    assert path.read_bytes() == before  # left as it was
    # the stage says so before it quantizes anything
    with pytest.raises(StageError, match=r"compact: if.onnx has control flow \(If\)"):
        quantize_onnx(OnnxModel(path), compact=True, data=data.digits())

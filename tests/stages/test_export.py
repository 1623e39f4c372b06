"""The export_onnx stage: parity, dynamic batch, fixed-batch models rejected, files on disk."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress.artifacts import OnnxModel
from kdcompress.context import StageContext
from kdcompress.declare import spec_of
from kdcompress.errors import PipelineError, StageError
from kdcompress.layers import TTConv2d, TTLinear
from kdcompress.stages import export
from kdcompress.stages.export import export_onnx
from kdcompress.stages.train import train


class FixedBatch(nn.Module):
    """Turns the batch size into a Python int: the exporter bakes it into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = int(x.shape[0])
        return self.fc(x.reshape(batch, 64))


class Noisy(nn.Module):
    """Disagrees with its own export: adds noise only in eager PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            y = y + 1.0
        return y


@pytest.fixture(scope="module")
def task(digits_task: data.Task) -> data.Task:
    return digits_task


@pytest.fixture(scope="module")
def trained(trained_cnn: nn.Module) -> nn.Module:
    return trained_cnn


@pytest.fixture(scope="module")
def exported(trained: nn.Module, task: data.Task) -> tuple[OnnxModel, StageContext]:
    ctx = StageContext.standalone("fp32", task)
    return export_onnx(trained, ctx=ctx), ctx


def test_parity_and_report(exported, trained, task):
    fp32, ctx = exported
    assert fp32.path == ctx.workdir / "model.onnx"
    assert ctx.details["max_abs_diff"] < 1e-4
    assert ctx.details["argmax_agreement"] == 1.0
    assert ctx.details["opset"] >= 18
    assert ctx.details["parity_split"] == "val"
    assert ctx.details["nodes_after"] <= ctx.details["nodes_before"]
    assert "BatchNormalization" not in ctx.details["op_counts"]  # folded into the convs
    x, _ = task.arrays("test")
    with torch.no_grad():
        torch.testing.assert_close(fp32.predict(x[:50]), trained(x[:50]), atol=1e-4, rtol=1e-4)


def test_one_graph_runs_batch_1_and_7(exported, trained, task):
    fp32, _ = exported
    dim = onnx.load(str(fp32.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param  # symbolic
    sess = fp32.session()
    x = task.example(7)
    for batch in (1, 7):
        out = sess.run(None, {sess.get_inputs()[0].name: x[:batch].numpy()})[0]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, trained(x[:batch]).detach().numpy(), atol=1e-4)


def test_input_model_unchanged_and_hooks_dropped(trained, task):
    model = models.cnn(width=16, hidden=64).build((1, 8, 8), 10).eval()
    model.load_state_dict(trained.state_dict())
    model.features.conv3.register_forward_hook(lambda m, i, o: o * 0)  # a stray hook
    ctx = StageContext.standalone("fp32", task)
    fp32 = export_onnx(model, simplify=False, ctx=ctx)
    assert ctx.details["hooks_removed"] == 1
    assert len(model.features.conv3._forward_hooks) == 1
    x = task.example(4)
    with torch.no_grad():
        torch.testing.assert_close(fp32.predict(x), trained(x), atol=1e-4, rtol=1e-4)


def test_fixed_batch_model_is_rejected(task):
    with pytest.raises(StageError, match="fixed batch size"):
        export_onnx(FixedBatch(), data=task)


def test_parity_failure_reports_the_numbers(task):
    with pytest.raises(StageError, match=r"max abs difference 1 > atol=0.001"):
        export_onnx(Noisy(), data=task)


def test_size_counts_external_data(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    path = tmp_path / "ext.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=True,
                      external_data=True, verbose=False)
    onnx_model = OnnxModel(path)
    data_file = tmp_path / "ext.onnx.data"
    assert data_file.exists() and data_file in onnx_model.files
    assert onnx_model.size_bytes == path.stat().st_size + data_file.stat().st_size


BAD_SETTINGS = [
    ({"tt_export": "dens"}, "tt_export must be one of 'factorized', 'dense', 'auto', but got "
                            "'dens'. Did you mean 'dense'?"),
    ({"opset": 13}, "opset must be >= 18, but got 13"),
    ({"opset": "18"}, "opset must be an integer, got '18'"),
    ({"atol": 0}, "atol must be > 0, but got 0"),
    ({"atol": float("nan")}, "atol must be a finite number, got nan"),
    ({"simplify": "yes"}, "simplify must be one of True, False, but got 'yes'."),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_bad_setting_fails_at_declaration_and_on_direct_call(trained, task, kwargs, message):
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError,
                       match=r"^stage 'fp32' \(export_onnx\): " + re.escape(message) + "$"):
        pipeline.stage(export_onnx, out="fp32", model=teacher, **kwargs)
    assert "fp32" not in pipeline.stages
    with pytest.raises(PipelineError, match="^export_onnx: " + re.escape(message) + "$"):
        export_onnx(trained, data=task, **kwargs)


def test_declaration_accepts_good_settings_and_names_the_role():
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    for i, mode in enumerate(("factorized", "dense", "auto")):
        pipeline.stage(export_onnx, out=f"fp32_{i}", model=teacher, tt_export=mode, opset=18,
                       atol=1e-5, simplify=False)
    pipeline.stage(export_onnx, out="fp32", model=teacher, opset=None)
    assert spec_of(export_onnx).role == "export"


class TTLookalike(nn.Linear):
    """Named like a TT layer but an ordinary Linear: must be exported as it is."""


TTLookalike.__module__ = "kdcompress.layers.custom"


class MyTT(TTLinear):
    """A user's subclass of TTLinear, outside kdcompress: still a TT layer."""


def test_tt_layers_are_recognised_by_class_not_name(trained, task, monkeypatch):
    calls = []
    materialize = export.materialize
    monkeypatch.setattr(export, "materialize",
                        lambda model, **kw: calls.append(kw["mode"]) or materialize(model, **kw))
    lookalike = nn.Sequential(nn.Flatten(), TTLookalike(64, 10))
    ctx = StageContext.standalone("fp32", task)
    export_onnx(lookalike, tt_export="dense", ctx=ctx)
    assert calls == [] and ctx.details["materialised_tt_layers"] == []
    linear = nn.Linear(64, 10)
    subclass = nn.Sequential(nn.Flatten(), MyTT.from_linear(linear, rank=2))
    assert type(subclass[1]) is MyTT and isinstance(subclass[1], TTLinear)
    ctx = StageContext.standalone("fp32", task)
    export_onnx(subclass, tt_export="dense", ctx=ctx)
    assert calls == ["dense"] and ctx.details["materialised_tt_layers"] == ["1"]
    assert TTConv2d in export.TT_LAYERS


def test_tt_export_auto_is_timed_on_the_pipeline_device(task, monkeypatch):
    devices = []
    materialize = export.materialize
    monkeypatch.setattr(export, "materialize", lambda model, **kw: devices.append(kw["device"])
                        or materialize(model, **kw))
    model = nn.Sequential(nn.Flatten(), TTLinear.from_linear(nn.Linear(64, 10), rank=2))
    ctx = StageContext.standalone("fp32", task)
    export_onnx(model, tt_export="auto", ctx=ctx)
    assert devices == [ctx.device] and ctx.details["tt_export_timed_on"] == "cpu"


def test_parity_check_never_reads_the_test_split(trained, task, monkeypatch):
    reads: list[str] = []
    arrays = data.Task.arrays

    def spy(self: data.Task, split: str = "test"):
        reads.append(split)
        return arrays(self, split)

    monkeypatch.setattr(data.Task, "arrays", spy)
    model = models.cnn(width=16, hidden=64).build((1, 8, 8), 10).eval()
    model.load_state_dict(trained.state_dict())
    model.classifier.fc1 = TTLinear.from_linear(model.classifier.fc1, rank=4)
    ctx = StageContext.standalone("fp32", task)
    export_onnx(model, tt_export="auto", ctx=ctx)  # auto times each TT layer
    assert reads and "test" not in reads, reads
    assert ctx.details["parity_split"] == "val"


def test_tt_layers_export_factorized_or_dense(trained, task):
    tt = pytest.importorskip("kdcompress.layers.tt")
    model = models.cnn(width=16, hidden=64).build((1, 8, 8), 10).eval()
    model.load_state_dict(trained.state_dict())
    model.classifier.fc1 = tt.TTLinear.from_linear(model.classifier.fc1, rank=4)
    ops = {}
    for mode in ("factorized", "dense"):
        ctx = StageContext.standalone("fp32", task)
        export_onnx(model, tt_export=mode, ctx=ctx)
        assert ctx.details["max_abs_diff"] < 1e-4
        ops[mode] = ctx.details["op_counts"]
        expected = ["classifier.fc1"] if mode == "dense" else []
        assert ctx.details["materialised_tt_layers"] == expected
    assert ops["factorized"].get("MatMul", 0) >= 2 and "MatMul" not in ops["dense"]


def test_only_gather_indices_are_narrowed_and_their_value_info_with_them():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kdcompress.stages.export import _narrow_gather_indices

    idx = numpy_helper.from_array(np.array([2, 0, 1], dtype=np.int64), "idx")
    shape = numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),
         helper.make_node("Reshape", ["g", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [idx, shape],
        value_info=[helper.make_tensor_value_info(n, TensorProto.INT64, [k])
                    for n, k in (("idx", 3), ("shape", 2))])
    proto = helper.make_model(graph)
    assert _narrow_gather_indices(proto) == 1
    types = {i.name: i.data_type for i in proto.graph.initializer}
    infos = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    assert types == {"idx": TensorProto.INT32, "shape": TensorProto.INT64}
    assert infos == {"idx": TensorProto.INT32, "shape": TensorProto.INT64}
    onnx.checker.check_model(proto)

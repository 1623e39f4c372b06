"""TTLinear / TTConv2d: exactness, ranks, tolerance, export, int8, serialisation, materialize."""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdcompress.artifacts import load_module, save_module
from kdcompress.errors import LayerError
from kdcompress.layers import (
    TT_LAYERS,
    TTConv2d,
    TTLinear,
    choose_modes,
    factorize,
    materialize,
    max_ranks,
    set_module,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(96, 60).double()


def test_factorize_balanced_and_padded() -> None:
    assert factorize(1024, 4) == (4, 8, 8, 4)
    assert math.prod(factorize(784, 3)) == 784
    in_modes, out_modes = choose_modes(1021, 37)  # 1021 is prime: padded to a good size
    assert math.prod(in_modes) >= 1021 and max(in_modes) <= 12
    assert math.prod(out_modes) >= 37 and len(out_modes) == len(in_modes)


@pytest.mark.parametrize("sizes", [(96, 60), (131, 37), (64, 10)])
def test_full_rank_round_trip_is_exact(sizes: tuple[int, int]) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(*sizes).double()
    tt = TTLinear.from_linear(lin)
    x = torch.randn(5, sizes[0], dtype=torch.float64)
    assert torch.allclose(tt.to_dense().weight, lin.weight, atol=1e-12)
    for mode in ("factorized", "dense"):
        tt.forward_mode = mode
        assert torch.allclose(tt(x), lin(x), atol=1e-12)
    xe = tt._expand_input(x)  # both contraction orders agree
    assert torch.allclose(tt._contract_left(xe), tt._contract_right(xe), atol=1e-12)


def test_leading_dims_and_float32(linear: nn.Linear) -> None:
    lin = linear.float()
    tt = TTLinear.from_linear(lin)
    x = torch.randn(2, 3, 96)
    assert torch.allclose(tt(x), lin(x), atol=1e-5)


def test_error_decreases_with_rank(linear: nn.Linear) -> None:
    errors = [_rel(TTLinear.from_linear(linear, rank=r).full_weight(), linear.weight)
              for r in (1, 2, 4, 8, 16)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > errors[-1]


@pytest.mark.parametrize("tol", [0.1, 0.3, 0.6])
def test_tol_is_honoured(linear: nn.Linear, tol: float) -> None:
    low = TTLinear(96, 60, in_modes=(4, 6, 4), out_modes=(3, 5, 4), ranks=(1, 3, 3, 1)).double()
    with torch.no_grad():  # low TT rank plus noise
        w = low.full_weight()
        linear.weight.copy_(w + 0.03 * w.std() * torch.randn(60, 96, dtype=torch.float64))
    tt = TTLinear.from_linear(linear, tol=tol)
    assert _rel(tt.full_weight(), linear.weight) <= tol
    assert tt.num_core_params() < TTLinear.from_linear(linear).num_core_params()


def test_param_count_matches_formula(linear: nn.Linear) -> None:
    tt = TTLinear.from_linear(linear, rank=[3, 5], in_modes=(4, 4, 6), out_modes=(3, 4, 5))
    r, m, n = tt.ranks, tt.out_modes, tt.in_modes
    assert r == (1, 3, 5, 1)
    expected = sum(r[k] * m[k] * n[k] * r[k + 1] for k in range(3))
    assert sum(c.numel() for c in tt.cores) == expected == tt.num_core_params()
    assert sum(p.numel() for p in tt.parameters()) == expected + 60


def test_macs_choose_the_cheaper_path() -> None:
    tt = TTLinear.from_linear(nn.Linear(512, 512), rank=4)
    macs = tt.macs(64)
    assert macs["factorized"] * 2 < macs["linear"]
    assert not tt._use_dense(64)
    big = TTLinear.from_linear(nn.Linear(128, 128))  # full rank: dense is cheaper at batch 64
    assert big._use_dense(64)


def test_ttconv_equals_dense_conv_at_full_rank() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    tt = TTConv2d.from_conv(conv)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    assert torch.allclose(tt(x), conv(x), atol=1e-12)
    assert torch.allclose(tt.to_dense().weight, conv.weight, atol=1e-12)
    same = nn.Conv2d(6, 4, 3, padding="same").double()
    assert torch.allclose(TTConv2d.from_conv(same)(x), same(x), atol=1e-12)
    low = TTConv2d.from_conv(conv, rank=2)
    assert low.ranks == (1, 2, 2, 2, 1) and low.num_core_params() < conv.weight.numel()


def test_errors_name_the_layer() -> None:
    with pytest.raises(LayerError, match="groups=2"):
        TTConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LayerError, match=r"Linear\(96, 60\).*>= 1"):
        TTLinear.from_linear(nn.Linear(96, 60), rank=0)
    with pytest.raises(LayerError, match="rank or tol"):
        TTLinear.from_linear(nn.Linear(96, 60), rank=2, tol=0.1)
    with pytest.raises(LayerError, match="cover the sizes"):
        TTLinear(96, 60, in_modes=(4, 4), out_modes=(6, 10), ranks=(1, 2, 1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TTConv2d.from_conv(nn.Conv2d(1, 8, 3, padding=1), rank=4), nn.ReLU(), nn.Flatten(),
        TTLinear.from_linear(nn.Linear(8 * 8 * 8, 64), rank=4), nn.ReLU(),
        TTLinear.from_linear(nn.Linear(64, 10), rank=3)).eval()


def test_save_load_round_trip(tmp_path) -> None:
    model = _model()
    save_module(model, tmp_path / "m")
    loaded = load_module(tmp_path / "m")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert loaded[3].in_modes == model[3].in_modes and isinstance(loaded[0], TTConv2d)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, str]:
    model = _model()
    path = str(tmp_path_factory.mktemp("onnx") / "tt.onnx")
    torch.onnx.export(model, (torch.randn(3, 1, 8, 8),), path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return model, path


def test_onnx_export_matmul_no_einsum_dynamic_batch(exported) -> None:
    model, path = exported
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Einsum" not in ops and "MatMul" in ops and "Conv" in ops
    session = ort.InferenceSession(path)
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        out = session.run(None, {name: x.numpy()})[0]
        np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)


def test_static_int8_quantizes_tt_matmuls(exported, tmp_path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.batches = iter([{name: torch.randn(4, 1, 8, 8).numpy()} for _ in range(4)])

        def get_next(self):  # noqa: ANN201
            return next(self.batches, None)

    model, path = exported
    out = str(tmp_path / "int8.onnx")
    name = ort.InferenceSession(path).get_inputs()[0].name
    quantize_static(path, out, Reader(name), quant_format=QuantFormat.QDQ)
    graph = onnx.load(out).graph
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) >= 5
    for node in matmuls:  # both inputs dequantized; one of them an int8 weight (the TT core)
        sources = [producer[i] for i in node.input]
        assert all(src.op_type == "DequantizeLinear" for src in sources)
        assert any(src.input[0] in initializers for src in sources)
    x = torch.randn(2, 1, 8, 8)
    q = ort.InferenceSession(out).run(None, {name: x.numpy()})[0]
    ref = model(x).detach().numpy()
    assert np.abs(q - ref).max() < 0.1 * np.abs(ref).max() + 1e-3


def test_materialize_modes() -> None:
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    dense, names = materialize(model, "dense")
    assert names == ["0", "3", "5"] and isinstance(dense[3], nn.Linear)
    assert torch.allclose(dense(x), model(x), atol=1e-5)
    same, names = materialize(model, "factorized")
    assert names == [] and isinstance(same[3], TTLinear)
    auto, names = materialize(model, "auto", example_input=x, size_budget=0)
    assert names == [] or all(model.get_submodule(n).num_core_params() >= 0 for n in names)
    assert torch.allclose(auto(x), model(x), atol=1e-5)
    with pytest.raises(LayerError, match="example_input"):
        materialize(model, "auto")
    assert isinstance(model[3], TTLinear)  # input untouched


def test_materialize_auto_follows_timings_on_the_serving_device(monkeypatch) -> None:
    """"auto" asks for timings on the device given and makes dense exactly the layers whose
    dense form was faster there (timings faked: the choice, not the clock, is under test)."""
    tt_module = importlib.import_module("kdcompress.layers.tt")
    model = _model()
    seen = []

    def fake(layer, dense, x, device):
        seen.append(device)
        faster_dense = isinstance(dense, nn.Linear) and dense.in_features == 512
        return (2.0, 1.0) if faster_dense else (1.0, 2.0)

    monkeypatch.setattr(tt_module, "_compare_times", fake)
    out, names = materialize(model, "auto", example_input=torch.randn(4, 1, 8, 8), device="cuda")
    assert seen and all(d == torch.device("cuda") for d in seen)
    assert len(seen) == 3 and names == ["3"]  # the 512 -> 64 layer alone was faster dense
    assert isinstance(out[3], nn.Linear) and isinstance(out[5], TTLinear)


def test_package_exports_the_public_api() -> None:
    layers = importlib.import_module("kdcompress.layers")
    readme = {"TTLinear", "TTConv2d", "materialize", "tensorize", "round_ranks"}
    assert readme <= set(layers.__all__)
    for name in layers.__all__:  # each public name is the object its module defines
        obj = getattr(layers, name)
        home = getattr(obj, "__module__", None)
        if home and home.startswith("kdcompress.layers."):
            assert getattr(importlib.import_module(home), name) is obj, name
    assert TT_LAYERS == (TTLinear, TTConv2d)
    assert isinstance(TTLinear.from_linear(nn.Linear(8, 4), rank=2), TT_LAYERS)
    assert not isinstance(nn.Linear(8, 4), TT_LAYERS)


def test_no_module_imports_a_private_name_of_the_layers() -> None:
    package = Path(importlib.import_module("kdcompress").__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "kdcompress.layers"):
                offenders += [f"{path.name}: {a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert offenders == []


def test_public_helpers() -> None:
    assert max_ranks([4, 8, 8, 4]) == [1, 4, 32, 4, 1]
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert set_module(model, "1", nn.Tanh()) is model and isinstance(model[1], nn.Tanh)
    assert isinstance(set_module(model, "", nn.Identity()), nn.Identity)

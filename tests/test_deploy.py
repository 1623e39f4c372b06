"""OnnxClassifier: same outputs as raw ONNX Runtime, batching, clear errors on bad inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kdcompress import data, models
from kdcompress.artifacts import OnnxModel
from kdcompress.deploy import InputError, OnnxClassifier
from kdcompress.errors import ArtifactError
from kdcompress.stages.export import export_onnx
from kdcompress.stages.quantize import quantize_onnx


@pytest.fixture(scope="module")
def task() -> data.Task:
    return data.digits()


@pytest.fixture(scope="module")
def int8(task: data.Task) -> OnnxModel:
    model = models.cnn(width=8, hidden=32).build((1, 8, 8), 10).eval()
    return quantize_onnx(export_onnx(model, data=task), samples=64, data=task)


def test_outputs_equal_raw_onnxruntime(int8, task):
    x, _ = task.arrays("test")
    x = x[:100].numpy()
    sess = ort.InferenceSession(str(int8.path), providers=["CPUExecutionProvider"])
    raw = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    clf = OnnxClassifier(int8.path, threads=1)
    assert clf.providers == ["CPUExecutionProvider"]
    assert clf.input_shape == (None, 1, 8, 8)
    np.testing.assert_array_equal(clf.logits(x), raw)
    np.testing.assert_array_equal(clf.predict(x, batch_size=7), raw.argmax(1))
    proba = clf.predict_proba(torch.from_numpy(x), batch_size=33)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), raw.argmax(1))


def test_float64_input_is_cast(int8, task):
    clf = OnnxClassifier(int8.path)
    x = task.example(4).numpy()
    np.testing.assert_array_equal(clf.predict(x.astype(np.float64)), clf.predict(x))


def test_bad_inputs_give_clear_errors(int8, task):
    clf = OnnxClassifier(int8.path)
    x = task.example(4).numpy()
    with pytest.raises(InputError, match=r"must have shape \('N', 1, 8, 8\), but got \(4, 64\)"):
        clf.predict(x.reshape(4, 64))
    with pytest.raises(InputError, match=r"add the batch axis"):
        clf.predict(x[0])
    with pytest.raises(InputError, match="floating-point input .* got dtype int64"):
        clf.predict(x.astype(np.int64))
    with pytest.raises(InputError, match="numpy array or a torch tensor, but got list"):
        clf.predict([[0.0]])
    with pytest.raises(ValueError):  # InputError is a ValueError too
        clf.predict(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        OnnxClassifier(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="cannot open"):
        OnnxClassifier(bad)


def test_a_provider_that_does_not_load_is_an_error_when_named_and_a_warning_by_default(
        int8, task, monkeypatch):
    """ONNX Runtime runs the session on the next provider when one does not load (here: the CUDA
    provider, absent from this build), with only a log line; OnnxClassifier says so."""
    import kdcompress.deploy as deploy

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    cuda_first = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ArtifactError, match="CUDAExecutionProvider did not load.*runs on "
                                            "CPUExecutionProvider.*providers="):
        OnnxClassifier(int8.path, providers=cuda_first)
    monkeypatch.setattr(deploy, "default_providers", lambda: cuda_first)  # as on a GPU machine
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider did not load"):
        clf = OnnxClassifier(int8.path)
    assert clf.providers == ["CPUExecutionProvider"]
    x, _ = task.arrays("test")
    assert clf.predict(x[:4].numpy()).shape == (4,)
